"""Bench cases for adaln_modulate and gated_residual_adaln.

Baselines: the unfused eager sequence that diffusers runs in the model's dtype (layer_norm, then ``* (1 + scale) +
shift``; for the residual variant ``x + gate * y`` first), and ``torch.compile`` of that same function. Minimum bytes:
adaln_modulate reads x and writes out (2 x B*S*D elements); gated_residual_adaln reads x and y and writes h and out (4x).
The [B, 6*D] modulation vectors are negligible and not counted. ``ditkern`` is the automatic choice (CUDA where the
extension serves the shape, else Triton); ``ditkern-triton`` / ``ditkern-cuda`` force one (a backend that cannot run
is a row with its reason), so one run compares both kernels against the copy-bandwidth target (TARGETS.md).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bench.registry import Case, register
from ditkern.ops.adaln_modulate import adaln_modulate, gated_residual_adaln


def _inputs(B, S, D, device, dtype, residual):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, S, D, generator=g).to(device=device, dtype=dtype)
    emb = torch.randn(B, 6 * D, generator=g).to(device=device, dtype=dtype)
    shift, scale, gate = emb.chunk(6, dim=1)[:3]
    inputs = dict(x=x, shift=shift, scale=scale, gate=gate)
    if residual:
        inputs["y"] = torch.randn(B, S, D, generator=g).to(device=device, dtype=dtype)
    return inputs


def eager_adaln(x, shift, scale, gate=None):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def eager_gated(x, y, gate, shift, scale):
    h = x + gate[:, None] * y
    return h, F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def register_cases(shapes: dict) -> None:
    for shape, dims in shapes.items():
        B, S, D = dims["B"], dims["S"], dims["D"]
        elt_bytes = lambda inp: inp["x"].element_size()  # noqa: E731
        register(
            Case(
                op="adaln_modulate",
                shape=shape,
                dims=dims,
                make_inputs=functools.partial(_make, B, S, D, residual=False),
                impls={
                    "ditkern": lambda i: adaln_modulate(i["x"], i["shift"], i["scale"]),
                    "ditkern-triton": lambda i: adaln_modulate(i["x"], i["shift"], i["scale"], backend="triton"),
                    "ditkern-cuda": lambda i: adaln_modulate(i["x"], i["shift"], i["scale"], backend="cuda"),
                    "eager": lambda i: eager_adaln(i["x"], i["shift"], i["scale"]),
                    "compile": lambda i: _compiled(eager_adaln)(i["x"], i["shift"], i["scale"]),
                },
                bytes_moved=lambda i, B=B, S=S, D=D: 2 * B * S * D * elt_bytes(i),
            )
        )
        register(
            Case(
                op="gated_residual_adaln",
                shape=shape,
                dims=dims,
                make_inputs=functools.partial(_make, B, S, D, residual=True),
                impls={
                    "ditkern": lambda i: gated_residual_adaln(i["x"], i["y"], i["gate"], i["shift"], i["scale"]),
                    "ditkern-triton": lambda i: gated_residual_adaln(
                        i["x"], i["y"], i["gate"], i["shift"], i["scale"], backend="triton"
                    ),
                    "ditkern-cuda": lambda i: gated_residual_adaln(
                        i["x"], i["y"], i["gate"], i["shift"], i["scale"], backend="cuda"
                    ),
                    "eager": lambda i: eager_gated(i["x"], i["y"], i["gate"], i["shift"], i["scale"]),
                    "compile": lambda i: _compiled(eager_gated)(i["x"], i["y"], i["gate"], i["shift"], i["scale"]),
                },
                bytes_moved=lambda i, B=B, S=S, D=D: 4 * B * S * D * elt_bytes(i),
            )
        )


def _make(B, S, D, device, dtype, residual):
    return _inputs(B, S, D, device, dtype, residual)
