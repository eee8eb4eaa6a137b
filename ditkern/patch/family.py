"""``Family``: everything ditkern knows about a model class, declared in one file, ``ditkern/patch/families/<name>.py``.

The engine walks a model with the family's fused-block ``rules``; each feature reads its own part of the declaration
and keeps no per-model table:

=================  =================================================================================================
field              read by
=================  =================================================================================================
``rules``          the engine: the lossless fused-block / fused-norm rules, keyed by exact submodule class name
``stack``          cache (which blocks to skip, how each block takes and returns its streams, which streams the
                   model reads after the stack), attention (blocks are numbered in stack order), quant (the first and
                   last block's modulation layers stay in high precision)
``attention``      attention: which modules are the self-attention, which processors it can window, where the text
                   tokens sit and how the token grid is read from the model call
``quant``          quant: the default skip list
``moe``            moe: which layer classes are mixtures of experts and how each becomes a ``SparseMoE``
=================  =================================================================================================

A feature that does not apply to a family is declared as a string that says why (``attention="..."``); the report
shows it. See docs/adding_a_family.md for a worked example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# A rule maps a module to a Plan (ditkern.patch.engine.Plan), to a string (the reason it is skipped), or to None
# (not this rule's business). ``config`` is the ditkern.PatchConfig of the patch.
Rule = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class Streams:
    """A block class's stream signature: which residual streams it takes and returns.

    ``takes``: the stream parameters of the block's ``forward``, which are its first positional parameters in this
    order (they may also be passed by keyword). ``returns``: the streams it returns, in the order of the returned
    tuple; a single name means the block returns that tensor alone. A returned stream may be None (SD3's last block
    drops the text stream).
    """

    takes: tuple[str, ...]
    returns: tuple[str, ...]

    def __post_init__(self):
        if not self.takes or not self.returns:
            raise ValueError("Streams: a block takes and returns at least one stream")
        if missing := sorted(set(self.returns) - set(self.takes)):
            raise ValueError(
                f"Streams: returned stream(s) {missing} are not taken (a skipped block returns its inputs)"
            )

    def read(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The streams a call passes in, by name."""
        return {name: kwargs[name] if name in kwargs else args[i] for i, name in enumerate(self.takes)}

    def split(self, out) -> dict[str, Any]:
        """The streams a call returned, by name."""
        if len(self.returns) == 1:
            return {self.returns[0]: out}
        return dict(zip(self.returns, out))

    def join(self, streams: Mapping[str, Any]):
        """What the block returns for these streams (the inverse of :meth:`split`)."""
        if len(self.returns) == 1:
            return streams[self.returns[0]]
        return tuple(streams[name] for name in self.returns)


# the two signatures of today's diffusers DiT blocks
SINGLE = Streams(takes=("hidden_states",), returns=("hidden_states",))
"""``block(hidden_states, ...) -> hidden_states``"""
PAIR = Streams(takes=("hidden_states", "encoder_hidden_states"), returns=("encoder_hidden_states", "hidden_states"))
"""``block(hidden_states, encoder_hidden_states, ...) -> (encoder_hidden_states, hidden_states)`` (FLUX, SD3)"""


@dataclass(frozen=True)
class Stack:
    """The transformer blocks a model runs, in order, and how the Taylor cache reads a model call.

    lists:          model attributes holding the blocks (``nn.ModuleList``), in the order the model runs them.
    blocks:         exact block class name -> its stream signature.
    reads_after:    the streams the model reads after the last block of the cached chain; the others pass a skipped
                    chain unchanged (FLUX and SD3 drop the text stream after their last block).
    cache:          None if the Taylor cache may skip the chain below, else why it cannot.
    cached:         the chain of blocks the cache may skip (the model's forward does nothing to the streams between
                    them): None, every block of ``lists``; a tuple of names, the blocks of those lists (a run of
                    ``lists``; the blocks before it always run: FLUX.2's double blocks before the single-stream
                    chain); or ``cached(model, blocks) -> blocks[i:j] | "why not"`` over ``modules(model)`` (Wan
                    VACE: the blocks after the last control hint).
    latents:        the model's forward argument holding the latents: a tensor ``[B, ...]`` or a list of B of them.
    timestep:       the forward argument holding the step's timestep (scalar, ``[B]`` or per token).
    timestep_rises: False: the timestep falls through sampling (1000 -> 0); True: it rises (0 -> 1: Lumina2,
                    Z-Image). A timestep that moves back toward its start begins a new generation.
    uncached_if:    forward arguments that, when given (not None), add residuals between the chain's blocks
                    (ControlNet samples): such a call runs every block and leaves the state alone.
    """

    lists: tuple[str, ...]
    blocks: Mapping[str, Streams]
    reads_after: tuple[str, ...] = ("hidden_states",)
    cache: str | None = None
    cached: tuple[str, ...] | Callable[[Any, list], Any] | None = None
    latents: str = "hidden_states"
    timestep: str = "timestep"
    timestep_rises: bool = False
    uncached_if: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "blocks", MappingProxyType(dict(self.blocks)))
        if isinstance(self.cached, str):
            raise TypeError("Stack.cached must be a tuple of list names or a callable, not one string")
        if isinstance(self.cached, tuple):
            at = [self.lists.index(n) if n in self.lists else -1 for n in self.cached]
            if not self.cached or -1 in at or at != list(range(at[0], at[0] + len(at))):
                raise ValueError(f"Stack.cached {self.cached!r} must be a run of Stack.lists {self.lists!r}")

    def modules(self, model) -> list[tuple[str, Any]]:
        """``[(path, block)]`` of the model's blocks in run order."""
        out = []
        for name in self.lists:
            for i, block in enumerate(getattr(model, name, None) or ()):
                out.append((f"{name}.{i}", block))
        return out

    def chain(self, model) -> list[tuple[str, Any]] | str:
        """``[(path, block)]`` of the blocks the cache may skip, in run order (a run of :meth:`modules`), or why
        the model has none."""
        blocks = self.modules(model)
        if self.cached is None:
            return blocks
        if isinstance(self.cached, tuple):
            return [(p, b) for p, b in blocks if p.rsplit(".", 1)[0] in self.cached]
        out = self.cached(model, blocks)
        if isinstance(out, str):
            return out
        out = list(out)
        ids = [id(b) for _, b in blocks]
        if out:
            i = ids.index(id(out[0][1]))
            if [id(b) for _, b in out] != ids[i : i + len(out)]:
                raise ValueError("Stack.cached(model, blocks) must return a run of the blocks it was given")
        return out


