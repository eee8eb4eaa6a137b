"""Bench cases for window_attention: ditkern's kernel (token and tile granularity) vs dense SDPA (flash backend) and
flex_attention with the same block mask.

Shapes (B=1, heads x 128): flux_1024 (64x64 image tokens + 512 text, 24 heads), flux_2048 (128x128 + 512),
flux_4096 (256x256 + 512), wan_720p_81f (21x45x80 latent tokens, 40 heads, no text: Wan's text is in its
cross-attention). Windows: fractions of the side (odd), e.g. ``q25`` = 25% of each spatial side. Each row carries
``sparsity`` (fraction of the dense score matrix skipped) and ``ideal_speedup = 1 / (1 - sparsity)``; the achieved
fraction of the ideal is ``speedup_vs_sdpa / ideal_speedup`` (bench/attention_report.py tabulates it).
FLOPs counted: 4 * kept scores * Dh per head (QK^T and PV). Bytes: q, k, v read and out written once.
"""

from __future__ import annotations

import functools
import math

import torch

from bench.registry import Case, register
from ditkern.ops.window_attention import make_spec, window_attention, window_mask, window_sparsity

# name -> (grid, text tokens, heads, head dim)
ATTN_SHAPES = {
    "flux_1024": ((64, 64), 512, 24, 128),
    "flux_2048": ((128, 128), 512, 24, 128),
    "flux_4096": ((256, 256), 512, 24, 128),
    "wan_720p_81f": ((21, 45, 80), 0, 40, 128),
}
# window as a fraction of each spatial side (Wan: 3 frames in time)
FRACTIONS = {"q12": 0.125, "q25": 0.25, "q50": 0.5}
SHAPES = {f"{name}/{wname}": (name, wname) for name in ATTN_SHAPES for wname in FRACTIONS}
QUICK_SHAPES: dict = {}  # the attention cases do not fit the interpreter; tests/attention/test_bench_cases.py runs them tiny


def window_for(grid, fraction: float, granularity: str = "token", tile=None):
    """Odd per-axis window ~fraction of each spatial side; with tile granularity an odd number of tiles."""
    spatial = grid[-2:]
    tile = tile or ((8, 8) if len(grid) == 2 else (1, 8, 8))
    out = []
    for n, t in zip(spatial, tile[-2:]):
        if granularity == "tile":
            k = max(1, round(n * fraction / t))
            out.append((k if k % 2 else k + 1) * t)
        else:
            w = max(1, round(n * fraction))
            out.append(w if w % 2 else w + 1)
    if len(grid) == 3:
        out.insert(0, 3)
    return tuple(out)


def _inputs(grid, T, H, D, device, dtype):
    S = T + math.prod(grid)
    g = torch.Generator(device="cpu").manual_seed(0)
    return {n: torch.randn(1, H, S, D, generator=g).to(device=device, dtype=dtype) for n in ("q", "k", "v")}


@functools.cache
def _flex_block_mask(grid, window, T, granularity, tile, device):
    from torch.nn.attention.flex_attention import create_block_mask  # noqa: PLC0415

    spec = make_spec(grid, window, granularity=granularity, tile=tile)
    GT, GH, GW = spec.grid
    WT, WH, WW = spec.window
    TT, TH, TW = spec.tile
    N = spec.n_image

    def mask_mod(b, h, qi, ki):
        # text first; image tokens in raster order
        q_img, k_img = qi - T, ki - T
        qt, qh, qw = q_img // (GH * GW), (q_img // GW) % GH, q_img % GW
        kt, kh, kw = k_img // (GH * GW), (k_img // GW) % GH, k_img % GW

        def inside(qc, kc, n, w, t):
            if granularity == "tile":
                nt = (n + t - 1) // t
                wt = min(nt if w >= n else w // t, nt)
                s = ((qc // t) - wt // 2).clamp(0, nt - wt)
                return ((kc // t) >= s) & ((kc // t) < s + wt)
            s = (qc - w // 2).clamp(0, n - w)
            return (kc >= s) & (kc < s + w)

        local = inside(qt, kt, GT, WT, TT) & inside(qh, kh, GH, WH, TH) & inside(qw, kw, GW, WW, TW)
        return (qi < T) | (ki < T) | local

    return create_block_mask(mask_mod, 1, 1, T + N, T + N, device=device)


def flex_unavailable(device) -> str | None:
    """Why the flex_attention baseline cannot run on ``device`` (None: it can). It is a GPU baseline: compiled
    flex_attention needs a CUDA device (on CPU inductor takes minutes per shape and times nothing we compare)."""
    if str(device).split(":")[0] != "cuda":
        return "flex_attention baseline skipped: GPU-only (compiled flex_attention on CPU is not the comparison)"
    try:
        import torch.nn.attention.flex_attention  # noqa: F401, PLC0415
    except ImportError as exc:
        return f"flex_attention baseline skipped: torch {torch.__version__} has no flex_attention ({exc})"
    return None


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

    return torch.compile(flex_attention, dynamic=False)


def _flex_run(i, grid, window, T, granularity):
    reason = flex_unavailable(i["q"].device)
    if reason:
        raise RuntimeError(reason)  # bench.run records the message as the row's note
    mask = _flex_block_mask(grid, window, T, granularity, None, str(i["q"].device))
    return _flex()(i["q"], i["k"], i["v"], block_mask=mask)


def _sdpa_flash(i):
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    backends = [SDPBackend.FLASH_ATTENTION] if i["q"].is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return torch.nn.functional.scaled_dot_product_attention(i["q"], i["k"], i["v"])


def register_cases(shapes: dict) -> None:
    for label, (name, wname) in shapes.items():
        grid, T, H, D = ATTN_SHAPES[name]
        for gran in ("token", "tile"):
            window = window_for(grid, FRACTIONS[wname], gran)
            sparsity = window_sparsity(grid, window, text_tokens=T, granularity=gran)
            S = T + math.prod(grid)
            kept = (1 - sparsity) * S * S
            dims = dict(B=1, S=S, H=H, Dh=D, grid="x".join(map(str, grid)), text=T, window="x".join(map(str, window)),
                        granularity=gran, sparsity=round(sparsity, 4), ideal_speedup=round(1 / (1 - sparsity), 3))  # fmt: skip
            kw = dict(grid=grid, window=window, text_tokens=T, granularity=gran)
            impls = {
                "ditkern": lambda i, kw=kw: window_attention(i["q"], i["k"], i["v"], **kw),
                "sdpa": _sdpa_flash,
                # same rule as ours: NATTEN-clamped (or whole-tile) window, text tokens global (first)
                "flex": functools.partial(_flex_run, grid=grid, window=window, T=T, granularity=gran),
            }
            register(
                Case(
                    op="window_attention" if gran == "token" else "window_attention_tile",
                    shape=label,
                    dims=dims,
                    make_inputs=functools.partial(_make, grid, T, H, D),
                    impls=impls,
                    bytes_moved=lambda i: 4 * i["q"].numel() * i["q"].element_size(),
                    flops=lambda i, kept=kept, H=H, D=D: int(4 * kept * H * D),
                    baseline_names=("sdpa", "flex"),
                    tags={"attention"},
                )
            )


def _make(grid, T, H, D, device, dtype):
    return _inputs(grid, T, H, D, device, dtype)


def dense_mask_sdpa(i, grid, window, T):
    """Dense SDPA with the boolean mask (the reference computation, for the CPU-fallback comparison)."""
    m = window_mask(grid, window, text_tokens=T, device=i["q"].device)
    return torch.nn.functional.scaled_dot_product_attention(i["q"], i["k"], i["v"], attn_mask=m)
