"""The benchmark registry.

A :class:`Case` is one op at one named shape. It builds its inputs, names the implementations to time (ditkern's
and the baselines: eager torch, ``torch.compile`` of the same computation, a peer library where one exists) and the
bytes and FLOPs one call must move at least, from which GB/s, TFLOP/s and % of peak follow. Op files in
``bench/ops/`` register their cases on import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Shapes named after real models (STYLE.md). tokens = image tokens + text tokens where the model concatenates them.
SHAPES = {
    "flux_1024": dict(B=1, S=4096 + 512, D=3072),  # FLUX.1 1024x1024: 64x64 latent tokens + 512 T5 tokens
    "sd3_1024": dict(B=1, S=4096 + 333, D=1536),  # SD3-medium: 24 heads x 64; 77 CLIP + 256 T5 tokens
    "pixart_1024": dict(B=1, S=4096, D=1152),  # PixArt-Sigma 1024: 16 heads x 72
    "wan_720p": dict(B=1, S=21 * 45 * 80, D=5120),  # Wan 2.1 14B, 1280x720, 81 frames: 21x45x80 latent tokens
}
# Interpreter-sized stand-ins, so the harness itself runs in CI (named after what they shrink).
QUICK_SHAPES = {"flux_1024": dict(B=1, S=64, D=384), "wan_720p": dict(B=1, S=48, D=640)}

# The short GPU tier (``python -m bench.run --tier b``, tier b of bench/gpu_suite.sh): per op, the shape(s) its
# TARGETS.md target is judged at, so one lease measures every op against its baselines in about two minutes.
# fpx_gemm gets two: M=4608 (FLUX's token count: the FP8 tensor-core GEMM) and M=16 (the memory-bound GEMV, which is
# where the weight rotation matters and where the CUDA GEMV runs). An op missing here gets its first shape.
TIER_B = {
    "adaln_modulate": ("flux_1024",),
    "gated_residual_adaln": ("flux_1024",),
    "adaln_modulate_fp8": ("flux_1024",),
    "taylor_update": ("flux_1024",),
    "taylor_forecast": ("flux_1024",),
    "fpx_gemm": ("flux_1024_qkv_M4608", "flux_1024_qkv_M16"),
    "linear_attention": ("sana_S4k",),
    "moe_layer": ("hidream_full",),
    "window_attention": ("flux_4096/q25",),
    "window_attention_tile": ("flux_4096/q25",),
}


@dataclass
class Case:
    op: str
    shape: str
    dims: dict
    make_inputs: Callable[[str, torch.dtype], dict]
    impls: dict[str, Callable[[dict], object]]  # name -> fn(inputs); "ditkern*" are ours, the rest baselines
    bytes_moved: Callable[[dict], int]
    flops: Callable[[dict], int] = lambda inputs: 0
    baseline_names: tuple[str, ...] = ("eager", "compile")
    tags: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"{self.op}[{self.shape}]"


REGISTRY: list[Case] = []


def register(case: Case) -> Case:
    REGISTRY.append(case)
    return case


def load_all(quick: bool = False) -> list[Case]:
    """Import every op's bench file (``bench/ops/*.py`` with a ``register_cases(shapes)``) and return the cases.

    quick: the interpreter-sized shapes only. A bench file may define its own ``SHAPES`` / ``QUICK_SHAPES`` (GEMM and
    attention shapes differ from the row-wise ones above); otherwise it gets the shared ones.
    """
    import importlib  # noqa: PLC0415
    import pkgutil  # noqa: PLC0415

    import bench.ops  # noqa: PLC0415

    REGISTRY.clear()
    for info in sorted(pkgutil.iter_modules(bench.ops.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"bench.ops.{info.name}")
        if hasattr(mod, "register_cases"):
            own = getattr(mod, "QUICK_SHAPES" if quick else "SHAPES", None)
            mod.register_cases(own if own is not None else (QUICK_SHAPES if quick else SHAPES))
    return list(REGISTRY)


def tier_b_shapes(cases: list[Case]) -> dict[str, tuple[str, ...]]:
    """op -> the tier-b shapes among ``cases``: ``TIER_B``'s where registered, else the op's first shape."""
    by_op: dict[str, list[str]] = {}
    for c in cases:
        by_op.setdefault(c.op, []).append(c.shape)
    out = {}
    for op, shapes in by_op.items():
        named = tuple(s for s in TIER_B.get(op, ()) if s in shapes)
        out[op] = named or (shapes[0],)
    return out
