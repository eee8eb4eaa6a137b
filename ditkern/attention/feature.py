"""The ``attention`` feature: ``ditkern.patch(model, attention=ditkern.WindowAttention(window=..., layers=...))``.

What it knows of a model comes from the family's declaration: the blocks in run order (``Family.stack``), and
``Family.attention`` (a ``TokenLayout``): which attention modules of each block are self-attention over the image
tokens (and the text tokens, for joint attention), which processors it can window, where the text tokens sit in the
joint sequence, and how the token grid is read from the model's inputs. Selected blocks get a ``WindowProcessor``
around their own processor (Plan.apply / Plan.undo through ``set_processor``); the transformer gets a pre-forward
hook that records the grid of each call. Cross-attention (PixArt, Wan's text/image cross-attention) stays dense: its
keys are the text.
"""

from __future__ import annotations

import torch
from torch import nn

from ditkern._backend import choose
from ditkern.attention.config import WindowAttention
from ditkern.attention.processors import CONTEXT_PARALLEL_REASON, GridContext, context_parallel, grid_hook, wrap
from ditkern.ops.window_attention import BACKENDS
from ditkern.patch.engine import Feature, Plan, device_dtype, register_feature
from ditkern.patch.family import Stack, TokenLayout

WHAT = "self-attention windowed (window_attention)"


def _root_plan(ctx: GridContext, layout: TokenLayout):
    name = "ditkern.attention.grid"
    found = {}

    def apply(model):
        from diffusers.hooks import HookRegistry  # noqa: PLC0415

        found["created"] = not hasattr(model, "_diffusers_hook")
        found["had_forward"] = "forward" in model.__dict__
        HookRegistry.check_if_exists_or_initialize(model).register_hook(grid_hook(ctx, layout.grid), name)

    def undo(model):
        registry = getattr(model, "_diffusers_hook", None)
        if registry is None:
            return
        registry.remove_hook(name, recurse=False)
        if found["created"] and not registry.hooks:  # leave the model as we found it
            del model._diffusers_hook
            if not found["had_forward"] and "forward" in model.__dict__:
                del model.forward
        ctx.grid = None

    return Plan("attention", "token grid read per call (for windowed attention)", apply=apply, undo=undo)


def _op_backend(attn: nn.Module, backend: str) -> str:
    """The backend window_attention runs on for this attention module (its device, dtype and head size)."""
    device, dtype = device_dtype(attn)
    heads = getattr(attn, "heads", 1)
    head_dim = getattr(getattr(attn, "to_q", None), "out_features", 64 * heads) // heads
    q = torch.empty(1, heads, 1, head_dim, device=device, dtype=dtype)
    return choose("window_attention", BACKENDS, q, backend=backend)


def _block_rule(ctx: GridContext, cfg: WindowAttention, layout: TokenLayout, index: dict[int, int], chosen: set[int],
                n: int, backend: str):  # fmt: skip
    def rule(block, config):
        i = index.get(id(block))
        if i is None:
            return None  # a block of that class outside the model's block lists
        if i not in chosen:
            return f"attention kept dense (block {i} of {n} not in layers={cfg.layers!r})"
        attrs = [a for a in layout.self_attention[type(block).__name__] if getattr(block, a, None) is not None]
        if not attrs:
            return "no self-attention module found"
        for a in attrs:
            proc = getattr(getattr(block, a), "processor", None)
            if type(proc).__name__ not in layout.processors:
                return (
                    f"{a}.processor is {type(proc).__name__}, not one whose attention product ditkern can window "
                    f"({', '.join(sorted(layout.processors))})"
                )
        saved = {}
        text_padding = getattr(layout.grid, "text_padding", False)  # processors.accepts_text_padding

        def apply(b):
            for a in attrs:
                m = getattr(b, a)
                saved[a] = m.processor
                m.set_processor(wrap(m.processor, ctx, cfg, layout.text, i, backend, text_padding))

        def undo(b):
            for a in attrs:
                getattr(b, a).set_processor(saved.pop(a))

        detail = f"block {i}: {', '.join(attrs)}"
        chosen_backend = _op_backend(getattr(block, attrs[0]), backend)
        return Plan("attention", f"{WHAT}: {cfg.describe()}", apply=apply, undo=undo, detail=detail,
                    backend=chosen_backend)  # fmt: skip

    return rule


def attention_rules(family, model, config):
    cfg = config.attention
    if cfg is None:
        return None
    if not isinstance(cfg, WindowAttention):
        raise TypeError(f"attention must be a ditkern.WindowAttention, got {type(cfg).__name__}")
    layout, stack = family.attention, family.stack
    if not isinstance(layout, TokenLayout) or not isinstance(stack, Stack):
        why = layout if isinstance(layout, str) else stack
        reason = f"windowed attention is not available for family {family.name!r}: {why}"
        return {type(model).__name__: lambda m, c: reason}
    if context_parallel(model):
        return {type(model).__name__: lambda m, c: CONTEXT_PARALLEL_REASON if m is model else None}
    blocks = [b for _, b in stack.modules(model)]
    n = len(blocks)
    chosen = set(cfg.selected(n))
    index = {id(b): i for i, b in enumerate(blocks)}
    ctx = GridContext(fixed=tuple(cfg.grid) if cfg.grid is not None else None)
    backend = cfg.backend if cfg.backend is not None else config.backend
    rules = {type(model).__name__: lambda m, c: _root_plan(ctx, layout) if m is model else None}
    block_rule = _block_rule(ctx, cfg, layout, index, chosen, n, backend)
    for cls in layout.self_attention:
        rules[cls] = block_rule
    return rules


ATTENTION = register_feature(Feature(name="attention", rules=attention_rules))
