"""Windowed (2D/3D neighbourhood) attention with global text tokens.

``window_attention(q, k, v, grid=(h, w) | (t, h, w), window=..., text_tokens=T, text_position="first"|"last")``

The sequence holds ``T`` text tokens (first or last) and ``prod(grid)`` image tokens in raster order (``t``, then
``h``, then ``w``). Each image query attends to the image keys of its neighbourhood plus every (valid) text key; each
text query attends to every valid key. ``text_mask`` (``[B, T]`` bool, True = real token) removes padded text keys,
for variable-length prompts in one batch.

Neighbourhoods (``shape`` x ``granularity``):

- ``shape="rect"``, ``granularity="token"`` (default): NATTEN-style (Hassani et al., arXiv 2204.07143): per axis of
  size ``n`` with window ``w`` (odd), the query at ``c`` sees keys ``[s, s + w)`` with ``s = clamp(c - w//2, 0,
  n - w)``: clamped at the borders, so every query sees exactly ``w`` keys per axis. ``w >= n`` is the whole axis.
- ``shape="circle"``: CLEAR's circular window (arXiv 2412.16112): keys within the ellipse
  ``sum_a (d_a / r_a)^2 <= 1``, ``r_a = w_a // 2`` (an axis with ``w_a = 1`` must match exactly); not clamped, so
  border queries see fewer keys, as in CLEAR.
- ``granularity="tile"``: Sliding Tile Attention (arXiv 2502.04507): the grid is cut into tiles of shape ``tile``
  (the kernel's query/key block), and every query of a tile attends to the same ``w_a / tile_a`` whole key tiles per
  axis (odd count, clamped at the borders like NATTEN), so no key block is partially masked except at the grid edge.

Layout: q/k/v ``[B, H, S, Dh]`` (the layout ``F.scaled_dot_product_attention`` takes, which is what the attention
processors hand over; any strides), output ``[B, H, S, Dh]`` contiguous in q's dtype. Softmax statistics and
accumulation are fp32.

Backends: triton (flash-style kernel that visits only the key tiles intersecting the tile's window, 2D/3D query
tiles) and torch (the CPU path: chunked masked SDPA over query boxes with only the key box each needs; measured
against flex_attention and dense masked SDPA in bench/results/attention/cpu_fallback.md). ``window_attention_ref``
(dense SDPA with the boolean mask from :func:`window_mask`) defines the semantics and is the oracle of the tests.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ditkern._backend import choose, device_capability, max_shared_memory, requested_backend, triton_can_run_on
from ditkern.kernels.window_ranges import key_range as _key_range

SHAPES = ("rect", "circle")
GRANULARITIES = ("token", "tile")
TEXT_POSITIONS = ("first", "last")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_TILE_2D = (8, 8)
DEFAULT_TILE_3D = (1, 8, 8)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------------------------------
# the window specification (validated once; errors name the argument)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowSpec:
    """A validated window over a 3-D grid (2-D grids get a leading axis of size 1)."""

    grid: tuple[int, int, int]
    window: tuple[int, int, int]  # effective per-axis window (clamped to the axis size for rect/tile)
    shape: str
    granularity: str
    tile: tuple[int, int, int]
    dims: int  # 2 or 3: what the caller passed

    @property
    def n_image(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def radius(self) -> tuple[int, int, int]:
        return tuple(w // 2 for w in self.window)

    def circle_weights(self) -> tuple[tuple[int, int, int], int]:
        """Integer form of ``sum_a (d_a / r_a)^2 <= 1``: ``sum_a d_a^2 * c_a <= R`` (exact, no float rounding)."""
        r = self.radius()
        R = 1
        for ra in r:
            if ra > 0:
                R *= ra * ra
        c = tuple((R // (ra * ra)) if ra > 0 else R + 1 for ra in r)
        return c, R

    def tiles_per_axis(self) -> tuple[int, int, int]:
        return tuple(-(-n // t) for n, t in zip(self.grid, self.tile))


def _as_tuple(value, name: str, dims: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * dims
    try:
        vals = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a tuple of {dims} ints, got {value!r}") from None
    if len(vals) != dims or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise ValueError(f"{name} must be an int or a tuple of {dims} ints (one per grid axis), got {value!r}")
    return vals


def make_spec(grid, window, *, shape: str = "rect", granularity: str = "token", tile=None) -> WindowSpec:
    """Validate ``grid``/``window``/``shape``/``granularity``/``tile``; errors name the argument."""
    try:
        g = tuple(grid)
    except TypeError:
        raise TypeError(f"grid must be a tuple (h, w) or (t, h, w), got {grid!r}") from None
    if len(g) not in (2, 3) or not all(isinstance(v, int) and not isinstance(v, bool) for v in g):
        raise ValueError(f"grid must be a tuple of 2 or 3 ints (h, w) or (t, h, w), got {grid!r}")
    if any(v < 1 for v in g):
        raise ValueError(f"grid sizes must be >= 1, got grid={g}")
    dims = len(g)
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    w = _as_tuple(window, "window", dims)
    if any(v < 1 for v in w):
        raise ValueError(f"window must be >= 1 on every axis (zero or negative windows are meaningless), got window={window!r}")
    if tile is not None:
        t = _as_tuple(tile, "tile", dims)
    elif granularity == "token" and all(isinstance(v, int) and v >= 1 for v in w):
        t = auto_tile(g, w, shape)
    else:
        t = DEFAULT_TILE_2D if dims == 2 else DEFAULT_TILE_3D
    if any(v < 1 or (v & (v - 1)) for v in t):
        raise ValueError(f"tile sizes must be powers of two (the kernel's block shape), got tile={t}")
    if math.prod(t) < 16 or math.prod(t) > 256:
        raise ValueError(f"tile must hold 16 to 256 tokens (a tensor-core block), got tile={t} ({math.prod(t)} tokens)")
    if granularity == "tile":
        if shape != "rect":
            raise ValueError("granularity='tile' takes shape='rect' (whole key tiles); circle windows are token-granular")
        for a, (wa, ta, na) in enumerate(zip(w, t, g)):
            if wa >= na:
                continue  # the whole axis
            if wa % ta or (wa // ta) % 2 == 0:
                raise ValueError(
                    f"window={window!r}: with granularity='tile' each window must be an odd number of tiles "
                    f"(axis {a}: window {wa}, tile {ta}); e.g. window={ta * 3} on that axis"
                )
    else:
        for a, (wa, na) in enumerate(zip(w, g)):
            if wa % 2 == 0 and wa < na:
                raise ValueError(
                    f"window={window!r}: windows must be odd (a neighbourhood centred on the query), axis {a} has {wa}"
                )
    if dims == 2:
        g, w, t = (1, *g), (1, *w), (1, *t)
    if shape == "rect":
        w = tuple(min(wa, na) for wa, na in zip(w, g))
    return WindowSpec(grid=g, window=w, shape=shape, granularity=granularity, tile=t, dims=dims)


_TILES_2D = ((8, 8), (4, 16), (16, 4), (2, 32), (32, 2))
_TILES_3D = ((1, 8, 8), (1, 4, 16), (1, 16, 4), (2, 4, 8), (2, 8, 4), (4, 4, 4), (1, 2, 32))


@functools.lru_cache(maxsize=256)
def auto_tile(grid: tuple[int, ...], window: tuple[int, ...], shape: str = "rect") -> tuple[int, ...]:
    """The 64-token query tile (token granularity only: there the tile is a speed choice, not semantics) that
    minimises the key-tile work of the kernel: sum over query tiles of the key tiles covering their window box.

    The box of a query tile is a product of per-axis ranges, so the total is the product over axes of per-axis sums.
    """
    g = (1, *grid) if len(grid) == 2 else tuple(grid)
    w = (1, *window) if len(window) == 2 else tuple(window)
    if shape == "rect":
        w = tuple(min(a, n) for a, n in zip(w, g))
    best, best_cost = None, None
    for cand in _TILES_2D if len(grid) == 2 else _TILES_3D:
        t = (1, *cand) if len(cand) == 2 else cand
        spec = WindowSpec(g, w, shape, "token", t, 3)
        cost = 1
        for a in range(3):
            axis = 0
            for c0 in range(0, g[a], t[a]):
                lo, hi = _key_range(spec, a, c0, min(c0 + t[a], g[a]) - 1)
                axis += -(-(hi - lo) // t[a]) * t[a]
            cost *= axis
        if best_cost is None or cost < best_cost:
            best, best_cost = cand, cost
    return best


# ----------------------------------------------------------------------------------------------------------------------
# which image keys an image query sees (shared by the mask builder and the chunked CPU path)
# ----------------------------------------------------------------------------------------------------------------------
def _coords(spec: WindowSpec, device) -> torch.Tensor:
    """``[N, 3]`` int64 (t, h, w) coordinates of the image tokens in raster order."""
    T, H, W = spec.grid
    idx = torch.arange(T * H * W, device=device)
    return torch.stack((idx // (H * W), (idx // W) % H, idx % W), dim=-1)


def _allowed(spec: WindowSpec, qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
    """``[Nq, Nk]`` bool: may the image query at ``qc`` ([Nq, 3]) attend to the image key at ``kc`` ([Nk, 3])."""
    ok = torch.ones(qc.shape[0], kc.shape[0], dtype=torch.bool, device=qc.device)
    if spec.shape == "circle":
        c, R = spec.circle_weights()
        dist = torch.zeros(qc.shape[0], kc.shape[0], dtype=torch.int64, device=qc.device)
        for a in range(3):
            d = qc[:, a, None] - kc[None, :, a]
            dist += d * d * c[a]
        return dist <= R
    for a in range(3):
        n, w = spec.grid[a], spec.window[a]
        if spec.granularity == "tile":
            ta = spec.tile[a]
            nt = -(-n // ta)
            wt = min(-(-w // ta) if w >= n else w // ta, nt)
            start = (qc[:, a] // ta - wt // 2).clamp(0, nt - wt)
            kt = kc[:, a] // ta
            ok &= (kt[None, :] >= start[:, None]) & (kt[None, :] < start[:, None] + wt)
        else:
            start = (qc[:, a] - w // 2).clamp(0, n - w)
            ok &= (kc[None, :, a] >= start[:, None]) & (kc[None, :, a] < start[:, None] + w)
    return ok


def _text_layout(spec: WindowSpec, text_tokens: int, text_position: str) -> tuple[int, int]:
    """(offset of the image tokens, offset of the text tokens) in the sequence."""
    if text_position == "first":
        return text_tokens, 0
    return 0, spec.n_image


def window_mask(
    grid,
    window,
    *,
    text_tokens: int = 0,
    text_position: str = "first",
    text_mask: torch.Tensor | None = None,
    shape: str = "rect",
    granularity: str = "token",
    tile=None,
    device=None,
) -> torch.Tensor:
    """The boolean attention mask (True = attend) of :func:`window_attention`: ``[1 or B, 1, S, S]``, ``S = T +
    prod(grid)``; batch-dependent only through ``text_mask`` (``[B, T]``, True = real token)."""
    spec = make_spec(grid, window, shape=shape, granularity=granularity, tile=tile)
    return _mask(spec, text_tokens, text_position, text_mask, device)


def _mask(spec, text_tokens, text_position, text_mask, device):
    T, N = text_tokens, spec.n_image
    S = T + N
    img, txt = _text_layout(spec, T, text_position)
    c = _coords(spec, device)
    mask = torch.ones(S, S, dtype=torch.bool, device=device)
    mask[img : img + N, img : img + N] = _allowed(spec, c, c)
    mask = mask[None, None]
    if text_mask is not None:
        keys = torch.ones(text_mask.shape[0], S, dtype=torch.bool, device=device)
        keys[:, txt : txt + T] = text_mask.to(device=device, dtype=torch.bool)
        mask = mask & keys[:, None, None, :]
    return mask


# ----------------------------------------------------------------------------------------------------------------------
# reference (fp32): dense SDPA with the boolean mask
# ----------------------------------------------------------------------------------------------------------------------
def window_attention_ref(
    q, k, v, *, grid, window, text_tokens=0, text_position="first", text_mask=None, scale=None, shape="rect",
    granularity="token", tile=None,
) -> torch.Tensor:  # fmt: skip
    """Dense attention with the :func:`window_mask` mask, in fp32; returns q's dtype, ``[B, H, S, Dh]``."""
    spec = make_spec(grid, window, shape=shape, granularity=granularity, tile=tile)
    mask = _mask(spec, text_tokens, text_position, text_mask, q.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=scale
    )
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# torch backend (the CPU path): chunked masked SDPA, each query box against only the keys its window can reach
# ----------------------------------------------------------------------------------------------------------------------
CHUNK_TOKENS = 256  # query tokens per SDPA call (bounds the [chunk, key box] mask and scores)


