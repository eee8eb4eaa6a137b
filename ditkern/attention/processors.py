"""Attention processors that make a diffusers attention layer windowed, keeping everything else as the family
computes it.

``WindowProcessor`` wraps the layer's own processor (``FluxAttnProcessor``, ``JointAttnProcessor2_0``,
``AttnProcessor2_0``, ``WanAttnProcessor``) and runs it unchanged - projections, QK-norm, RoPE, the joint text/image
concatenation, output projections - except for the one attention product: while the wrapped processor runs, a
``TorchFunctionMode`` routes its ``F.scaled_dot_product_attention`` call (which diffusers' native attention backend
makes, in the ``[B, H, S, Dh]`` layout) to :func:`ditkern.ops.window_attention`. So RoPE and QK-norm stay bit-for-bit
the family's, and the only layout conversion is the one the processor already does. Swapped in with
``attn.set_processor`` and back with ``unpatch``.

The token grid is read once per model call by a pre-forward hook on the transformer (``GridHook``); the number of
text tokens of each attention call is ``S - prod(grid)``, and where they sit (first for FLUX, last for SD3) is a
property of the family.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from ditkern.ops.window_attention import window_attention
from ditkern.patch.parallel import context_parallel_config

_SDPA = torch.nn.functional.scaled_dot_product_attention


@dataclass
class GridContext:
    """The token grid of the model call in progress (set by ``GridHook``, cleared after the call)."""

    grid: tuple[int, ...] | None = None
    text: int = 0  # text tokens of the model call (the joint sequences hold 0 or this many)
    fixed: tuple[int, ...] | None = None  # WindowAttention(grid=...)


class _RouteSDPA(TorchFunctionMode):
    def __init__(self, processor: WindowProcessor):  # TorchFunctionMode.__init__ sets nothing (and dynamo cannot trace it)
        self.processor = processor
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            self.calls += 1
            return self.processor.attend(*args, **kwargs)
        return func(*args, **kwargs)


class WindowProcessor:
    """Runs ``inner`` (the layer's original processor) with its attention product windowed."""

    def __init__(self, inner, ctx: GridContext, config, text_position: str, index: int, backend: str | None,
                 text_padding: bool = False):  # fmt: skip
        self.inner = inner
        self.ctx = ctx
        self.config = config
        self.text_position = text_position
        self.index = index
        self.backend = backend
        self.text_padding = text_padding  # the family's masks are text key-padding masks (accepts_text_padding)

    def __getattr__(self, name):  # attributes diffusers reads from a processor (_attention_backend, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, attn, *args, **kwargs):
        if torch.is_grad_enabled() and (
            any(isinstance(t, torch.Tensor) and t.requires_grad for t in (*args, *kwargs.values()))
            or any(p.requires_grad for p in attn.parameters())
        ):  # inference-only: under grad the layer's own (exact, dense) attention runs
            return self.inner(attn, *args, **kwargs)
        mode = _RouteSDPA(self)
        with mode:
            out = self.inner(attn, *args, **kwargs)
        if mode.calls == 0:
            raise RuntimeError(
                f"ditkern window attention (block {self.index}): {type(self.inner).__name__} did not call "
                "torch.nn.functional.scaled_dot_product_attention, so the window was not applied. A diffusers "
                "attention backend other than 'native' is active; switch it back or unpatch."
            )
        return out

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        grid = self.ctx.grid
        if grid is None:
            raise RuntimeError(
                f"ditkern window attention (block {self.index}): no token grid known; the block ran outside the "
                "patched transformer's forward. Pass WindowAttention(grid=...) to fix it."
            )
        if (attn_mask is not None and not self.text_padding) or is_causal or dropout_p:
            raise NotImplementedError(
                f"ditkern window attention (block {self.index}): the processor passed attn_mask/is_causal/dropout_p "
                "to SDPA; windowed attention takes the text padding as text_mask only (no general masks)"
            )
        if query.shape != key.shape or key.shape != value.shape:
            raise NotImplementedError(
                f"ditkern window attention (block {self.index}): q/k/v shapes differ ({tuple(query.shape)}, "
                f"{tuple(key.shape)}, {tuple(value.shape)}); only self-attention over text + image tokens is windowed"
            )
        S, N = query.shape[-2], math.prod(grid)
        if S - N not in (0, self.ctx.text):
            raise ValueError(
                f"ditkern window attention (block {self.index}): grid={grid} holds {N} image tokens and the model "
                f"call has {self.ctx.text} text tokens, but the attention sequence has {S}; the grid does not match "
                "the sequence length"
            )
        text_mask = None
        if attn_mask is not None:
            text_mask = text_key_mask(attn_mask, query.shape[0], S, S - N, self.text_position, self.index)
        c = self.config
        return window_attention(
            query, key, value, grid=grid, window=c.window, text_tokens=S - N, text_position=self.text_position,
            text_mask=text_mask, scale=scale, shape=c.shape, granularity=c.granularity, tile=c.tile,
            backend=self.backend,
        )  # fmt: skip


def text_key_mask(attn_mask: torch.Tensor, batch: int, S: int, T: int, text_position: str, index: int = -1):
    """The ``[B, T]`` ``text_mask`` (True = a real text key) equal to an SDPA ``attn_mask`` that is a text key-padding
    mask, or a ``NotImplementedError`` saying why it is not one.

    Accepted: a boolean mask, or an additive one holding only 0 and -inf (0 = attend), broadcastable to
    ``[B, H, S, S]``, where every image key is valid and one key mask ``k`` (read from an image query's row) gives
    either every row (a pure key-padding mask: ``window_attention`` computes exactly that) or ``k[q] & k[key]`` (the
    outer product HunyuanVideo 1.5 and Chroma build: the rows of padded text queries are all masked, SDPA returns zeros
    there, while ``window_attention`` lets them attend to the valid keys; those rows are padding the model discards).
    Anything else - a query-dependent mask, masked image keys, an additive bias such as a float 0/1 mask - is refused:
    windowed attention would compute something else.
    """
    where = f"ditkern window attention (block {index})"
    m = attn_mask
    if m.dtype != torch.bool:
        if not m.is_floating_point():
            raise NotImplementedError(f"{where}: attn_mask of dtype {m.dtype} is not a boolean or additive mask")
        zero, neg = m == 0, m == float("-inf")
        if not bool((zero | neg).all()):
            raise NotImplementedError(
                f"{where}: the additive attn_mask holds values other than 0 and -inf (e.g. a float 0/1 mask, which "
                "SDPA adds to the scores as a bias): it is not a text key-padding mask, and windowed attention "
                "removes padded text keys only; pass a boolean mask"
            )
        m = zero
    if m.dim() > 4 or m.shape[-1] != S or (m.dim() >= 2 and m.shape[-2] not in (1, S)):
        raise NotImplementedError(f"{where}: attn_mask of shape {tuple(attn_mask.shape)} is not a [B, 1, S or 1, S] "
                                  f"key mask over the {S} tokens")  # fmt: skip
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[0] not in (1, batch):
        raise NotImplementedError(f"{where}: attn_mask batch {m.shape[0]} does not match the batch {batch}")
    m = m.expand(batch, m.shape[1], m.shape[2], S)
    img0 = T if text_position == "first" else 0  # the first image token
    img = slice(T, S) if text_position == "first" else slice(0, S - T)
    row = img0 if m.shape[2] == S else 0
    k = m[:, 0, row, :]  # [B, S]: the keys an image query sees
    if not bool(k[:, img].all()):
        raise NotImplementedError(f"{where}: attn_mask masks image keys; windowed attention only removes padded "
                                  "text keys (text_mask)")  # fmt: skip
    pure = k[:, None, None, :]
    if not bool((m == pure).all()):
        outer = pure & k[:, None, :, None]
        if m.shape[2] != S or not bool((m == outer).all()):
            raise NotImplementedError(
                f"{where}: attn_mask is not a text key-padding mask (it differs between query rows beyond the rows "
                "of padded text queries); windowed attention would compute something else"
            )
    if T == 0:
        return None
    return k[:, :T] if text_position == "first" else k[:, S - T :]


def accepts_text_padding(reader):
    """A family's grid reader, marked so that its windowed processors take the SDPA masks of its processors as text
    key-padding masks (converted by :func:`text_key_mask`, refused at call time when they are not)."""

    def read(model, args, kwargs, read_ids: bool = True):
        return reader(model, args, kwargs, read_ids=read_ids)

    read.text_padding = True
    read.__name__ = getattr(reader, "__name__", "grid")
    read.__doc__ = reader.__doc__
    return read


def wrap(inner, ctx: GridContext, config, text_position: str, index: int, backend: str | None,
         text_padding: bool = False) -> WindowProcessor:  # fmt: skip
    """A ``WindowProcessor`` whose ``__call__`` shows ``inner.__call__``'s signature: diffusers' ``Attention.forward``
    drops keyword arguments that the processor's signature does not name."""
    sig = inspect.signature(type(inner).__call__)

    def __call__(self, attn, *args, **kwargs):
        return WindowProcessor.__call__(self, attn, *args, **kwargs)

    __call__.__signature__ = sig
    cls = type(f"Window{type(inner).__name__}", (WindowProcessor,), {"__call__": __call__})
    return cls(inner, ctx, config, text_position, index, backend, text_padding)


# ----------------------------------------------------------------------------------------------------------------------
# the token grid of a model call, read from the transformer's inputs
# ----------------------------------------------------------------------------------------------------------------------
def _bound(model, args, kwargs) -> dict:
    sig = inspect.signature(type(model).forward)
    return sig.bind_partial(model, *args, **kwargs).arguments


def flux_grid(model, args, kwargs, read_ids: bool = True) -> tuple[tuple[int, int], int, int]:
    """FLUX packs 2x2 latent patches in raster order and gives each token (0, row, col) in ``img_ids``."""
    a = _bound(model, args, kwargs)
    ids = a.get("img_ids")
    hs = a.get("hidden_states")
    ehs = a.get("encoder_hidden_states")
    text = ehs.shape[1] if ehs is not None else 0
    n = hs.shape[1]
    if ids is None or not read_ids:  # WindowAttention(grid=...): no data-dependent reads (torch.compile fullgraph)
        return None, n, text
    if ids.dim() == 3:
        ids = ids[0]
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    r0, c0 = int(rows.min()), int(cols.min())
    h, w = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    ok = h * w == n == ids.shape[0]
    if ok:
        expect_r = torch.arange(h, device=rows.device).repeat_interleave(w) + r0
        expect_c = torch.arange(w, device=cols.device).repeat(h) + c0
        ok = torch.equal(rows, expect_r) and torch.equal(cols, expect_c)
    return ((h, w) if ok else None), n, text


def spatial_grid(model, args, kwargs, read_ids: bool = True) -> tuple[tuple[int, ...], int, int]:
    """SD3 / PixArt / DiT ([B, C, H, W]) and Wan ([B, C, F, H, W]): the latent shape over the patch size."""
    a = _bound(model, args, kwargs)
    hs = a["hidden_states"]
    ehs = a.get("encoder_hidden_states")
    text = ehs.shape[1] if ehs is not None and ehs.dim() == 3 else 0
    p = model.config.patch_size
    if hs.dim() == 4:
        grid = (hs.shape[-2] // p, hs.shape[-1] // p)
    else:
        pt, ph, pw = p
        grid = (hs.shape[-3] // pt, hs.shape[-2] // ph, hs.shape[-1] // pw)
    return grid, math.prod(grid), text


CONTEXT_PARALLEL_REASON = (
    "windowed attention does not compose with diffusers' context parallelism: each rank holds a slice of the "
    "tokens, and after Ulysses' all-to-all the joint sequence is the ranks' [text, image] slices one after another "
    "(not one raster-ordered grid), while ring attention never holds the whole key set; the window would be "
    "applied to the wrong tokens. Keep these layers dense (no attention=) under enable_parallelism"
)


def context_parallel(model) -> bool:
    """Whether diffusers' ``enable_parallelism`` gave ``model`` context parallelism (it records the config there)."""
    return context_parallel_config(model) is not None


def grid_hook(ctx: GridContext, infer):
    from diffusers.hooks import ModelHook  # noqa: PLC0415

    class GridHook(ModelHook):
        _is_stateful = False

        def pre_forward(self, module, *args, **kwargs):
            if context_parallel(module):  # enable_parallelism after ditkern.patch(..., attention=...)
                raise NotImplementedError(f"ditkern window attention: {CONTEXT_PARALLEL_REASON}")
            grid, n_image, ctx.text = infer(module, args, kwargs, read_ids=ctx.fixed is None)
            if ctx.fixed is not None:
                if math.prod(ctx.fixed) != n_image:
                    raise ValueError(
                        f"ditkern window attention: WindowAttention(grid={ctx.fixed}) holds {math.prod(ctx.fixed)} "
                        f"tokens but the model was called with {n_image} image tokens: grid does not match"
                    )
                grid = ctx.fixed
            if grid is None:
                raise ValueError(
                    f"ditkern window attention: the image tokens of {type(module).__name__} do not form one "
                    "raster-ordered grid (FLUX img_ids missing, or e.g. Kontext reference images appended); pass "
                    "WindowAttention(grid=...) or keep those layers dense"
                )
            ctx.grid = tuple(grid)
            return args, kwargs

        def post_forward(self, module, output):
            ctx.grid = None
            return output

    return GridHook()
