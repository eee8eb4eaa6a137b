"""Block caching on the reference pipelines: ditkern's TaylorCache (fixed, end-anchored, calibrated budget, gated and
calibrated gate) vs diffusers' own cache hooks.

``python -m bench.cache_sweep [--steps 50] [--seeds 20] [--pipelines digits-dit,digits-flux] [--quick]``

The calibrated rows (``ditkern budget``, ``ditkern gated o1 calibrated``) are calibrated with
``ditkern.cache.calibrate`` on their own seeds (``CALIB_SEEDS``, never the measured ones) before they are measured; the
block fraction counts only the measured generations.

For each pipeline: generate the seeds uncached (the reference), then once per setting, same seeds, same run, and
report the wall-time speedup over uncached, the fraction of transformer blocks actually executed (counted by a
forward pre-hook on each block's attention module, so it is the same measure for every method and deterministic),
PSNR against the uncached images (pooled over the set, and the worst image), and class accuracy. Writes
``bench/results/cache/cache_sweep.{csv,md,json}`` and a speedup-vs-PSNR plot, one curve per method.

diffusers' baselines: ``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig`` (its default attention-level mode, and with
``cache_identifiers`` matching whole transformer blocks) and ``MagCacheConfig`` (calibrated on the same model first).
``DiTTransformer2DModel`` lacks diffusers' ``CacheMixin`` and DiTPipeline sets no cache context, so here only (never
in the package) the DiT transformer gets the mixin and a forward that opens a cache context.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "cache"


# ---- block execution counter (same for every method) ------------------------------------------------------------------
def _blocks(transformer):
    names = ("transformer_blocks", "single_transformer_blocks", "blocks")
    return [b for n in names for b in getattr(transformer, n, [])]


class BlockCounter:
    """Counts real block executions: a block that runs calls its attention module; a skipped or cached one does not."""

    def __init__(self, transformer):
        self.runs = 0
        self.handles = []
        self.n_blocks = len(_blocks(transformer))
        for b in _blocks(transformer):
            attn = getattr(b, "attn", None) or getattr(b, "attn1")
            self.handles.append(attn.register_forward_pre_hook(self._hit))

    def _hit(self, *a):
        self.runs += 1

    def remove(self):
        for h in self.handles:
            h.remove()


# ---- diffusers' baselines ---------------------------------------------------------------------------------------------
def _enable_diffusers_cache(pipe, config):
    """transformer.enable_cache(config); DiT gets CacheMixin and a cache context (bench-only shim, see module doc)."""
    from diffusers.models.cache_utils import CacheMixin  # noqa: PLC0415

    tr = pipe.transformer
    if not isinstance(tr, CacheMixin):
        base = type(tr)
        tr.__class__ = type(f"{base.__name__}WithCache", (base, CacheMixin), {})
        inner = tr.forward

        def forward(*args, **kwargs):
            with tr.cache_context("cond_uncond"):
                return inner(*args, **kwargs)

        tr.forward = forward
        tr._ditkern_bench_shim = base
    tr.enable_cache(config)


def _disable_diffusers_cache(pipe):
    tr = pipe.transformer
    tr.disable_cache()
    base = tr.__dict__.pop("_ditkern_bench_shim", None)
    if base is not None:
        del tr.forward
        tr.__class__ = base


def _calibrate_magcache(pipe, classes, seeds, steps):
    """MagCache's calibration mode prints the per-step magnitude ratios at the end of a generation: capture them."""
    import ast  # noqa: PLC0415
    import io  # noqa: PLC0415

    from diffusers import MagCacheConfig  # noqa: PLC0415

    import ditkern.zoo as zoo  # noqa: PLC0415

    buf = io.StringIO()
    _enable_diffusers_cache(pipe, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(buf):
            zoo.generate(pipe, classes[:2], seeds[:2], num_inference_steps=steps)
    finally:
        _disable_diffusers_cache(pipe)
    for line in buf.getvalue().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]") and "MagCache" not in line:
            ratios = ast.literal_eval(line)
            if len(ratios) >= steps:
                return [float(r) for r in ratios[:steps]]
    return None


