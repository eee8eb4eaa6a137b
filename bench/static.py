"""The static kernel report: every Triton kernel compiled for real GPU architectures without a GPU, and the CUDA
extension's ptxas figures, one row per kernel, bench shape and architecture.

    python -m bench.static                          # sm_80, sm_89, sm_90a, sm_100a -> bench/results/static/<arch>.{md,json}
    python -m bench.static --archs 90a --ops window_attention
    python -m bench.static --check --out /tmp/s     # what tests/test_compile.py runs: exit 1 on any violation

Each architecture compiles in its own process (``bench/aot.py``: a stand-in driver, no interpreter), through the ops'
own launchers (``bench/compile_cases.py``). Columns: registers, spilled bytes, shared memory (and the architecture's
limit), warps/stages, programs resident per SM and the grid's waves over the reference GPU's SMs (A100 108, L40S 142,
H200 132, B200 148), the tensor-core instructions in SASS (HGMMA = bf16/fp16 wgmma, QGMMA = fp8 wgmma, HMMA =
mma.sync, QMMA = fp8 mma.sync on Ada, UTC*MMA = Blackwell tcgen05), async copies (LDGSTS = cp.async, TMA),
128/64-bit global loads, the SASS instructions of the main loop per iteration (the innermost loop holding the most
tensor-core instructions, else the longest loop; "+ loops": the other innermost loops holding MMAs) and what it waits
on and loads (its smallest wgmma wait depth, 0 = each iteration waits for the MMA it just issued; plain LDG; cp.async,
of them 128-bit), and the bytes and FLOPs one call needs with its roofline floor on an H200 (4.8 TB/s, 989 TFLOP/s
bf16, 1979 fp8).
Violations (the compile test fails on them): a compile error, a grid over the hardware limits, shared memory over the
architecture's, register spills in a memory-bound kernel. A backend that refuses an architecture through its
``can_run`` is listed as refused, with the reason, and is not compiled.
These are static figures: nothing ran; measured GPU numbers live in ``bench/results/<gpu>/``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = ("80", "89", "90a", "100a")
DEFAULT_OUT = ROOT / "bench" / "results" / "static"


# ---- worker: one architecture, in its own process -------------------------------------------------------------------
def _describe(exc: BaseException) -> str:
    """The error and its causes, root cause last (Triton's CompilationError wraps e.g. the NameError of a global)."""
    parts = []
    while exc is not None and len(parts) < 4:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    text = "\n<- ".join(parts)
    return text if len(text) <= 3000 else text[:1000] + "\n...\n" + text[-2000:]


def compile_arch(arch: str, ops: set[str] | None = None, progress: bool = False) -> dict:
    """Compile every case for ``arch``; returns ``{"arch", "rows", "errors", "refused", "seconds", "versions"}``."""
    from bench import aot  # noqa: PLC0415  (unsets TRITON_INTERPRET before triton is imported)
    from bench.compile_cases import all_cases  # noqa: PLC0415
    from ditkern._backend import BackendUnavailable  # noqa: PLC0415

    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415

    t0 = time.time()
    rows, errors, refused = [], [], []
    summaries: dict = {}
    cases = [c for c in all_cases() if not ops or c.op in ops]
    timings = []
    for i, case in enumerate(cases):
        t_case = time.time()
        if progress:
            print(f"[sm_{arch} {i + 1}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)
        with aot.target(arch) as compiled:
            try:
                case.run()
            except BackendUnavailable as exc:
                refused.append(dict(op=case.op, shape=case.shape, reason=str(exc)))
                continue
            except Exception as exc:  # a compile error, or a launcher that fails: both are what this check is for
                errors.append(dict(op=case.op, shape=case.shape, error=_describe(exc)))
                continue
        if not compiled:
            errors.append(dict(op=case.op, shape=case.shape, error="no Triton kernel was launched"))
        seen = set()
        for k in compiled:
            if k.key in seen:  # one launch per kernel per case is enough (a loop of launches repeats the binary)
                continue
            seen.add(k.key)
            if k.key not in summaries:
                summaries[k.key] = k.summary()
            row = dict(summaries[k.key])
            row["grid"] = tuple(int(g) for g in k.grid)
            row["grid_ok"] = all(g <= lim for g, lim in zip(row["grid"], aot.GRID_LIMITS))
            row.update(op=case.op, shape=case.shape, memory_bound=case.memory_bound, bytes=case.bytes,
                       flops=case.flops, tensor_math=case.tensor_math, h200_floor_us=round(case.floor_us(), 2))  # fmt: skip
            row["blocks_per_sm"], row["waves"] = aot.occupancy(row)
            row["violations"] = aot.violations(row, case.memory_bound)
            rows.append(row)
        timings.append((case.name, round(time.time() - t_case, 2)))
    return dict(
        arch=arch, rows=rows, errors=errors, refused=refused, seconds=round(time.time() - t0, 1),
        versions=dict(triton=triton.__version__, torch=torch.__version__),
        distinct_binaries=len(summaries), timings=timings,
    )  # fmt: skip


# ---- rendering ------------------------------------------------------------------------------------------------------
def _tc(r: dict) -> str:
    parts = [f"{n} {r[k]}" for k, n in (("hgmma", "HGMMA"), ("qgmma", "QGMMA"), ("hmma", "HMMA"), ("qmma", "QMMA"),
                                        ("tcgen05_mma", "tcgen05")) if r.get(k)]  # fmt: skip
    return ", ".join(parts) or "-"


def _async(r: dict) -> str:
    parts = [f"{n} {r[k]}" for k, n in (("ldgsts", "LDGSTS"), ("tma_loads", "TMA")) if r.get(k)]
    return ", ".join(parts) or "-"


def _occ(r: dict) -> str:
    if r.get("blocks_per_sm") is None:
        return "-"
    return f"{r['blocks_per_sm']} ({r['waves']})" if r["waves"] is not None else str(r["blocks_per_sm"])


def _loop_traits(r: dict) -> str:
    """The main loop's wgmma wait depth (0: waits on the MMA it just issued; - : none, e.g. mma.sync), its plain
    global loads and its async copies (of them 128-bit)."""
    if r.get("main_loop_ldg") is None:
        return "-"
    wait = "-" if r["main_loop_wgmma_wait"] is None else str(r["main_loop_wgmma_wait"])
    return f"{wait} / {r['main_loop_ldg']} / {r['main_loop_ldgsts']} ({r['main_loop_ldgsts_128']})"


def render(result: dict, cuda_rows: list[dict] | None, sha: str) -> str:
    arch = result["arch"]
    v = result["versions"]
    lines = [
        f"# Static kernel report: sm_{arch}",
        "",
        f"Generated by `python -m bench.static` on {datetime.date.today().isoformat()}, git {sha}, triton {v['triton']}, "
        f"torch {v['torch']}; compiled without a GPU (nothing ran). {len(result['rows'])} kernel launches, "
        f"{result['distinct_binaries']} distinct binaries, {result['seconds']} s. Floors are H200 rooflines "
        "(4.8 TB/s, 989 TFLOP/s bf16, 1979 fp8) for the bytes and FLOPs one call needs.",
        "",
        "| op | shape | kernel | grid | warps/stages | blocks/SM (waves) | regs | spill B | smem KB (limit) | tensor cores (SASS) | async "
        "copies | LDG 128/64/all | main loop instr (MMA) | main loop wgmma wait / LDG / LDGSTS (128-bit) | MB | "
        "GFLOP | H200 floor us | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        loop = "-" if r["main_loop_instructions"] is None else f"{r['main_loop_instructions']} ({r['main_loop_mma']})"
        others = list(r.get("mma_loops") or [])
        if r["main_loop_instructions"] in others:
            others.remove(r["main_loop_instructions"])
        if others:  # the other innermost MMA loops, e.g. a masked loop beside the unmasked one
            loop += " + loops " + ", ".join(map(str, others))
        status = "; ".join(r["violations"]) or "ok"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['kernel']} | {'x'.join(map(str, r['grid']))} | "
            f"{r['num_warps']}/{r['num_stages']} | {_occ(r)} | {r['registers']} | {r['local_bytes']} | "
            f"{r['shared_bytes'] / 1024:.0f} ({r['shared_limit'] // 1024}) | {_tc(r)} | {_async(r)} | "
            f"{r['ldg_128']}/{r['ldg_64']}/{r['ldg']} | {loop} | {_loop_traits(r)} | {r['bytes'] / 1e6:.1f} | {r['flops'] / 1e9:.1f} | "
            f"{r['h200_floor_us']} | {status} |"
        )
    if result["refused"]:
        lines += ["", "## Refused by `can_run` (not compiled for this architecture)", ""]
        lines += [f"- {r['op']}[{r['shape']}]: {r['reason']}" for r in result["refused"]]
    if result["errors"]:
        lines += ["", "## Compile errors", ""]
        lines += [f"- {r['op']}[{r['shape']}]: `{r['error'][:400]}`" for r in result["errors"]]
    if cuda_rows:
        lines += [
            "",
            "## CUDA extension (`csrc/`, nvcc -Xptxas -v)",
            "",
            "| kernel | source | regs | spill store/load B | smem B | stack B | SASS instr | LDG 128/64 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in cuda_rows:
            lines.append(
                f"| {r.get('kernel')} | {r.get('source')} | {r.get('registers')} | {r.get('spill_store_bytes')}/"
                f"{r.get('spill_load_bytes')} | {r.get('shared_bytes')} | {r.get('stack_bytes')} | "
                f"{r.get('sass_instructions', '-')} | {r.get('ldg_128', '-')}/{r.get('ldg_64', '-')} |"
            )
    return "\n".join(lines) + "\n"


def _cuda_rows(arch: str) -> list[dict] | None:
    try:
        from bench.static_cuda import cuda_rows  # noqa: PLC0415
    except ImportError:
        return None
    try:
        return cuda_rows(archs=(arch,))
    except Exception as exc:  # nvcc missing or failing: the Triton report stands on its own; say so in the table
        return [dict(kernel=f"(not compiled: {type(exc).__name__}: {exc})"[:300], source="-")]


def _sha() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()  # fmt: skip
    return (r.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def _tail(error: str) -> str:
    """The root cause of a compile error: Triton's message quotes the source first and names the error last."""
    lines = [ln for ln in error.splitlines() if ln.strip()]
    return (lines[0][:120] + " ... " + " | ".join(lines[-2:])[-300:]) if len(lines) > 2 else error[:400]


def problems(result: dict) -> list[str]:
    out = [f"sm_{result['arch']} {e['op']}[{e['shape']}]: {_tail(e['error'])}" for e in result["errors"]]
    for r in result["rows"]:
        out += [f"sm_{result['arch']} {r['op']}[{r['shape']}] {r['kernel']}: {v}" for v in r["violations"]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="comma-separated, e.g. 80,89,90a,100a")
    ap.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="directory for <arch>.md and <arch>.json")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="architectures compiled at once")
    ap.add_argument("--check", action="store_true", help="exit 1 on any compile error or violation")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension's ptxas rows")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ops = {o for o in args.ops.split(",") if o} or None

    if args.worker:
        result = compile_arch(args.worker, ops, progress=True)
        Path(args.json).write_text(json.dumps(result))
        return 0

    archs = [a.strip().replace("sm_", "") for a in args.archs.split(",") if a.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")

    def work(arch: str) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "bench.static", "--worker", arch, "--json", str(path)]
            if ops:
                cmd += ["--ops", ",".join(sorted(ops))]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not path.exists():
                tail = (proc.stderr or proc.stdout)[-3000:]
                return dict(arch=arch, rows=[], refused=[], seconds=0, distinct_binaries=0,
                            versions=dict(triton="?", torch="?"),
                            errors=[dict(op="(worker)", shape="-", error=f"worker failed rc={proc.returncode}: {tail}")])  # fmt: skip
            return json.loads(path.read_text())

    sha = _sha()
    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for result in pool.map(work, archs):
            arch = result["arch"]
            cuda = None if args.no_cuda else _cuda_rows(arch)
            result["cuda_rows"] = cuda
            result["git"] = sha
            (out / f"{arch}.json").write_text(json.dumps(result, indent=1) + "\n")
            (out / f"{arch}.md").write_text(render(result, cuda, sha))
            bad = problems(result)
            failures += bad
            print(f"sm_{arch}: {len(result['rows'])} launches, {result['distinct_binaries']} binaries, "
                  f"{len(result['refused'])} refused, {len(bad)} problems, {result['seconds']} s -> "
                  f"{out / (arch + '.md')}", flush=True)  # fmt: skip
    for f in failures:
        print("PROBLEM", f)
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
