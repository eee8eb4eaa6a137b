"""Every Triton kernel at the bench shapes, launched through its public op with ``torch.empty`` tensors: the catalogue
of the GPU-less compile check (``bench/static.py``, ``tests/test_compile.py``).

Each :class:`CompileCase` calls a public ``ditkern.ops`` function with ``backend="triton"`` inside
``bench.aot.target(arch)``, so the op's validation, its ``can_run`` (seeing the target's capability and shared memory)
and its launcher run unchanged, and every kernel they launch is compiled for that architecture instead of run. It also
carries the minimum bytes and FLOPs of one call, for the roofline floor on an H200 in the static report.

Shapes are those of ``bench/ops/*`` (named after real models). Several shapes share a kernel specialisation; Triton's
cache compiles each distinct one once per process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from bench.ops.fpx_gemm import GEMMS
from bench.ops.moe import SHAPES as MOE_SHAPES
from bench.ops.window_attention import ATTN_SHAPES, window_for
from bench.registry import SHAPES

BF16 = torch.bfloat16
# H200 datasheet ceilings (TARGETS.md): HBM3e 4.8 TB/s, dense bf16 989 TFLOP/s, fp8 1979 TFLOP/s
H200 = dict(bandwidth=4.8e12, bf16=989e12, fp8=1979e12)


@dataclasses.dataclass
class CompileCase:
    op: str
    shape: str
    run: Callable[[], object]
    memory_bound: bool  # spills fail the check only here (a compute-bound kernel's spills are reported)
    bytes: int  # minimum bytes one call must move
    flops: int = 0
    tensor_math: str = "bf16"  # which peak bounds the FLOPs: "bf16" or "fp8"

    @property
    def name(self) -> str:
        return f"{self.op}[{self.shape}]"

    def floor_us(self) -> float:
        """Roofline floor on an H200: the larger of the memory time and the tensor-core time."""
        return 1e6 * max(self.bytes / H200["bandwidth"], self.flops / H200[self.tensor_math])


def _e(*shape, dtype=BF16):
    return torch.empty(*shape, dtype=dtype)


def _z(*shape, dtype=BF16):
    return torch.zeros(*shape, dtype=dtype)


# ---- row-wise ops: adaLN, Taylor, FP8 activation quantization ------------------------------------------------------
def _adaln_cases() -> list[CompileCase]:
    from ditkern.ops.adaln_modulate import adaln_modulate, gated_residual_adaln  # noqa: PLC0415
    from ditkern.ops.adaln_modulate_fp8 import adaln_modulate_fp8  # noqa: PLC0415
    from ditkern.ops.quantize_fp8 import quantize_fp8  # noqa: PLC0415

    cases = []
    for shape, d in SHAPES.items():
        B, S, D = d["B"], d["S"], d["D"]
        n = B * S * D

        def mod(B, D):
            return _e(B, 6 * D).chunk(6, dim=1)[:3]

        def adaln(B=B, S=S, D=D):
            shift, scale, _ = mod(B, D)
            return adaln_modulate(_e(B, S, D), shift, scale, backend="triton")

        def gated(B=B, S=S, D=D):
            shift, scale, gate = mod(B, D)
            return gated_residual_adaln(_e(B, S, D), _e(B, S, D), gate, shift, scale, backend="triton")

        def fp8(B=B, S=S, D=D):
            shift, scale, _ = mod(B, D)
            return adaln_modulate_fp8(_e(B, S, D), shift, scale, backend="triton")

        def quant(B=B, S=S, D=D):
            return quantize_fp8(_e(B * S, D), backend="triton")

        cases += [
            CompileCase("adaln_modulate", shape, adaln, True, 2 * n * 2),
            CompileCase("gated_residual_adaln", shape, gated, True, 4 * n * 2),
            CompileCase("adaln_modulate_fp8", shape, fp8, True, n * (2 * 2 + 1) + 4 * B * S),
            CompileCase("quantize_fp8", shape, quant, True, n * (2 + 1) + 4 * B * S),
        ]
    # Wan 2.2: per-token modulation [B, S, D] in fp32 beside a bf16 stream; RMS norm with a weight (SD3.5 / Sana)
    d = SHAPES["wan_720p"]
    B, S, D = d["B"], d["S"], d["D"]
    cases.append(CompileCase(
        "adaln_modulate", "wan_720p/per_token_fp32_mod",
        lambda B=B, S=S, D=D: adaln_modulate(_e(B, S, D), _e(B, S, D, dtype=torch.float32),
                                             _e(B, S, D, dtype=torch.float32), backend="triton"),
        True, B * S * D * (2 + 2 + 4 + 4),
    ))  # fmt: skip
    d = SHAPES["sd3_1024"]
    B, S, D = d["B"], d["S"], d["D"]
    cases.append(CompileCase(
        "adaln_modulate", "sd3_1024/rms",
        lambda B=B, S=S, D=D: adaln_modulate(_e(B, S, D), *_e(B, 2 * D).chunk(2, 1), norm="rms", weight=_e(D),
                                             backend="triton"),
        True, 2 * B * S * D * 2,
    ))  # fmt: skip
    return cases


def _taylor_cases() -> list[CompileCase]:
    from ditkern.ops.taylor import taylor_forecast, taylor_update  # noqa: PLC0415

    cases = []
    for shape, d in SHAPES.items():
        B, S, D = 2, d["S"], d["D"]  # two batch items: classifier-free guidance
        n = B * S * D

        def upd(B=B, S=S, D=D):
            f = lambda: _e(B, S, D)  # noqa: E731
            c = _e(B, dtype=torch.float32)
            taylor_update(f(), f(), f(), f(), c, c, _z(B, dtype=torch.int32), base=f(), order=2, backend="triton")

        def fc(B=B, S=S, D=D):
            f = lambda: _e(B, S, D)  # noqa: E731
            c = _e(B, dtype=torch.float32)
            return taylor_forecast(f(), f(), f(), c, c, base=f(), order=2, backend="triton")

        cases += [
            CompileCase("taylor_update", shape, upd, True, 7 * n * 2),
            CompileCase("taylor_forecast", shape, fc, True, 5 * n * 2),
        ]
    return cases


# ---- FP4 / FP6 GEMMs ----------------------------------------------------------------------------------------------
G = 64
M_SWEEP = (1, 16, 256, 4096, 4608, 16384)


def _packed(N, K, fmt):
    from ditkern.quant.formats import get_format, padded_k  # noqa: PLC0415

    f = get_format(fmt)
    kp = padded_k(K, G)
    return _e(N, kp * f.bits // 8, dtype=torch.uint8), _e(N, kp // G, dtype=torch.float32)


def _gemm_cases() -> list[CompileCase]:
    from ditkern.ops.fpx_fp8_linear import fpx_fp8_linear  # noqa: PLC0415
    from ditkern.ops.fpx_linear import fpx_linear  # noqa: PLC0415
    from ditkern.ops.fpx_quantize import fpx_quantize  # noqa: PLC0415

    cases = []
    sweep = [("flux_1024", "mlp", K, N) for proj, K, N in GEMMS["flux_1024"] if proj == "mlp"]
    for model, proj, K, N in sweep:
        for M in M_SWEEP:
            for fmt, bits in (("fp4_e2m1", 4), ("fp6_e2m3", 6)):
                wbytes = N * K * bits // 8 + N * (K // G) * 4
                io = M * K * 2 + M * N * 2

                def wo(M=M, K=K, N=N, fmt=fmt):
                    p, s = _packed(N, K, fmt)
                    return fpx_linear(_e(M, K), p, s, format=fmt, group_size=G, in_features=K, backend="triton")

                def w8(M=M, K=K, N=N, fmt=fmt):
                    p, s = _packed(N, K, fmt)
                    return fpx_fp8_linear(_e(M, K), p, s, format=fmt, group_size=G, in_features=K, backend="triton")

                tag = f"{model}_{proj}_M{M}/{fmt}"
                cases.append(CompileCase("fpx_linear", tag, wo, M <= 16, wbytes + io, 2 * M * N * K))
                cases.append(CompileCase("fpx_fp8_linear", tag, w8, False, wbytes + io + M * K, 2 * M * N * K, "fp8"))
    # the other formats (E3M2, INT4) and models at their real token counts
    for model, M in (("sd3_1024", 4429), ("wan_720p", 4096), ("pixart_1024", 4096), ("flux_1024", 4608)):
        for proj, K, N in GEMMS[model]:
            for fmt in ("fp6_e3m2", "int4") if model == "flux_1024" else ("fp4_e2m1",):
                bits = 4 if fmt in ("fp4_e2m1", "int4") else 6
                wbytes = N * K * bits // 8 + N * (K // G) * 4

                def w8(M=M, K=K, N=N, fmt=fmt):
                    p, s = _packed(N, K, fmt)
                    return fpx_fp8_linear(_e(M, K), p, s, format=fmt, group_size=G, in_features=K, backend="triton")

                cases.append(CompileCase("fpx_fp8_linear", f"{model}_{proj}_M{M}/{fmt}", w8, False,
                                         wbytes + M * K * 3 + M * N * 2, 2 * M * N * K, "fp8"))  # fmt: skip
    # offline weight packing (patch time): FLUX MLP weight in each format
    K, N = 3072, 12288
    for fmt in ("fp4_e2m1", "fp6_e3m2", "fp6_e2m3", "int4"):
        cases.append(CompileCase(
            "fpx_quantize", f"flux_1024_mlp/{fmt}",
            lambda fmt=fmt: fpx_quantize(_z(N, K), fmt, G, backend="triton"), True, N * K * 2 + N * K // 2,
        ))  # fmt: skip
    return cases


# ---- attention ----------------------------------------------------------------------------------------------------
def _attention_cases() -> list[CompileCase]:
    from ditkern.ops.linear_attention import linear_attention  # noqa: PLC0415
    from ditkern.ops.window_attention import window_attention, window_sparsity  # noqa: PLC0415

    cases = []
    shapes = dict(ATTN_SHAPES)
    shapes["sd3_1024"] = ((64, 64), 333, 24, 64)  # head dim 64
    shapes["pixart_1024"] = ((64, 64), 0, 16, 72)  # head dim 72 (computed as 64 + 16 in the kernel)
    for name, (grid, T, H, Dh) in shapes.items():
        for gran in ("token", "tile") if name in ("flux_1024", "wan_720p_81f") else ("token",):
            if name == "flux_2048":
                continue
            window = window_for(grid, 0.25, gran)
            S = T + math.prod(grid)
            kept = (1 - window_sparsity(grid, window, text_tokens=T, granularity=gran)) * S * S

            def run(grid=grid, T=T, H=H, Dh=Dh, S=S, window=window, gran=gran):
                q = _e(1, H, S, Dh)
                return window_attention(q, q, q, grid=grid, window=window, text_tokens=T, granularity=gran,
                                        backend="triton")  # fmt: skip

            cases.append(CompileCase("window_attention" + ("_tile" if gran == "tile" else ""), f"{name}/q25", run,
                                     False, 4 * H * S * Dh * 2, int(4 * kept * H * Dh)))  # fmt: skip
    # Sana 1600M self-attention: 70 heads x 32, 4K image = 128x128 tokens
    H, Dh = 70, 32
    for S in (4096, 16384):
        cases.append(CompileCase(
            "linear_attention", f"sana_S{S}",
            lambda S=S: linear_attention(_e(1, H, S, Dh), _e(1, H, S, Dh), _e(1, H, S, Dh), backend="triton"),
            True, 4 * H * S * Dh * 2, 4 * H * S * Dh * Dh,
        ))  # fmt: skip
    return cases


# ---- MoE ----------------------------------------------------------------------------------------------------------
def _moe_cases() -> list[CompileCase]:
    from ditkern.ops.moe import (  # noqa: PLC0415
        align_sizes,
        auto_block_m,
        moe_align,
        moe_combine,
        moe_grouped_swiglu,
        moe_route,
    )

    cases = []
    for shape, d in MOE_SHAPES.items():
        T, D, E, K = d["T"], d["D"], d["E"], d["K"]
        # the experts' real hidden size: HiDreamImageFeedForwardSwiGLU rounds int(2 hidden / 3) up to a multiple of
        # 256 (hidream_full: 10240 -> 6912; moe64_top8: 1536 -> 1024)
        F = 256 * -(-int(2 * d["hidden"] / 3) // 256)
        block_m = auto_block_m(T * K, E)  # what SparseMoE picks at this shape
        rows, blocks = align_sizes(T * K, E, block_m)

        def route(T=T, E=E, K=K):
            return moe_route(_e(T, E), K, backend="triton")

        def align(T=T, E=E, K=K, block_m=block_m):
            return moe_align(_z(T, K, dtype=torch.int32), E, block_m, backend="triton")

        def grouped(T=T, D=D, E=E, K=K, F=F, rows=rows, blocks=blocks):
            return moe_grouped_swiglu(_e(T, D), _z(rows, dtype=torch.int32), _z(blocks, dtype=torch.int32),
                                      _e(E, F, D), _e(E, F, D), _e(E, D, F), _e(T, K, dtype=torch.float32),
                                      backend="triton")  # fmt: skip

        def combine(T=T, D=D, K=K):
            return moe_combine(_e(T, K, D), _e(T, D), backend="triton")

        wbytes = 3 * E * F * D * 2
        cases += [
            CompileCase("moe_route", shape, route, True, T * E * 2 + T * K * 8),
            CompileCase("moe_align", shape, align, True, T * K * 4 + rows * 4),
            CompileCase("moe_grouped_swiglu", shape, grouped, False, wbytes + 2 * T * D * 2 + T * K * D * 2,
                        6 * T * K * D * F),  # fmt: skip
            CompileCase("moe_combine", shape, combine, True, T * K * D * 2 + 2 * T * D * 2),
        ]
    # few rows per expert (64 experts top-8, shorter sequences): the 64- and 16-row tiles (4 warps)
    d = MOE_SHAPES["moe64_top8"]
    for T in (1024, 256):
        D, E, K, F = d["D"], d["E"], d["K"], 1024
        rows, blocks = align_sizes(T * K, E, auto_block_m(T * K, E))

        def grouped_small(T=T, D=D, E=E, K=K, F=F, rows=rows, blocks=blocks):
            return moe_grouped_swiglu(_e(T, D), _z(rows, dtype=torch.int32), _z(blocks, dtype=torch.int32),
                                      _e(E, F, D), _e(E, F, D), _e(E, D, F), _e(T, K, dtype=torch.float32),
                                      backend="triton")  # fmt: skip

        cases.append(CompileCase("moe_grouped_swiglu", f"moe64_top8_T{T}", grouped_small, False,
                                 3 * E * F * D * 2 + 2 * T * D * 2 + T * K * D * 2, 6 * T * K * D * F))  # fmt: skip
    # Nucleus-Image (diffusers' NucleusMoEImageTransformer2DModel defaults): D 2048, 128 experts of F 1344,
    # capacity factor 8, 1024^2 image = 4096 tokens -> each expert takes ceil(8 * 4096 / 128) = 256 rows.
    # ExpertChoiceMoE.from_nucleus reads the packed gate_up_proj [E, D, 2F] / down_proj [E, F, D] in place (strided).
    D, E, Fh, S = 2048, 128, 1344, 4096
    C = -(-8 * S // E)

    def nucleus(D=D, E=E, Fh=Fh, S=S):
        from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoELayer  # noqa: PLC0415

        from ditkern.nn import ExpertChoiceMoE  # noqa: PLC0415

        with torch.device("meta"):
            layer = NucleusMoELayer(D, Fh, E, 8.0, use_sigmoid=False, route_scale=2.5)
        layer = layer.to_empty(device="cpu").to(BF16)  # uninitialised: only the routing reads values
        moe = ExpertChoiceMoE.from_nucleus(layer, backend="triton")
        moe.shared = None  # the shared expert is two cuBLAS GEMMs, not ours
        x = _z(1, S, D)
        return moe(x, x, _z(1, D))

    rows = E * C
    cases.append(CompileCase("moe_expert_choice", "nucleus_1024", nucleus, False,
                             3 * E * Fh * D * 2 + 2 * S * D * 2 + rows * D * 2, 6 * rows * D * Fh))  # fmt: skip
    return cases


def all_cases() -> list[CompileCase]:
    return _adaln_cases() + _taylor_cases() + _gemm_cases() + _attention_cases() + _moe_cases()
