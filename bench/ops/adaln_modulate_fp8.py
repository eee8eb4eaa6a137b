"""Bench cases for adaln_modulate_fp8: the modulated norm that also emits its per-token FP8 (E4M3) form for W4A8 /
W6A8 layers. Baselines: eager torch (layer_norm, modulate, then per-token absmax quantization to E4M3) and
torch.compile of it. Minimum bytes: read x, write out (x's dtype) + xq (1 byte/element) + scales.
GPU-only (no interpreter-sized shapes: the CPU harness test covers the row-wise adaLN cases).
"""

from __future__ import annotations

import functools

import torch

from bench.ops.adaln_modulate import _compiled, _inputs, eager_adaln
from bench.registry import Case, register
from ditkern.ops.adaln_modulate_fp8 import adaln_modulate_fp8

QUICK_SHAPES: dict = {}


def eager_adaln_fp8(x, shift, scale):
    out = eager_adaln(x, shift, scale)
    rows = out.reshape(-1, out.shape[-1]).float()
    sx = rows.abs().amax(dim=1).clamp_min(1e-12) / 448.0
    xq = (rows / sx[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return out, xq, sx


def register_cases(shapes: dict) -> None:
    for shape, dims in shapes.items():
        B, S, D = dims["B"], dims["S"], dims["D"]
        register(
            Case(
                op="adaln_modulate_fp8",
                shape=shape,
                dims=dims,
                make_inputs=functools.partial(_make, B, S, D),
                impls={
                    "ditkern": lambda i: adaln_modulate_fp8(i["x"], i["shift"], i["scale"]),
                    "eager": lambda i: eager_adaln_fp8(i["x"], i["shift"], i["scale"]),
                    "compile": lambda i: _compiled(eager_adaln_fp8)(i["x"], i["shift"], i["scale"]),
                },
                bytes_moved=lambda i, B=B, S=S, D=D: B * S * D * (2 * i["x"].element_size() + 1) + 4 * B * S,
            )
        )


def _make(B, S, D, device, dtype):
    return _inputs(B, S, D, device, dtype, residual=False)
