"""Run the benchmark suite: ``python -m bench.run [--quick] [--tier b] [--ops OP,...] [--shapes NAME,...] [--out DIR]``.

Every implementation of every registered case is timed in the same run, beside its baselines, and the measured
device-to-device copy bandwidth of this run is the "peak" the GB/s are compared to. On a GPU the timer is
``triton.testing.do_bench`` (median, CUDA events); each timed call takes the next of several input sets, every set
its own storage (weights included), so that between two uses of one set more than twice the L2 cache has been read.
On the CPU a wall-clock median times the torch paths, so the harness itself is exercised in CI (those numbers are not
GPU claims). ``--tier b``: one shape per op (``bench.registry.TIER_B``), the short GPU tier of bench/gpu_suite.sh;
``--tier c``: every other case.
Results: JSON + CSV + a markdown table under ``bench/results/<device>/`` named ``<date>_<sha>`` (``_2``, ``_3`` ...
when a run of the same day and commit is there already: nothing is overwritten), rewritten after every case so an
interrupted run keeps what it measured; the paths are printed.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
L2_BYTES_BOUND = 256 << 20  # rotate inputs through > 2x any current GPU's L2 (H100/H200: 50 MB, B200: 126 MB)
SET_MEMORY_CAP = 8 << 30  # all input sets of one case together, at most (a GEMV case holds ~2 GB of weight copies)


def git_sha() -> str:
    """The commit measured: ``DITKERN_GIT_SHA`` when set (the GPU machine gets a copy of the work tree without
    .git: bench/gpu_suite.sh passes the sha in), else ``git rev-parse`` (+ ``-dirty``), else ``unknown``."""
    given = os.environ.get("DITKERN_GIT_SHA", "").strip()
    if given:
        return given
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def environment(device: str) -> dict:
    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else f"none (CPU: {platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
        "ditkern": _version("ditkern"),
        "python": platform.python_version(),
    }
    return env


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, min_time_s: float = 0.5) -> float:
    """Median milliseconds of one call."""
    if device == "cuda":
        import triton.testing  # noqa: PLC0415

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < 3 or (time.perf_counter() - start < min_time_s and len(samples) < 50):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: str, nbytes: int) -> float:
    """Measured device-to-device copy bandwidth (bytes read + bytes written), the 'peak' for % of peak."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def l2_bytes(device: str) -> int:
    """This GPU's L2 size (50 MB, the H100/H200 value, where torch does not say or on the CPU)."""
    if device == "cuda":
        size = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
        if size:
            return int(size)
    return 50 << 20


def rotation_budget(device: str) -> int:
    """Bytes the input sets of a case must span so that no timed call finds its inputs in L2: > 2x L2."""
    return 0 if device == "cpu" else max(L2_BYTES_BOUND, 2 * l2_bytes(device))


def footprint(inputs) -> int:
    """Bytes of the distinct storages that ``inputs`` (tensors in dicts / lists / tuples, nested) hold."""
    seen: dict[int, int] = {}

    def walk(v):
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif isinstance(v, dict):
            for u in v.values():
                walk(u)
        elif isinstance(v, (list, tuple)):
            for u in v:
                walk(u)

    walk(inputs)
    return sum(seen.values())


