"""Bench cases for linear_attention: ditkern's Triton kernels vs dense SDPA (flash backend, softmax attention of the
same shape: the thing linear attention replaces) and vs diffusers' eager ``SanaLinearAttnProcessor2_0`` arithmetic
(relu, fp32 casts, a ones-padded value, two fp32 matmuls).

Shapes: Sana 1600M self-attention (70 heads x 32, B=1), S from 1k to 64k tokens (Sana 4K: 128x128 = 16k tokens).
FLOPs: 4 * S * Dh^2 per head (state and output passes). Bytes: q, k, v read and out written once.
"""

from __future__ import annotations

import functools

import torch

from bench.registry import Case, register
from ditkern.ops.linear_attention import linear_attention

SHAPES = {f"sana_S{s // 1024}k": dict(B=1, S=s, H=70, Dh=32) for s in (1024, 4096, 16384, 65536)}
QUICK_SHAPES: dict = {}  # see tests/attention/test_bench_cases.py for the interpreter-sized run


def sana_eager(q, k, v):
    """diffusers' SanaLinearAttnProcessor2_0 arithmetic on [B, H, S, Dh] inputs."""
    qf, kf, vf = torch.relu(q).float(), torch.relu(k).float(), v.float()
    vpad = torch.nn.functional.pad(vf.transpose(2, 3), (0, 0, 0, 1), mode="constant", value=1.0)
    out = (vpad @ kf) @ qf.transpose(2, 3)
    out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
    return out.transpose(2, 3).to(q.dtype)


def _sdpa_flash(i):
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if i["q"].is_cuda else [SDPBackend.MATH]):
        return torch.nn.functional.scaled_dot_product_attention(i["q"], i["k"], i["v"])


def _make(B, S, H, D, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    return {n: torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2) for n in "qkv"}


def register_cases(shapes: dict) -> None:
    for shape, d in shapes.items():
        B, S, H, D = d["B"], d["S"], d["H"], d["Dh"]
        register(
            Case(
                op="linear_attention",
                shape=shape,
                dims=d,
                make_inputs=functools.partial(_make, B, S, H, D),
                impls={
                    "ditkern": lambda i: linear_attention(i["q"], i["k"], i["v"]),
                    "sana_eager": lambda i: sana_eager(i["q"], i["k"], i["v"]),
                    "sdpa": _sdpa_flash,
                },
                bytes_moved=lambda i: 4 * i["q"].numel() * i["q"].element_size(),
                flops=lambda i, B=B, S=S, H=H, D=D: 4 * B * H * S * D * D,
                baseline_names=("sana_eager", "sdpa"),
                tags={"attention"},
            )
        )
