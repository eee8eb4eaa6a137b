"""The GPU-less compile check: every Triton kernel, through its own launcher at the bench shapes, compiled for
sm_80, sm_89, sm_90a and sm_100a with the installed Triton (``python -m bench.static --check``), in separate
processes without the interpreter. Fails on a compile error, a grid over the hardware limits, shared memory over the
architecture's limit, or register spills in a memory-bound kernel. A backend that cannot serve an architecture must
refuse through ``can_run`` (reported, not compiled).

The compile runs in the background from the start of the session (``tests/conftest.py``), beside the other tests;
``test_compile_all_architectures`` waits for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("80", "89", "90a", "100a")
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Triton's NVIDIA backend compiles on Linux")


def _results(request) -> dict:
    job = getattr(request.config, "_ditkern_compile_job", None)
    if job is None:  # run alone (-k, or the hook found no item): compile now
        from tests.conftest import start_compile_check  # noqa: PLC0415

        job = start_compile_check()
    proc, out = job
    stdout, stderr = proc.communicate(timeout=3000)
    assert proc.returncode in (0, 1), f"bench.static crashed (rc={proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return {a: json.loads((Path(out) / f"{a}.json").read_text()) for a in ARCHS}, stdout


def test_compile_all_architectures(request):
    results, stdout = _results(request)
    problems = [line for line in stdout.splitlines() if line.startswith("PROBLEM")]
    assert not problems, "\n".join(problems)
    for arch, r in results.items():
        assert not r["errors"], (arch, r["errors"])
        assert r["rows"], f"sm_{arch}: nothing compiled"
        for row in r["rows"]:
            assert row["grid_ok"] and not row["violations"], (arch, row["op"], row["shape"], row["violations"])
            assert row["shared_bytes"] <= row["shared_limit"]
    # every op of the catalogue compiled on Hopper and Blackwell; on Ampere only the FP8 ops may refuse, with a reason
    compiled = {a: {row["op"] for row in r["rows"]} for a, r in results.items()}
    refused = {a: {x["op"] for x in r["refused"]} for a, r in results.items()}
    for arch in ("89", "90a", "100a"):
        assert not refused[arch], (arch, results[arch]["refused"])
    assert refused["80"] <= {"adaln_modulate_fp8", "quantize_fp8", "fpx_fp8_linear"}, refused["80"]
    assert all("compute capability" in x["reason"] for x in results["80"]["refused"])
    assert compiled["90a"] == compiled["100a"] == compiled["89"]
    assert compiled["80"] | refused["80"] == compiled["90a"]


def test_compile_report_has_the_tuning_columns(request):
    results, _ = _results(request)
    rows = results["90a"]["rows"]
    w4a8 = [r for r in rows if r["op"] == "fpx_fp8_linear" and r["kernel"] == "_fpx_fp8_linear_fwd_kernel"]
    big = [r for r in w4a8 if int(r["shape"].split("_M")[1].split("/")[0]) >= 256]
    assert big and all(r["qgmma"] > 0 for r in big), "W4A8 at DiT token counts must use fp8 wgmma (QGMMA) on sm_90a"
    # issue 13: the weights arrive by 16-byte async copies and the group scales are not plain loads in the main loop
    assert all(r["main_loop_ldgsts_128"] >= 2 and r["main_loop_ldg"] <= 1 for r in big), [
        (r["shape"], r["main_loop_ldgsts_128"], r["main_loop_ldg"]) for r in big]
    assert all(r["qgmma"] + r["hmma"] > 0 for r in w4a8), "every W4A8 tile must run on tensor cores"
    ada = [r for r in results["89"]["rows"] if r["kernel"] == "_fpx_fp8_linear_fwd_kernel"]
    assert ada and all(r["qmma"] > 0 for r in ada), "W4A8 on sm_89 must use fp8 mma.sync (QMMA)"
    attn = [r for r in rows if r["op"] == "window_attention"]
    assert attn and all(r["hgmma"] > 0 and r["main_loop_instructions"] for r in attn)
    # the image-window key loop is pipelined: async copies in it, and the list entry its only plain load
    assert all(r["main_loop_ldgsts"] > 0 and r["main_loop_ldg"] <= 1 for r in attn), [
        (r["shape"], r["main_loop_ldgsts"], r["main_loop_ldg"]) for r in attn]
    assert all(r["h200_floor_us"] > 0 for r in rows)
    # sm_89 has 99 KB: the window kernel pipelines less deeply there instead of failing to launch
    sm89 = [r for r in results["89"]["rows"] if r["op"].startswith("window_attention")]
    assert sm89 and max(r["shared_bytes"] for r in sm89) <= 99 * 1024


def _compile_snippet(body: str, tmp_path) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh process without the interpreter (a file: @triton.jit needs the source)."""
    code = "import sys; sys.path.insert(0, %r)\nfrom bench import aot\nimport torch, triton, triton.language as tl\n" % str(ROOT)
    script = tmp_path / "snippet.py"
    script.write_text(code + textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)  # fmt: skip