def rotation_count(nbytes: int, set_bytes: int, budget: int, mem_cap: int = SET_MEMORY_CAP) -> int:
    """How many input sets to cycle through: enough that their ``nbytes`` (what one call reads and writes at least)
    add up to ``budget``, but no more than ``mem_cap`` bytes of sets (``set_bytes`` each) in memory."""
    if budget <= 0:
        return 1
    want = math.ceil(budget / max(nbytes, 1))
    fits = max(1, mem_cap // max(set_bytes, 1))
    return max(1, min(want, fits))


def input_sets(case, device: str, dtype, budget: int | None = None, mem_cap: int = SET_MEMORY_CAP) -> list[dict]:
    """The input sets a case is timed over (see ``rotation_count``); ``budget`` None: ``rotation_budget(device)``.

    Each set comes from its own ``case.make_inputs`` call, so a case whose inputs share storage across calls (a cached
    weight) defeats the rotation: ``footprint(sets)`` shows it, and run() reports the bytes actually rotated."""
    first = case.make_inputs(device, dtype)
    budget = rotation_budget(device) if budget is None else budget
    n = rotation_count(case.bytes_moved(first), footprint(first), budget, mem_cap)
    return [first] + [case.make_inputs(device, dtype) for _ in range(n - 1)]


def rotating(fn, sets: list):
    """``fn`` as a no-argument callable that takes the next input set at every call (round robin)."""
    state = {"i": 0}

    def call():
        inputs = sets[state["i"]]
        state["i"] = (state["i"] + 1) % len(sets)
        return fn(inputs)

    return call


def select_cases(cases, ops=None, shapes=None, tier=None) -> list:
    """Filter by op and shape names; ``tier="b"``: the shapes of ``bench.registry.TIER_B`` (one per op; an op that
    TIER_B does not name gets its first registered shape, so a new op is never left out); ``tier="c"``: the rest."""
    from bench.registry import tier_b_shapes  # noqa: PLC0415

    cases = [c for c in cases if (not ops or c.op in ops) and (not shapes or c.shape in shapes)]
    if tier not in (None, "b", "c"):
        raise ValueError(f"tier must be 'b', 'c' or None, got {tier!r}")
    if tier is not None:
        keep = tier_b_shapes(cases)
        cases = [c for c in cases if (c.shape in keep.get(c.op, ())) == (tier == "b")]
    return cases


def run(quick: bool = False, ops=None, shapes=None, dtype=None, out=None, impls=None, progress=True, tier=None) -> dict:
    from tqdm import tqdm  # noqa: PLC0415

    from bench.registry import load_all  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    cases = select_cases(load_all(quick=quick), ops, shapes, tier)
    env = environment(device)
    peak = copy_bandwidth_gbs(device, (1 << 30) if device == "cuda" and not quick else (64 << 20))
    env["measured_copy_GBps"] = round(peak, 1)
    env["dtype"] = str(dtype).replace("torch.", "")
    budget = rotation_budget(device)
    env["rotation_budget_MB"] = round(budget / 2**20)
    rows = []
    result = {"env": env, "rows": rows}
    out_dir = None if out is False else (Path(out) if out else default_out(device))
    stem = None if out_dir is None else claim_stem(out_dir, env)
    if stem is not None:
        print(f"bench.run: results -> {out_dir / stem}.{{json,csv,md}} (rewritten after every case)", file=sys.stderr)
    for case in tqdm(cases, desc="bench", disable=not progress, file=sys.stderr):
        try:
            sets = input_sets(case, device, dtype, budget)
        except Exception as exc:  # inputs that cannot be built here (a missing package, no FP8): one row says why
            rows.append({"op": case.op, "shape": case.shape, **case.dims, "impl": "(inputs)", "ms": None,
                         "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})  # fmt: skip
            continue
        first = sets[0]
        nbytes = case.bytes_moved(first)
        nflops = case.flops(first)
        rotated = footprint(sets)
        rot_note = ""
        if device != "cpu" and len(sets) > 1 and rotated < budget:
            rot_note = f"inputs rotate over {rotated / 2**20:.0f} MB < {budget / 2**20:.0f} MB (memory cap): may hit L2"
        results = {}
        for name, fn in case.impls.items():
            if impls and name not in impls:
                continue
            if device == "cpu" and name == "compile" and not quick:
                results[name] = (None, "skipped on CPU (inductor compile time; GPU-only baseline)")
                continue
            try:
                fn(first)
                _sync(device)
                results[name] = (time_ms(rotating(fn, sets), device), rot_note)
            except Exception as exc:  # a backend that cannot run here is reported, not fatal
                results[name] = (None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        base = {b: results.get(b, (None, ""))[0] for b in case.baseline_names}
        for name, (ms, note) in results.items():
            row = {
                "op": case.op,
                "shape": case.shape,
                **{k: v for k, v in case.dims.items()},
                "impl": name,
                "ms": _sig(ms),
                "GBps": _sig(None if ms is None else nbytes / (ms * 1e-3) / 1e9),
                "pct_peak_bw": _sig(None if ms is None else 100 * nbytes / (ms * 1e-3) / 1e9 / peak),
                "TFLOPs": _sig(None if ms is None or not nflops else nflops / (ms * 1e-3) / 1e12),
                "input_sets": len(sets),
                "rotated_MB": _sig(rotated / 2**20),
                "note": note,
            }
            for b, bms in base.items():
                row[f"speedup_vs_{b}"] = None if (ms is None or bms is None) else round(bms / ms, 3)
            rows.append(row)
        del sets, first
        if stem is not None:
            write(result, out_dir, stem)
    if stem is not None:
        paths = write(result, out_dir, stem)
        result["paths"] = [str(p) for p in paths]
    return result


def _sig(v, digits: int = 4):
    """Round to significant digits (CPU harness runs give tiny GB/s that fixed decimals would print as 0)."""
    if v is None or v == 0:
        return v
    return round(v, max(0, digits - 1 - int(math.floor(math.log10(abs(v))))))


def default_out(device: str) -> Path:
    if device == "cuda":
        slug = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-").lower()
        return ROOT / "bench" / "results" / slug
    return ROOT / "bench" / "results" / "cpu"  # git-ignored: CPU runs test the harness, they are not results


def markdown(result: dict) -> str:
    env, rows = result["env"], result["rows"]
    lines = [
        f"# ditkern benchmarks — {env['gpu']}",
        "",
        f"{env['date']} · git {env['git_sha']} · torch {env['torch']} (CUDA {env['cuda']}) · triton {env['triton']} · "
        f"dtype {env['dtype']} · measured copy bandwidth {env['measured_copy_GBps']} GB/s (= 100% peak)",
        "",
    ]
    if not rows:
        return "\n".join(lines + ["(no cases)"])
    speed_cols = list(dict.fromkeys(k for r in rows for k in r if k.startswith("speedup_vs_")))  # every case's baselines
    head = ["op", "shape", "impl", "ms", "GB/s", "% peak BW", "TFLOP/s", *[c.replace("speedup_vs_", "x vs ") for c in speed_cols], "note"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        vals = [r["op"], r["shape"], r["impl"], r.get("ms"), r.get("GBps"), r.get("pct_peak_bw"), r.get("TFLOPs"), *[r.get(c) for c in speed_cols], r.get("note")]
        lines.append("| " + " | ".join("" if v is None else str(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def claim_stem(out_dir: Path, env: dict, prefix: str = "") -> str:
    """``<prefix><date>_<sha>``, or ``..._<n>`` when an earlier run wrote that name: never overwrite a result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = re.sub(r"[^A-Za-z0-9._-]", "-", f"{prefix}{env['date'][:10]}_{env['git_sha']}")  # plain names only
    for n in range(1, 10_000):
        stem = base if n == 1 else f"{base}_{n}"
        if any((out_dir / f"{stem}{ext}").exists() for ext in (".json", ".csv", ".md")):
            continue
        try:
            with open(out_dir / f"{stem}.md", "x") as f:  # claim it (another run may be choosing at the same time)
                f.write(f"# {stem}: a run in progress (rewritten as it measures)\n")
        except FileExistsError:
            continue
        return stem
    raise RuntimeError(f"no free result name for {base} in {out_dir}")


def write(result: dict, out_dir: Path, stem: str | None = None) -> list[Path]:
    """Write ``<stem>.json``, ``.csv`` and ``.md`` (stem: a fresh one from ``claim_stem`` unless given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or claim_stem(out_dir, result["env"])
    paths = [out_dir / f"{stem}{ext}" for ext in (".json", ".csv", ".md")]
    saved = {k: v for k, v in result.items() if k != "paths"}
    paths[0].write_text(json.dumps(saved, indent=1))
    with open(paths[1], "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in result["rows"] for k in r)) + [f"env_{k}" for k in result["env"]]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in result["rows"]:
            w.writerow({**r, **{f"env_{k}": v for k, v in result["env"].items()}})
    paths[2].write_text(markdown(result))
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small shapes (tests the harness; not a measurement)")
    p.add_argument("--tier", choices=["b", "c"], help="b: one shape per op (bench.registry.TIER_B), c: all the others")
    p.add_argument("--list", action="store_true", help="print the selected cases and exit (nothing is timed)")
    p.add_argument("--ops", help="comma-separated op names (default: all)")
    p.add_argument("--shapes", help="comma-separated shape names (default: all)")
    p.add_argument("--impls", help="comma-separated implementations (default: all)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--out", help="output folder (default: bench/results/<gpu>/, or bench/results/cpu/)")
    a = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[a.dtype]
    split = lambda s: set(s.split(",")) if s else None  # noqa: E731
    if a.list:
        from bench.registry import load_all  # noqa: PLC0415

        for c in select_cases(load_all(quick=a.quick), split(a.ops), split(a.shapes), a.tier):
            print(f"{c.name}: {', '.join(n for n in c.impls if not a.impls or n in split(a.impls))}")
        return 0
    result = run(quick=a.quick, ops=split(a.ops), shapes=split(a.shapes), dtype=dtype, out=a.out, impls=split(a.impls),
                 tier=a.tier)  # fmt: skip
    print(markdown(result))
    for path in result.get("paths", []):
        print(f"bench.run: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