CALIB_SEEDS = (1000, 1001)  # the calibration's seeds (classes seed % 10), apart from the measured 0..n-1


def settings(name: str, steps: int, quick: bool):
    """(method, label, kind, config) tuples; kind is "ditkern", "ditkern-cal" (calibrated first) or "diffusers"."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig  # noqa: PLC0415

    from ditkern import TaylorCache  # noqa: PLC0415

    block_ids = ["transformer_blocks\\.\\d+", "single_transformer_blocks\\.\\d+"]
    out = []
    intervals = (3, 6) if quick else (2, 3, 4, 6)
    gates = (0.02, 0.08) if quick else (0.01, 0.02, 0.04, 0.08)
    for order in (1, 2):
        for n in intervals:
            out.append((f"ditkern fixed o{order}", f"interval={n}", "ditkern", TaylorCache(order=order, interval=n)))
    for n in (4, 5, 6) if quick else (2, 3, 4, 5, 6):
        out.append(("ditkern end-anchored o1", f"interval={n}", "ditkern", TaylorCache.end_anchored(steps, n, order=1)))
    for b in (0.15, 0.18, 0.2, 0.25):
        out.append(("ditkern budget o1", f"budget={b}", "ditkern-cal", TaylorCache(order=1, budget=b)))
    for g in ((0.1, 0.3) if quick else (0.05, 0.1, 0.2, 0.4)):
        out.append(("ditkern gated o1 calibrated", f"gate={g},max_skip=3", "ditkern-cal",
                    TaylorCache(order=1, gate=g, warmup=2, max_skip=3)))  # fmt: skip
    for order in (0, 1, 2):
        for g in gates:
            out.append((f"ditkern gated o{order}", f"gate={g},max_skip=3", "ditkern",
                        TaylorCache(order=order, gate=g, warmup=2, max_skip=3)))  # fmt: skip
    for th in ((0.05, 0.2) if quick else (0.02, 0.05, 0.1, 0.2)):
        out.append(("diffusers FirstBlockCache", f"threshold={th}", "diffusers", FirstBlockCacheConfig(threshold=th)))
    out.append(("diffusers TaylorSeer (attention)", "interval=3", "diffusers",
                TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=1)))  # fmt: skip
    for n in intervals:
        out.append(("diffusers TaylorSeer (blocks)", f"interval={n}", "diffusers",
                    TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=2, max_order=1,
                                          cache_identifiers=block_ids, taylor_factors_dtype=torch.float32)))  # fmt: skip
    return out


def run(pipelines, steps, n_seeds, quick, out_dir: Path, progress=True, methods=None):
    from tqdm import tqdm  # noqa: PLC0415

    import ditkern  # noqa: PLC0415
    import ditkern.zoo as zoo  # noqa: PLC0415
    from ditkern.zoo import classifier  # noqa: PLC0415
    from ditkern.zoo.fidelity import psnr  # noqa: PLC0415

    rows = []
    for name in pipelines:
        pipe = zoo.load(name)
        first = len(rows)
        seeds = list(range(n_seeds))
        classes = [s % 10 for s in seeds]
        sett = settings(name, steps, quick)
        mag = _calibrate_magcache(pipe, classes, seeds, steps) if not methods or any("MagCache" in m for m in methods) else None
        if mag is not None:
            from diffusers import MagCacheConfig  # noqa: PLC0415

            for th in ((0.06, 0.24) if quick else (0.03, 0.06, 0.12)):
                sett.append(("diffusers MagCache", f"threshold={th}", "diffusers",
                             MagCacheConfig(threshold=th, num_inference_steps=steps, mag_ratios=mag, max_skip_steps=3)))  # fmt: skip
        if methods:
            sett = [x for x in sett if x[0] in methods]
        counter = BlockCounter(pipe.transformer)

        def gen():
            counter.runs = 0
            t0 = time.perf_counter()
            imgs = zoo.generate(pipe, classes, seeds, num_inference_steps=steps)
            return imgs, time.perf_counter() - t0, counter.runs

        zoo.generate(pipe, classes[:1], seeds[:1], num_inference_steps=2)  # warm-up
        ref, t_ref, runs_ref = gen()
        acc_ref = classifier.accuracy(ref, classes)
        rows.append(dict(pipeline=name, method="uncached", setting="", speedup=1.0, block_fraction=1.0,
                         psnr_db=math.inf, psnr_worst_db=math.inf, psnr_mean_db=100.0, accuracy=acc_ref, seconds=t_ref,
                         error="", steps=steps))  # fmt: skip
        for method, label, kind, cfg in tqdm(sett, desc=name, disable=not progress, file=sys.stderr):
            detail = ""
            try:
                if kind.startswith("ditkern"):
                    ditkern.patch(pipe, cache=cfg)
                    if kind == "ditkern-cal":
                        cal = [s % 10 for s in CALIB_SEEDS]
                        run_cal = lambda: zoo.generate(pipe, cal, list(CALIB_SEEDS), num_inference_steps=steps)  # noqa: E731
                        with warnings.catch_warnings(record=True) as said:
                            warnings.simplefilter("always")
                            done = ditkern.cache.calibrate(pipe, run_cal)
                        detail = f"schedule={list(done.schedule)}" if done.schedule else ""
                        detail += "; ".join(str(w.message)[:120] for w in said if "TaylorCache" in str(w.message))
                else:
                    _enable_diffusers_cache(pipe, cfg)
                try:
                    imgs, secs, runs = gen()
                finally:
                    ditkern.unpatch(pipe) if kind.startswith("ditkern") else _disable_diffusers_cache(pipe)
            except Exception as exc:  # a baseline that fails on this model is reported, not fatal
                rows.append(dict(pipeline=name, method=method, setting=label, speedup=None, block_fraction=None,
                                 psnr_db=None, psnr_worst_db=None, psnr_mean_db=None, accuracy=None, seconds=None,
                                 error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", steps=steps))  # fmt: skip
                continue
            p = psnr(imgs, ref)
            mse = ((imgs - ref) ** 2).mean().item()
            rows.append(dict(
                pipeline=name, method=method, setting=label, speedup=t_ref / secs, block_fraction=runs / runs_ref,
                psnr_db=math.inf if mse == 0 else -10 * math.log10(mse), psnr_worst_db=float(p.min()),
                psnr_mean_db=float(p.clamp(max=100.0).mean()),
                accuracy=classifier.accuracy(imgs, classes), seconds=secs, error="", detail=detail, steps=steps,
            ))  # fmt: skip
        counter.remove()
        for r in rows[first:]:
            r["seeds"] = n_seeds
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    write(rows, dict(steps=steps, seeds=n_seeds, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), sha=sha), out_dir)
    return rows


def _fmt(v, nd=2):
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{nd}f}"
    return str(v)


def write(rows, meta, out_dir: Path):
    """Write the table; rows of pipelines not in this run are kept from the previous file (run them separately)."""
    import csv  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    prev = out_dir / "cache_sweep.json"
    def key(r):
        return (r["pipeline"], r.get("steps"), r["method"], r["setting"])

    if prev.exists():  # keep earlier rows that this run did not redo (same pipeline, steps, method and setting)
        old = json.loads(prev.read_text())
        for r in old["rows"]:  # rows from before the per-row step count: the file's
            r.setdefault("steps", old["meta"]["steps"])
            r.setdefault("date", old["meta"].get("date", ""))
            r.setdefault("sha", old["meta"].get("sha", ""))
        done = {key(r) for r in rows}
        rows = [r for r in old["rows"] if key(r) not in done] + rows
    for r in rows:
        r.setdefault("date", meta["date"])
        r.setdefault("sha", meta.get("sha", ""))
    order = {m: i for i, m in enumerate(dict.fromkeys(["uncached"] + [x[0] for x in settings("", meta["steps"], False)] + ["diffusers MagCache"]))}
    rows = sorted(rows, key=lambda r: (r["pipeline"], r["steps"], order.get(r["method"], 99), r["setting"]))
    (out_dir / "cache_sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    with open(out_dir / "cache_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    seeds = {r["pipeline"]: r.get("seeds", 10) for r in rows}
    desc = ", ".join(f"{p}: {n} seeds" for p, n in sorted(seeds.items()))
    lines = [f"# Block caching on the reference pipelines ({desc}; CPU; last run {meta['date']} at {meta.get('sha', '?')})", ""]
    lines.append("Each row says its sampling steps and the date and git sha it was measured at; rows of one pipeline and "
                 "step count come from one run (same seeds, same process).")
    lines.append("")
    lines.append("Wall-time speedups were measured on a 2-core machine shared with other jobs: they are noisy (the tiny "
                 "models take seconds per set), so 'blocks run' (deterministic) is the speed measure to compare.")
    lines.append("")
    lines.append("PSNR against the uncached images of the same seeds: pooled = of the mean squared error over all images; "
                 "mean = of the per-image PSNRs (each capped at 100 dB); worst = the lowest image's. "
                 "'blocks run' = block executions / uncached block executions.")
    lines.append("")
    lines.append("| pipeline | steps | method | setting | speedup | blocks run | PSNR pooled | PSNR mean | PSNR worst | accuracy | date, sha | note |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append("| " + " | ".join([r["pipeline"], str(r["steps"]), r["method"], r["setting"], _fmt(r["speedup"]) + ("x" if r["speedup"] else ""),
                                        _fmt(r["block_fraction"]), _fmt(r["psnr_db"], 1), _fmt(r.get("psnr_mean_db"), 1),
                                        _fmt(r["psnr_worst_db"], 1),
                                        _fmt(r["accuracy"]), f"{r['date']} {r['sha']}".strip(),
                                        r["error"] or r.get("detail", "")]) + " |")  # fmt: skip
    (out_dir / "cache_sweep.md").write_text("\n".join(lines) + "\n")
    plot(rows, out_dir / "cache_sweep.png")


def plot(rows, path: Path):
    """Per pipeline and step count: mean and worst-image PSNR against the fraction of blocks run, one curve per
    method (the issue's frontier: up and to the left is better)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cases = sorted({(r["pipeline"], r["steps"]) for r in rows})
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 4.8 * len(cases)), squeeze=False)
    for row_axes, (name, steps) in zip(axes, cases):
        sel = [r for r in rows if (r["pipeline"], r["steps"]) == (name, steps) and r["method"] != "uncached" and r["speedup"]]
        for ax, key, goal in ((row_axes[0], "psnr_mean_db", 36), (row_axes[1], "psnr_worst_db", 30)):
            for m in sorted({r["method"] for r in sel}):
                pts = sorted((r["block_fraction"], min(r[key], 60.0)) for r in sel if r["method"] == m)
                style = "-o" if m.startswith("ditkern") else "--s"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=m, markersize=4)
            ax.axhline(goal, color="grey", lw=0.8, ls=":")
            ax.axvline(0.2, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("fraction of block executions (deterministic)", fontsize=8)
            ax.set_ylabel(("mean" if key == "psnr_mean_db" else "worst-image") + " PSNR vs uncached, dB (capped at 60)", fontsize=8)
            ax.set_title(f"{name}, {steps} steps")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.cache_sweep", description=__doc__)
    p.add_argument("--pipelines", default="digits-dit,digits-flux")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="fewer settings")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--methods", help="comma-separated method names to (re)run, e.g. 'ditkern gated o2'")
    p.add_argument("--rewrite", action="store_true", help="only rewrite the CSV, markdown and plot from the JSON")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine two threads spin-wait ~20x the CPU time)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.rewrite:
        saved = json.loads((Path(a.out) / "cache_sweep.json").read_text())
        write(saved["rows"], saved["meta"], Path(a.out))
        print((Path(a.out) / "cache_sweep.md").read_text())
        return 0
    methods = set(a.methods.split(",")) if a.methods else None
    rows = run(a.pipelines.split(","), a.steps, a.seeds, a.quick, Path(a.out), methods=methods)
    print((Path(a.out) / "cache_sweep.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