def test_the_check_catches_what_the_interpreter_misses(tmp_path):
    """The three kinds of defect the interpreter let through (issue 11): a module-level float inside a kernel, a grid
    over 65535 on axis 1, shared memory over sm_89's 99 KB. Each must be caught here."""
    proc = _compile_snippet(
        """
        MAGIC = 12582912.0

        @triton.jit
        def bad(X):
            tl.store(X, tl.load(X) + MAGIC)

        @triton.jit
        def copy(X, Y, BLOCK: tl.constexpr):
            o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            tl.store(Y + o, tl.load(X + o))

        @triton.jit
        def big_smem(X, Y, K, BLOCK: tl.constexpr):
            acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            o = tl.arange(0, BLOCK)
            for k in range(0, K, BLOCK):
                a = tl.load(X + o[:, None] * K + k + o[None, :])
                acc += tl.dot(a, a)
            tl.store(Y + o[:, None] * BLOCK + o[None, :], acc)

        x = torch.empty(1 << 20, dtype=torch.float32)
        try:
            with aot.target("90a"):
                bad[(1,)](x)
            print("BAD_COMPILED")
        except Exception as exc:
            print("BAD_REFUSED", "global" in str(exc).lower())
        with aot.target("90a") as ks:
            copy[(1, 378000)](x, x, BLOCK=1024)
        print("GRID", aot.violations(ks[0].summary(), memory_bound=True))
        h = torch.empty(256 * 4096, dtype=torch.float16)
        with aot.target("89") as ks:
            big_smem[(1,)](h, torch.empty(256 * 256), 4096, BLOCK=256, num_stages=4)
        print("SMEM", aot.violations(ks[0].summary(), memory_bound=False))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "BAD_REFUSED True" in out, out
    assert "GRID ['grid (1, 378000, 1) exceeds" in out, out
    assert "SMEM [\"shared memory 393216 B exceeds sm_89" in out, out


def test_parse_sass_loops(tmp_path):
    """The main-loop count: a backward branch's body, the loop with the most MMA instructions; what it waits on and
    loads."""
    proc = _compile_snippet(
        """
        sass = '''
                /*0000*/                   MOV R1, c[0x0][0x28] ;
        .L_x_0:
                /*0010*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;
                /*0018*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR16][R4.64], P5 ;
                /*001a*/                   LDG.E.64 R14, desc[UR16][R190.64+0x140] ;
                /*001c*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
                /*0020*/                   IADD3 R0, R0, 0x1, RZ ;
                /*0030*/                   ISETP.GE.AND P0, PT, R0, R2, PT ;
                /*0040*/              @!P0 BRA `(.L_x_0) ;
        .L_x_1:
                /*0050*/                   BRA `(.L_x_1);
        '''
        r = aot.parse_sass(sass)
        print("LOOP", r["sass_loops"], r["main_loop_instructions"], r["main_loop_mma"], r["hgmma"])
        print("TRAITS", r["main_loop_wgmma_wait"], r["main_loop_ldg"], r["main_loop_ldgsts"], r["main_loop_ldgsts_128"])
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOOP 1 7 1 1" in proc.stdout, proc.stdout
    assert "TRAITS 1 1 1 1" in proc.stdout, proc.stdout  # waits for all but one wgmma group; one LDG, one cp.async