def _chunk_shape(spec: WindowSpec) -> tuple[int, int, int]:
    """Query box per chunk, grown by doubling the axis that is smallest relative to its window, so the box stays
    shaped like the window and the key box it needs (box + window - 1 per axis) stays small."""
    c = [1, 1, 1]
    while math.prod(c) < CHUNK_TOKENS:
        axes = [a for a in range(3) if c[a] < spec.grid[a]]
        if not axes:
            break
        a = min(axes, key=lambda a: (c[a] / spec.window[a], -a))
        c[a] = min(spec.grid[a], c[a] * 2)
    return c[0], c[1], c[2]


def window_attention_chunked(q, k, v, spec: WindowSpec, text_tokens, text_position, text_mask, scale):
    """Same result as the reference, with memory and FLOPs bounded by the key box of each query chunk.

    Computes in fp32 (the CPU has no fast half-precision SDPA) and returns q's dtype.
    """
    B, Hh, S, Dh = q.shape
    T, N = text_tokens, spec.n_image
    img, txt = _text_layout(spec, T, text_position)
    qf, kf, vf = q.float(), k.float(), v.float()
    out = torch.empty(B, Hh, S, Dh, dtype=torch.float32, device=q.device)
    key_ok = None
    if text_mask is not None:
        key_ok = text_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]  # [B, 1, 1, T]
    if T:
        tm = None
        if key_ok is not None:
            tm = torch.ones(B, 1, 1, S, dtype=torch.bool, device=q.device)
            tm[..., txt : txt + T] = key_ok
        out[:, :, txt : txt + T] = torch.nn.functional.scaled_dot_product_attention(
            qf[:, :, txt : txt + T], kf, vf, attn_mask=tm, scale=scale
        )
    Tg, Hg, Wg = spec.grid
    ct, ch, cw = _chunk_shape(spec)
    text_idx = torch.arange(txt, txt + T, device=q.device)
    for t0 in range(0, Tg, ct):
        for h0 in range(0, Hg, ch):
            for w0 in range(0, Wg, cw):
                q_box = [(t0, min(t0 + ct, Tg)), (h0, min(h0 + ch, Hg)), (w0, min(w0 + cw, Wg))]
                k_box = [_key_range(spec, a, lo, hi - 1) for a, (lo, hi) in enumerate(q_box)]
                qc = _box_coords(q_box, q.device)
                kc = _box_coords(k_box, q.device)
                q_idx = img + (qc[:, 0] * Hg + qc[:, 1]) * Wg + qc[:, 2]
                k_idx = img + (kc[:, 0] * Hg + kc[:, 1]) * Wg + kc[:, 2]
                m = _allowed(spec, qc, kc)[None, None]  # [1, 1, nq, nk]
                if T:
                    k_idx = torch.cat((k_idx, text_idx))
                    tm = key_ok if key_ok is not None else torch.ones(1, 1, 1, T, dtype=torch.bool, device=q.device)
                    m = torch.cat((m.expand(tm.shape[0], 1, -1, -1), tm.expand(-1, -1, m.shape[2], -1)), dim=-1)
                out[:, :, q_idx] = torch.nn.functional.scaled_dot_product_attention(
                    qf[:, :, q_idx], kf[:, :, k_idx], vf[:, :, k_idx], attn_mask=m, scale=scale
                )
    return out.to(q.dtype)


