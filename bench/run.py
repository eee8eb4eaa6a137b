"""Run the benchmark suite: ``python -m bench.run [--quick] [--ops OP,...] [--shapes NAME,...] [--out DIR]``.

Every implementation of every registered case is timed in the same run, beside its baselines, and the measured
device-to-device copy bandwidth of this run is the "peak" the GB/s are compared to. On a GPU the timer is
``triton.testing.do_bench`` (median, CUDA events); inputs rotate among enough copies to exceed the L2 cache. On the
CPU a wall-clock median times the torch paths, so the harness itself is exercised in CI (those numbers are not GPU
claims). Results: JSON + CSV + a markdown table under ``bench/results/<device>/`` named by date and git sha.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
L2_BYTES_BOUND = 256 << 20  # rotate inputs through more than any current GPU's L2 (H100: 50 MB)


def git_sha() -> str:
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


def run(quick: bool = False, ops=None, shapes=None, dtype=None, out=None, impls=None, progress=True) -> dict:
    from tqdm import tqdm  # noqa: PLC0415

    from bench.registry import load_all  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    cases = [
        c for c in load_all(quick=quick) if (not ops or c.op in ops) and (not shapes or c.shape in shapes)
    ]
    env = environment(device)
    peak = copy_bandwidth_gbs(device, (1 << 30) if device == "cuda" and not quick else (64 << 20))
    env["measured_copy_GBps"] = round(peak, 1)
    env["dtype"] = str(dtype).replace("torch.", "")
    rows = []
    for case in tqdm(cases, desc="bench", disable=not progress, file=sys.stderr):
        first = case.make_inputs(device, dtype)
        nbytes = case.bytes_moved(first)
        nflops = case.flops(first)
        n_sets = 1 if device == "cpu" else max(1, math.ceil(L2_BYTES_BOUND / max(nbytes, 1)))
        sets = [first] + [case.make_inputs(device, dtype) for _ in range(n_sets - 1)]
        results = {}
        for name, fn in case.impls.items():
            if impls and name not in impls:
                continue
            if device == "cpu" and name == "compile" and not quick:
                results[name] = (None, "skipped on CPU (inductor compile time; GPU-only baseline)")
                continue
            state = {"i": 0}

            def call(fn=fn, state=state):
                state["i"] = (state["i"] + 1) % len(sets)
                return fn(sets[state["i"]])

            try:
                fn(first)
                _sync(device)
                results[name] = (time_ms(call, device), "")
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
                "note": note,
            }
            for b, bms in base.items():
                row[f"speedup_vs_{b}"] = None if (ms is None or bms is None) else round(bms / ms, 3)
            rows.append(row)
    result = {"env": env, "rows": rows}
    if out is not False:
        write(result, Path(out) if out else default_out(device))
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
    speed_cols = [k for k in rows[0] if k.startswith("speedup_vs_")]
    head = ["op", "shape", "impl", "ms", "GB/s", "% peak BW", "TFLOP/s", *[c.replace("speedup_vs_", "x vs ") for c in speed_cols], "note"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        vals = [r["op"], r["shape"], r["impl"], r["ms"], r["GBps"], r["pct_peak_bw"], r.get("TFLOPs"), *[r.get(c) for c in speed_cols], r["note"]]
        lines.append("| " + " | ".join("" if v is None else str(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['env']['date'][:10]}_{result['env']['git_sha']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in result["rows"] for k in r)) + [f"env_{k}" for k in result["env"]]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in result["rows"]:
            w.writerow({**r, **{f"env_{k}": v for k, v in result["env"].items()}})
    (out_dir / f"{stem}.md").write_text(markdown(result))
    return out_dir / f"{stem}.md"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small shapes (tests the harness; not a measurement)")
    p.add_argument("--ops", help="comma-separated op names (default: all)")
    p.add_argument("--shapes", help="comma-separated shape names (default: all)")
    p.add_argument("--impls", help="comma-separated implementations (default: all)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--out", help="output folder (default: bench/results/<gpu>/, or bench/results/cpu/)")
    a = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[a.dtype]
    split = lambda s: set(s.split(",")) if s else None  # noqa: E731
    result = run(quick=a.quick, ops=split(a.ops), shapes=split(a.shapes), dtype=dtype, out=a.out, impls=split(a.impls))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
