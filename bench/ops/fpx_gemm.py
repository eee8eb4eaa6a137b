"""Bench cases for the FP4/FP6 GEMMs (weight-only ``fpx_linear``, W4A8/W6A8 ``fpx_fp8_linear``) at DiT shapes.

Shapes: the QKV and MLP-up projections of real models (``flux_1024``: K=3072, N=9216 / 12288; ``sd3_1024``: K=1536,
N=4608 / 6144; ``pixart_1024``: K=1152, N=3456 / 4608; ``wan_720p``: K=5120, N=5120 / 13824), each at
M in {1, 16, 256, 4096, 16384} (plus the real token counts: flux 4608, sd3 4429) to show where weight-only
(memory-bound, small M) and FP8 (compute-bound, large M) win.
Baselines in the same run: cuBLAS bf16 (``torch.matmul`` with the bf16 weight) and ``torch._scaled_mm`` FP8 (rowwise
scales, activations and weights pre-quantized: the GEMM alone). ``ditkern-w4a8`` includes the activation
quantization; ``ditkern-w4a8-gemm`` is the GEMM alone on a pre-quantized activation, comparable to ``_scaled_mm``.
Minimum bytes: x (bf16) + packed weights + scales + out (bf16); FLOPs 2*M*N*K (TFLOP/s = flops / ms).
"""

from __future__ import annotations

import functools

import torch

from bench.registry import Case, register
from ditkern.ops.fpx_fp8_linear import fpx_fp8_linear, fpx_fp8_matmul
from ditkern.ops.fpx_linear import fpx_linear
from ditkern.ops.quantize_fp8 import quantize_fp8
from ditkern.quant.formats import quantize

GEMMS = {
    "flux_1024": [("qkv", 3072, 9216), ("mlp", 3072, 12288)],
    "sd3_1024": [("qkv", 1536, 4608), ("mlp", 1536, 6144)],
    "pixart_1024": [("qkv", 1152, 3456), ("mlp", 1152, 4608)],
    "wan_720p": [("q", 5120, 5120), ("ffn", 5120, 13824)],
}
MS = (1, 16, 256, 4096, 16384)
EXTRA_M = {"flux_1024": (4608,), "sd3_1024": (4429,)}  # the real token counts (image + text tokens)
SHAPES = {
    f"{model}_{proj}_M{M}": dict(M=M, K=K, N=N)
    for model, projs in GEMMS.items()
    for proj, K, N in projs
    for M in sorted(MS + EXTRA_M.get(model, ()))
}
QUICK_SHAPES: dict = {}  # GPU-sized only: tests/quant/test_bench_fpx.py runs the cases' torch paths at a tiny shape
G = 64


@functools.lru_cache(maxsize=2)  # the shapes run M-sweep by M-sweep: one (K, N) at a time, plus one spare
def _master_weights(K, N, device):
    """The weights of one (K, N), quantized once per run (on the device: the CPU takes ~10 s per format at FLUX's
    3072 x 12288). Never handed to a timed call directly: ``_make`` gives every input set its own copy."""
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(device)
    q4 = quantize(w, "fp4_e2m1", G)
    q6 = quantize(w, "fp6_e2m3", G)
    w8 = w.abs().amax(1, keepdim=True) / 448
    return dict(
        w_bf16=w.to(torch.bfloat16),
        q4=(q4.packed, q4.scales),
        q6=(q6.packed, q6.scales),
        w_fp8=(w / w8).to(torch.float8_e4m3fn),
        w_fp8_scale=w8.reshape(1, -1).float(),
    )


def _weights(K, N, device):
    """A fresh copy of every weight tensor, in its own storage. bench.run times each call on the next of several
    input sets; with shared (cached) weights only the activations rotated and a small-M GEMM, which reads little
    besides its weight, found the weight in L2 on every call (inflated GB/s)."""
    copy = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
    master = _master_weights(K, N, device)
    return {k: tuple(copy(t) for t in v) if isinstance(v, tuple) else copy(v) for k, v in master.items()}


def _make(M, K, N, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    inp = dict(x=x, K=K, N=N, **_weights(K, N, device))
    if device == "cuda":
        inp["xq"], inp["sx"] = quantize_fp8(x)
    return inp


def _wo(i, which, backend=None):
    p, s = i[which]
    fmt = "fp4_e2m1" if which == "q4" else "fp6_e2m3"
    return fpx_linear(i["x"], p, s, format=fmt, group_size=G, in_features=i["K"], backend=backend)


def _w8(i, which):
    p, s = i[which]
    fmt = "fp4_e2m1" if which == "q4" else "fp6_e2m3"
    return fpx_fp8_linear(i["x"], p, s, format=fmt, group_size=G, in_features=i["K"])


def _w8_gemm(i):
    p, s = i["q4"]
    return fpx_fp8_matmul(i["xq"], i["sx"], p, s, format="fp4_e2m1", group_size=G, in_features=i["K"],
                          out_dtype=i["x"].dtype)  # fmt: skip


def _scaled_mm(i):
    return torch._scaled_mm(i["xq"], i["w_fp8"].T, scale_a=i["sx"][:, None], scale_b=i["w_fp8_scale"],
                            out_dtype=torch.bfloat16)  # fmt: skip


def _bytes(i):
    M, K, N = i["x"].shape[0], i["K"], i["N"]
    p, s = i["q4"]
    return M * K * i["x"].element_size() + p.numel() + s.numel() * s.element_size() + M * N * i["x"].element_size()


def register_cases(shapes: dict) -> None:
    for shape, d in shapes.items():
        M, K, N = d["M"], d["K"], d["N"]
        impls = {
            "ditkern-w4": lambda i: _wo(i, "q4"),
            "ditkern-w6": lambda i: _wo(i, "q6"),
            "ditkern-w4a8": lambda i: _w8(i, "q4"),
            "ditkern-w6a8": lambda i: _w8(i, "q6"),
            "ditkern-w4a8-gemm": _w8_gemm,
            "cublas-bf16": lambda i: torch.matmul(i["x"], i["w_bf16"].T),
            "scaled_mm-fp8": _scaled_mm,
        }
        if M <= 16:
            impls["ditkern-w4-cuda"] = lambda i: _wo(i, "q4", backend="cuda")
        register(
            Case(
                op="fpx_gemm",
                shape=shape,
                dims=d,
                make_inputs=functools.partial(_make, M, K, N),
                impls=impls,
                bytes_moved=_bytes,
                flops=lambda i: 2 * i["x"].shape[0] * i["K"] * i["N"],
                baseline_names=("cublas-bf16", "scaled_mm-fp8"),
                tags={"gemm", "quant"},
            )
        )