def _box_coords(box, device) -> torch.Tensor:
    axes = [torch.arange(lo, hi, device=device) for lo, hi in box]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


# ----------------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------------
def _check(q, k, v, spec: WindowSpec, text_tokens, text_position, text_mask, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, S, Dh], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k and v must have q's shape {tuple(q.shape)}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on one device")
    if not isinstance(text_tokens, int) or isinstance(text_tokens, bool) or text_tokens < 0:
        raise ValueError(f"text_tokens must be an int >= 0, got {text_tokens!r}")
    if text_position not in TEXT_POSITIONS:
        raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {text_position!r}")
    S = q.shape[2]
    if text_tokens + spec.n_image != S:
        g = spec.grid[1:] if spec.dims == 2 else spec.grid
        raise ValueError(
            f"grid={g} holds {spec.n_image} image tokens, plus text_tokens={text_tokens} that is "
            f"{spec.n_image + text_tokens}, but q has S={S} tokens: grid does not match the sequence length"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} exceeds {MAX_HEAD_DIM}")
    if text_mask is not None:
        if not isinstance(text_mask, torch.Tensor) or text_mask.shape != (q.shape[0], text_tokens):
            shape = tuple(text_mask.shape) if isinstance(text_mask, torch.Tensor) else type(text_mask).__name__
            raise ValueError(f"text_mask must be a [B, T] = [{q.shape[0]}, {text_tokens}] bool tensor, got {shape}")
        if text_mask.device != q.device:
            raise ValueError(f"text_mask is on {text_mask.device} but q is on {q.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")


