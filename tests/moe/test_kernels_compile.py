"""The MoE Triton kernels compile ahead of time to cubin for sm_80 and sm_90 in bf16 (no GPU needed): the dtype the
interpreter cannot run and the code path (tl.dot lowering to mma / wgmma, pipelining) the interpreter never takes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from ditkern.kernels import moe as K

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - older Triton
    GPUTarget = ASTSource = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(ASTSource is None, reason="this Triton has no ASTSource / GPUTarget AOT API"),
]


def _sig(fn, pointers: dict, constexprs: dict):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "i32"
    return sig


ROOT = Path(__file__).resolve().parents[2]
BF = "*bf16"
KERNELS = {
    "route": (K._moe_route_fwd_kernel, {"LOGITS": BF, "IDS": "*i32", "WEIGHTS": "*fp32"},
              dict(TOP_K=8, SIGMOID=False, RENORMALIZE=True, BLOCK_T=16, BLOCK_E=64, BLOCK_K=8), 4, 1),
    "align": (K._moe_align_fwd_kernel,
              {"IDS": "*i32", "SORTED": "*i32", "BLOCK_EXPERT": "*i32", "NUM_POST_PAD": "*i32"},
              dict(BLOCK_M=64, BLOCK_E=64, BLOCK_N=256), 4, 1),
    "gate_up": (K._moe_gate_up_fwd_kernel, {"X": BF, "W1": BF, "W3": BF, "B1": BF, "H": BF, "SORTED": "*i32",
                                              "BLOCK_EXPERT": "*i32"},
                dict(TOP_K=2, ACT=0, HAS_B1=False, IEEE=False, SUB_M=1, EVEN_K=True, EVEN_N=True), None, None),
    "down": (K._moe_down_fwd_kernel, {"H": BF, "W2": BF, "B2": BF, "WEIGHTS": "*fp32", "Y": BF, "SORTED": "*i32",
                                       "BLOCK_EXPERT": "*i32"},
             dict(HAS_B2=True, HAS_WEIGHTS=True, IEEE=False, SUB_M=1, EVEN_K=True, EVEN_N=False), None, None),
    "combine": (K._moe_combine_fwd_kernel, {"Y": BF, "SHARED": BF, "BIAS": BF, "OUT": BF},
                dict(TOP_K=8, HAS_SHARED=True, HAS_BIAS=True, BLOCK_D=2048), 8, 1),
}  # fmt: skip


SMEM = {80: 163 * 1024, 90: 227 * 1024}


def compile_one(name: str, arch: int) -> str:
    """Compile one kernel for sm_<arch>; returns a short description (runs without TRITON_INTERPRET). The GEMMs get
    the table's config for HiDream-I1 (128-row blocks, D 2560, F 6912) within that architecture's shared memory."""
    fn, pointers, constexprs, warps, stages = KERNELS[name]
    if name in ("gate_up", "down"):
        cfg = K.gemm_configs(128, 2560, 6912, 2, True, SMEM[arch])[name == "down"]
        constexprs = dict(constexprs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8)
        warps, stages = cfg.num_warps, cfg.num_stages
    src = ASTSource(fn=fn, signature=_sig(fn, pointers, constexprs), constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    assert len(k.asm["cubin"]) > 1000
    ptx = k.asm["ptx"]
    if name in ("gate_up", "down"):
        assert ("wgmma" in ptx) if arch == 90 else ("mma.sync" in ptx), "tl.dot did not lower to tensor cores"
    return f"{name} sm_{arch}: cubin {len(k.asm['cubin'])} bytes"


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_to_cubin(arch):
    # the test session interprets Triton (conftest); compile in a fresh interpreter-free process
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = (
        "from tests.moe.test_kernels_compile import KERNELS, compile_one\n"
        f"for n in sorted(KERNELS): print(compile_one(n, {arch}))"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.strip().splitlines()) == len(KERNELS), r.stdout
