"""The ``attention`` feature: ``ditkern.patch(model, attention=ditkern.WindowAttention(window=..., layers=...))``.

Per family: which blocks hold self-attention over the image tokens (and the text tokens, for joint attention),
which of their attention modules go local, where the text tokens sit in the joint sequence, and how the token grid is
read from the model's inputs. Selected blocks get a ``WindowProcessor`` around their own processor (Plan.apply /
Plan.undo through ``set_processor``); the transformer gets a pre-forward hook that records the grid of each call.
Cross-attention (PixArt, DiT has none, Wan's text/image cross-attention) stays dense: its keys are the text.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ditkern.attention.config import WindowAttention
from ditkern.attention.processors import GridContext, flux_grid, grid_hook, spatial_grid, wrap
from ditkern.patch.engine import Feature, Plan, register_feature


@dataclass(frozen=True)
class Layout:
    block_lists: tuple[str, ...]  # model attributes holding the blocks, in run order
    attn_attrs: dict[str, tuple[str, ...]]  # block class -> its self-attention modules
    processors: frozenset[str]  # processor classes whose attention product goes through torch SDPA
    text_position: str
    infer_grid: object


LAYOUTS = {
    "flux": Layout(
        ("transformer_blocks", "single_transformer_blocks"),
        {"FluxTransformerBlock": ("attn",), "FluxSingleTransformerBlock": ("attn",)},
        frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0"}),
        "first",
        flux_grid,
    ),
    "sd3": Layout(
        ("transformer_blocks",),
        {"JointTransformerBlock": ("attn", "attn2")},  # attn2: SD3.5's image-only dual attention
        frozenset({"JointAttnProcessor2_0"}),
        "last",
        spatial_grid,
    ),
    "pixart": Layout(
        ("transformer_blocks",), {"BasicTransformerBlock": ("attn1",)}, frozenset({"AttnProcessor2_0"}), "first",
        spatial_grid,
    ),  # fmt: skip
    "dit": Layout(
        ("transformer_blocks",), {"BasicTransformerBlock": ("attn1",)}, frozenset({"AttnProcessor2_0"}), "first",
        spatial_grid,
    ),  # fmt: skip
    "wan": Layout(
        ("blocks",), {"WanTransformerBlock": ("attn1",)}, frozenset({"WanAttnProcessor", "WanAttnProcessor2_0"}),
        "first", spatial_grid,
    ),  # fmt: skip
}

WHAT = "self-attention windowed (window_attention)"


def _blocks(model: nn.Module, layout: Layout) -> list[nn.Module]:
    out = []
    for name in layout.block_lists:
        out.extend(getattr(model, name, None) or [])
    return out


def _root_plan(ctx: GridContext, layout: Layout):
    name = "ditkern.attention.grid"

    def apply(model):
        from diffusers.hooks import HookRegistry  # noqa: PLC0415

        apply.created = not hasattr(model, "_diffusers_hook")
        apply.had_forward = "forward" in model.__dict__
        HookRegistry.check_if_exists_or_initialize(model).register_hook(grid_hook(ctx, layout.infer_grid), name)

    def undo(model):
        registry = getattr(model, "_diffusers_hook", None)
        if registry is None:
            return
        registry.remove_hook(name, recurse=False)
        if apply.created and not registry.hooks:  # leave the model as we found it
            del model._diffusers_hook
            if not apply.had_forward and "forward" in model.__dict__:
                del model.forward
        ctx.grid = None

    return Plan("attention", "token grid read per call (for windowed attention)", apply=apply, undo=undo)


def _block_rule(ctx: GridContext, cfg: WindowAttention, layout: Layout, index: dict[int, int], chosen: set[int],
                n: int, backend: str | None):  # fmt: skip
    def rule(block, config):
        i = index.get(id(block))
        if i is None:
            return None  # a block of that class outside the model's block lists
        if i not in chosen:
            return f"attention kept dense (block {i} of {n} not in layers={cfg.layers!r})"
        attrs = [a for a in layout.attn_attrs[type(block).__name__] if getattr(block, a, None) is not None]
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

        def apply(b):
            for a in attrs:
                m = getattr(b, a)
                saved[a] = m.processor
                m.set_processor(wrap(m.processor, ctx, cfg, layout.text_position, i, backend))

        def undo(b):
            for a in attrs:
                getattr(b, a).set_processor(saved.pop(a))

        detail = f"block {i}: {', '.join(attrs)}"
        return Plan("attention", f"{WHAT}: {cfg.describe()}", apply=apply, undo=undo, detail=detail)

    return rule


def attention_rules(family, model, config):
    cfg = config.attention
    if cfg is None:
        return None
    if not isinstance(cfg, WindowAttention):
        raise TypeError(f"attention must be a ditkern.WindowAttention, got {type(cfg).__name__}")
    layout = LAYOUTS.get(family.name)
    if layout is None:
        return {type(model).__name__: lambda m, c: f"windowed attention is not available for family {family.name!r}"}
    blocks = _blocks(model, layout)
    n = len(blocks)
    chosen = set(cfg.selected(n))
    index = {id(b): i for i, b in enumerate(blocks)}
    ctx = GridContext(fixed=tuple(cfg.grid) if cfg.grid is not None else None)
    backend = cfg.backend if cfg.backend is not None else config.backend
    rules = {type(model).__name__: lambda m, c: _root_plan(ctx, layout) if m is model else None}
    block_rule = _block_rule(ctx, cfg, layout, index, chosen, n, backend)
    for cls in layout.attn_attrs:
        rules[cls] = block_rule
    return rules


ATTENTION = register_feature(Feature(name="attention", rules=attention_rules))