# ----------------------------------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------------------------------
def _cuda_can_run(q, *others) -> str | None:
    return (
        "no CUDA C++ window-attention kernel: the Triton kernel is the GPU path (docs/attention.md says why and what "
        "a CUDA variant owes)"
    )


def _triton_can_run(q, *others, spec: WindowSpec | None = None) -> str | None:
    reason = triton_can_run_on(q)
    if reason or spec is None:
        return reason
    from ditkern.kernels.window_attention import launch_config  # noqa: PLC0415

    config = launch_config(math.prod(spec.tile), q.shape[-1], q.element_size(), device_capability(q.device),
                           max_shared_memory(q.device))  # fmt: skip
    return config if isinstance(config, str) else None


def _torch_can_run(q, *others) -> str | None:
    return None


BACKENDS = {"cuda": _cuda_can_run, "triton": _triton_can_run, "torch": _torch_can_run}
OP_NAMES = "window_attention"


def info_sample(device, dtype):
    """Sample inputs for ``python -m ditkern info`` (FLUX heads: 24 x 128)."""
    return (torch.empty(1, 24, 64, 128, device=device, dtype=dtype),)


def _run(q, k, v, text_mask, grid, window, text_tokens, text_first, scale, shape, granularity, tile, backend):
    spec = WindowSpec(tuple(grid), tuple(window), shape, granularity, tuple(tile), 3)
    position = "first" if text_first else "last"
    backends = {**BACKENDS, "triton": functools.partial(_triton_can_run, spec=spec)}
    name = choose("window_attention", backends, q, k, v, backend=backend)
    if name == "torch":
        return window_attention_chunked(q, k, v, spec, text_tokens, position, text_mask, scale)
    from ditkern.kernels.window_attention import window_attention_triton  # noqa: PLC0415

    return window_attention_triton(q, k, v, spec, text_tokens, position, text_mask, scale)