GridReader = Callable[..., "tuple[tuple[int, ...] | None, int, int]"]


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of a family's self-attention are (for windowed attention).

    self_attention: exact block class name -> the attributes of its self-attention modules (joint text + image
                    attention included; cross-attention, whose keys are the text, is not listed).
    processors:     processor classes whose attention product is a ``scaled_dot_product_attention`` call that
                    ditkern may route to its kernel.
    text:           "first" or "last": where the text tokens sit in a joint sequence.
    grid:           ``grid(model, args, kwargs, read_ids=True) -> (grid or None, image tokens, text tokens)``: the
                    token grid of a model call (``ditkern.attention.processors`` has readers for the common cases).
    """

    self_attention: Mapping[str, tuple[str, ...]]
    processors: frozenset[str]
    text: str
    grid: GridReader

    def __post_init__(self):
        if self.text not in ("first", "last"):
            raise ValueError(f"TokenLayout.text must be 'first' or 'last', got {self.text!r}")
        object.__setattr__(self, "self_attention", MappingProxyType(dict(self.self_attention)))
        object.__setattr__(self, "processors", frozenset(self.processors))


# the parts of a diffusers DiT that every family keeps in high precision by default
COMMON_SKIP = (
    "*embed*",  # patch/text/timestep/class embedders (x_embedder, context_embedder, time_text_embed, ...)
    "proj_out*",  # final projection (DiT: proj_out_1 / proj_out_2)
    "norm_out*",  # final adaLN-continuous modulation
)


@dataclass(frozen=True)
class QuantLayout:
    """The quantization defaults of a family.

    skip:      fnmatch patterns (over module paths) of linear layers kept in high precision by default.
    edge_skip: patterns, relative to the first block of the first stack list and the last block of the last one,
               also kept in high precision (their adaLN modulation linears: the first and last blocks are the most
               sensitive).
    """

    skip: tuple[str, ...] = COMMON_SKIP
    edge_skip: tuple[str, ...] = ("norm*",)

    def default_skip(self, model, stack: Stack | None) -> list[str]:
        pats = list(self.skip)
        if stack is not None:
            lists = [(n, getattr(model, n, None)) for n in stack.lists]
            lists = [(n, lst) for n, lst in lists if lst is not None and len(lst)]
            if lists:
                first, last = lists[0], lists[-1]
                pats += [f"{first[0]}.0.{p}" for p in self.edge_skip]
                pats += [f"{last[0]}.{len(last[1]) - 1}.{p}" for p in self.edge_skip]
        return pats


@dataclass(frozen=True)
class MoELayer:
    """A mixture-of-experts layer class that the ``moe`` feature serves with ``ditkern.SparseMoE``.

    build:    ``build(layer, block_m, backend) -> SparseMoE | str``: the fused module computing the layer's inference
              forward (sharing the layer's router and shared expert), or the reason the layer is left alone.
    original: ``original(layer) -> bool``: True when the call must run the layer's own forward (e.g. a training
              path with an auxiliary loss); by default ``layer.training``.
    """

    build: Callable[[Any, int, str], Any]
    original: Callable[[Any], bool] = field(default=lambda layer: layer.training)


@dataclass(frozen=True, eq=False)  # identity: two declarations are two families
class Family:
    """Everything ditkern knows about one or more model classes (matched by exact class name).

    name:          short name (also used in reports: "windowed attention is not available for family 'sana'").
    model_classes: exact class names of the transformers it covers.
    rules:         the fused-block rules: exact submodule class name -> rule (``ditkern.patch.family.Rule``).
    stack:         the block stack (``Stack``), or why the family has none a feature could use.
    attention:     the token layout for windowed attention (``TokenLayout``), or why it does not apply.
    quant:         the quantization defaults (``QuantLayout``).
    moe:           exact class name of each MoE layer -> ``MoELayer``.
    notes:         what is knowingly left unfused, for the reader.
    """

    name: str
    model_classes: tuple[str, ...]
    rules: Mapping[str, Rule] = field(default_factory=dict)
    stack: Stack | str = "no block stack declared"
    attention: TokenLayout | str = "no token layout declared"
    quant: QuantLayout = QuantLayout()
    moe: Mapping[str, MoELayer] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self):
        if isinstance(self.model_classes, str):
            raise TypeError("Family.model_classes must be a tuple of exact class names, not one string")
        object.__setattr__(self, "model_classes", tuple(self.model_classes))
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))
        object.__setattr__(self, "moe", MappingProxyType(dict(self.moe)))


__all__ = [
    "Family", "Stack", "Streams", "SINGLE", "PAIR", "TokenLayout", "QuantLayout", "MoELayer", "COMMON_SKIP", "Rule",
]  # fmt: skip