@torch.library.custom_op("ditkern::window_attention", mutates_args=())
def _window_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_mask: torch.Tensor | None,
    grid: list[int],
    window: list[int],
    text_tokens: int,
    text_first: bool,
    scale: float,
    shape: str,
    granularity: str,
    tile: list[int],
    backend: str,
) -> torch.Tensor:
    return _run(q, k, v, text_mask, grid, window, text_tokens, text_first, scale, shape, granularity, tile, backend)


@_window_attention_op.register_fake
def _(q, k, v, text_mask, grid, window, text_tokens, text_first, scale, shape, granularity, tile, backend):
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------------
def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, ...],
    window: int | tuple[int, ...],
    text_tokens: int = 0,
    text_position: str = "first",
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
    shape: str = "rect",
    granularity: str = "token",
    tile: tuple[int, ...] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Neighbourhood attention over a 2D/3D token grid plus global text tokens. See the module docstring.

    ``q``/``k``/``v``: ``[B, H, S, Dh]`` with ``S = text_tokens + prod(grid)``. ``window``: odd int or one odd int
    per axis (``granularity="tile"``: an odd number of tiles per axis). ``text_mask``: ``[B, T]`` bool, True =
    real text token. ``backend``: None (``DITKERN_BACKEND`` or auto), "auto", "cuda", "triton" or "torch".
    """
    spec = make_spec(grid, window, shape=shape, granularity=granularity, tile=tile)
    _check(q, k, v, spec, text_tokens, text_position, text_mask, scale)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _window_attention_op(
        q, k, v, text_mask, list(spec.grid), list(spec.window), text_tokens, text_position == "first", scale,
        spec.shape, spec.granularity, list(spec.tile), requested_backend(backend),
    )  # fmt: skip


def window_sparsity(grid, window, *, text_tokens: int = 0, shape="rect", granularity="token", tile=None) -> float:
    """Fraction of the dense ``S x S`` score matrix the window skips (the ideal speedup is ``1 / (1 - sparsity)``).

    Computed per axis (the window is a product of per-axis ranges for rect shapes), so it is cheap at 75k tokens.
    """
    spec = make_spec(grid, window, shape=shape, granularity=granularity, tile=tile)
    N, T = spec.n_image, text_tokens
    S = N + T
    if spec.shape == "circle":
        c = _coords(spec, "cpu")
        seen = sum(int(_allowed(spec, c[i : i + 4096], c).sum()) for i in range(0, N, 4096))
    else:
        seen = 1
        for a in range(3):
            n = spec.grid[a]
            cs = torch.arange(n)
            ks = torch.arange(n)
            one = WindowSpec((n, 1, 1), (spec.window[a], 1, 1), "rect", spec.granularity, (spec.tile[a], 1, 1), 3)
            seen *= int(_allowed(one, torch.stack((cs, 0 * cs, 0 * cs), -1), torch.stack((ks, 0 * ks, 0 * ks), -1)).sum())
    dense = S * S
    kept = seen + N * T + T * S
    return 1.0 - kept / dense
