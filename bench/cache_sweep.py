"""Block caching on the reference pipelines: ditkern's TaylorCache rows (``bench/cache_variants.py``) beside diffusers'
cache hooks and cache-dit's DBCache, on the same seeds in the same process.

``python -m bench.cache_sweep [--pipelines digits-dit,...] [--steps 28,50] [--seeds 10] [--quick] [--methods ...]``

One run per pipeline x step count: generate the seeds uncached (the reference), then each row on the same seeds,
each row's generation between two uncached ones (A-B-A: uncached, row, uncached, next row, uncached, ...; a row's
speedup = the mean of the uncached seconds before and after it / its own seconds, so load that drifts over the run
cancels). Every uncached run must reproduce the reference bit for bit (a hook left behind shows as a note). Per row:
the fraction of transformer blocks executed (a forward pre-hook on each block's attention module: the same
deterministic measure for every method), the fraction of attention computations (a pre-hook on each ``attn.to_q``:
what attention-level methods save), PSNR against the uncached images (pooled, mean of the per-image values, worst
image) and class accuracy. Results are written after every row (a partial run leaves usable files): the table as
``bench/results/cache/cache_sweep.{json,csv,md}`` (a case that is rerun replaces all its earlier rows) and one plot
per pipeline x steps (``cache_sweep_<pipeline>_<steps>.png``).

diffusers' rows: ``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig`` (its attention-level default and with
``cache_identifiers`` matching whole blocks), ``MagCacheConfig`` (calibrated first on ``ditkern.zoo.demo.CALIB_SEEDS``),
``FasterCacheConfig`` and ``PyramidAttentionBroadcastConfig``. ``DiTTransformer2DModel`` lacks diffusers'
``CacheMixin`` and ``DiTPipeline`` sets no cache context or current timestep, so here only (never in the package) the
DiT transformer gets the mixin and a forward that opens a cache context and records the timestep it was given.

cache-dit's rows (``cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...), calibrator_config=...)``, its own
block adapters for FluxPipeline and DiTPipeline): DBCache with Fn/Bn compute blocks and a residual-diff threshold,
without a calibrator and with its TaylorSeer, DMD and FoCa calibrators, and its static step mask (SCM) with
TaylorSeer. cache-dit is a bench-only extra (``pip install --no-deps --target <dir> cache-dit==1.5.3``, that dir on
PYTHONPATH: its import-time needs, torch, diffusers, transformers, packaging and pyyaml, are already the project's);
without it the rows say so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "cache"

#: The issue's goal for a row: at most this block fraction, at least these PSNRs, accuracy at most this far below.
GOAL = dict(block_fraction=0.20, psnr_mean_db=36.0, psnr_worst_db=30.0, accuracy_drop=0.02)
PSNR_CAP = 100.0  # per-image PSNRs are capped here (bit-identical images are inf)


class Method(NamedTuple):
    method: str  # the curve in the plot
    setting: str  # the point on it
    kind: str  # "ditkern", "diffusers" or "cache-dit"
    enable: Callable  # (pipe) -> note for the table
    disable: Callable  # (pipe) -> None; the pipeline must then generate exactly as before


# ---- what ran (same measure for every method) ------------------------------------------------------------------------
def _blocks(transformer):
    names = ("transformer_blocks", "single_transformer_blocks", "blocks")
    return [b for n in names for b in getattr(transformer, n, [])]


class BlockCounter:
    """Counts real block executions and attention computations: a block that runs calls its attention module (a
    skipped or cached block does not), and an attention that computes calls its ``to_q`` (a broadcast one does not)."""

    def __init__(self, transformer):
        self.runs = 0
        self.attention = 0
        self.handles = []
        self.n_blocks = len(_blocks(transformer))
        for b in _blocks(transformer):
            attn = getattr(b, "attn", None) or getattr(b, "attn1")
            self.handles.append(attn.register_forward_pre_hook(self._hit))
            self.handles.append(attn.to_q.register_forward_pre_hook(self._hit_attention))

    def _hit(self, *a):
        self.runs += 1

    def _hit_attention(self, *a):
        self.attention += 1

    def reset(self):
        self.runs = self.attention = 0

    def remove(self):
        for h in self.handles:
            h.remove()


# ---- ditkern's rows --------------------------------------------------------------------------------------------------
def ditkern_methods(name: str, steps: int, quick: bool) -> list[Method]:
    import ditkern  # noqa: PLC0415
    from bench import cache_variants  # noqa: PLC0415

    return [Method(r.method, r.setting, "ditkern", lambda p, r=r: cache_variants.apply(p, r, steps), ditkern.unpatch)
            for r in cache_variants.ditkern_rows(name, steps, quick)]  # fmt: skip


# ---- diffusers' rows -------------------------------------------------------------------------------------------------
def _enable_diffusers_cache(pipe, config):
    """transformer.enable_cache(config); DiT gets CacheMixin, a cache context and its current timestep (bench-only
    shim, see the module doc)."""
    from diffusers.models.cache_utils import CacheMixin  # noqa: PLC0415

    tr = pipe.transformer
    if not isinstance(tr, CacheMixin):
        base = type(tr)
        tr.__class__ = type(f"{base.__name__}WithCache", (base, CacheMixin), {})
        inner = tr.forward

        def forward(*args, **kwargs):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            tr._ditkern_bench_timestep = float(torch.as_tensor(t).flatten()[0]) if t is not None else None
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
        tr.__dict__.pop("_ditkern_bench_timestep", None)
        tr.__class__ = base


def _current_timestep(pipe):
    """The timestep (0-1000 scale) of the step running now: FluxPipeline's own, DiT's from the bench shim."""

    def now():
        t = getattr(pipe, "_current_timestep", None)
        if t is None:
            t = getattr(pipe.transformer, "_ditkern_bench_timestep", None)
        return float(t) if t is not None else 0.0

    return now


def _calibrate_magcache(pipe, steps):
    """MagCache's calibration mode prints the per-step magnitude ratios at the end of a generation: capture them
    (a generation of the calibration seeds, never the measured ones)."""
    import ast  # noqa: PLC0415
    import io  # noqa: PLC0415

    from diffusers import MagCacheConfig  # noqa: PLC0415

    import ditkern.zoo as zoo  # noqa: PLC0415
    from ditkern.zoo.demo import CALIB_SEEDS  # noqa: PLC0415 - the ditkern rows' calibration seeds too

    buf = io.StringIO()
    _enable_diffusers_cache(pipe, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(buf):
            zoo.generate(pipe, [s % 10 for s in CALIB_SEEDS], list(CALIB_SEEDS), num_inference_steps=steps)
    finally:
        _disable_diffusers_cache(pipe)
    for line in buf.getvalue().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]") and "MagCache" not in line:
            ratios = ast.literal_eval(line)
            if len(ratios) >= steps:
                return [float(r) for r in ratios[:steps]]
    raise RuntimeError(f"MagCache calibration printed no {steps} ratios")


def diffusers_methods(name: str, steps: int, quick: bool) -> list[Method]:
    import diffusers as d  # noqa: PLC0415

    block_ids = ["transformer_blocks\\.\\d+", "single_transformer_blocks\\.\\d+"]
    out = []

    def add(method, setting, make):  # make(pipe) -> config
        out.append(Method(method, setting, "diffusers", lambda p: _enable_diffusers_cache(p, make(p)) or "",
                          _disable_diffusers_cache))  # fmt: skip

    for th in (0.1, 0.3):
        add("diffusers FirstBlockCache", f"threshold={th}", lambda p, th=th: d.FirstBlockCacheConfig(threshold=th))
    add("diffusers TaylorSeer (attention)", "interval=3",
        lambda p: d.TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=1))  # fmt: skip
    for n in (3, 6):
        add("diffusers TaylorSeer (blocks)", f"interval={n}",
            lambda p, n=n: d.TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=2, max_order=1,
                                                   cache_identifiers=block_ids,
                                                   taylor_factors_dtype=torch.float32))  # fmt: skip
    mag = {}  # calibrated once, at the first MagCache row

    def magcache(p, th):
        if "ratios" not in mag:
            mag["ratios"] = _calibrate_magcache(p, steps)
        return d.MagCacheConfig(threshold=th, num_inference_steps=steps, mag_ratios=mag["ratios"], max_skip_steps=3)

    for th in (0.06, 0.24):
        add("diffusers MagCache", f"threshold={th},max_skip=3", lambda p, th=th: magcache(p, th))
    add("diffusers PyramidAttentionBroadcast", "skip=2,t=(100,800)",
        lambda p: d.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                    spatial_attention_timestep_skip_range=(100, 800),
                                                    current_timestep_callback=_current_timestep(p)))  # fmt: skip
    # FasterCache's reuse of the unconditional branch needs CFG batched [uncond, cond] in one call with the
    # conditioning in the kwargs it splits: DiTPipeline batches [cond, uncond] with class_labels, and the Flux
    # pipelines make two calls per step, so only its attention reuse applies (is_guidance_distilled=True turns the
    # batch split off; tensor_format is then unused)
    add("diffusers FasterCache", "skip=2,t=(-1,681),attention only",
        lambda p: d.FasterCacheConfig(spatial_attention_block_skip_range=2,
                                      spatial_attention_timestep_skip_range=(-1, 681),
                                      current_timestep_callback=_current_timestep(p),
                                      attention_weight_callback=lambda _: 0.5, tensor_format="BCHW",
                                      is_guidance_distilled=True))  # fmt: skip
    return out


# ---- cache-dit's rows ------------------------------------------------------------------------------------------------
CACHE_DIT_INSTALL = "pip install --no-deps --target <dir> cache-dit==1.5.3, then PYTHONPATH=<dir>"


def cachedit_methods(name: str, steps: int, quick: bool) -> list[Method]:
    """DBCache (Fn first blocks always computed, Bn last; the middle skipped while the residual of the first Fn
    changes less than the threshold), with and without a calibrator, and the static step mask; cache-dit's own block
    adapters (FluxPipeline: both block lists, DiTPipeline: ``transformer_blocks``). The digits Flux pipelines run CFG
    as two calls per step (``true_cfg_scale``), DiT batches it in one, hence ``enable_separate_cfg``."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    try:
        import cache_dit  # noqa: PLC0415
    except ImportError as exc:
        def missing(p, exc=exc):
            raise ImportError(f"cache-dit is not importable here ({exc}); {CACHE_DIT_INSTALL}")

        return [Method("cache-dit DBCache", "not installed", "cache-dit", missing, lambda p: None)]

    import ditkern.zoo as zoo  # noqa: PLC0415

    separate_cfg = zoo.architecture(name) != "dit"
    deep = name.endswith("-deep")
    calibrators = {
        "": lambda: None,
        " + TaylorSeer o1": lambda: cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1),
        " + TaylorSeer o2": lambda: cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=2),
        " + DMD": lambda: cache_dit.DMDCalibratorConfig(),
        " + FoCa": lambda: cache_dit.FoCaCalibratorConfig(),
    }
    out = []

    def add(method, setting, cal, **cfg):
        def enable(p):
            cc = cache_dit.DBCacheConfig(num_inference_steps=steps, enable_separate_cfg=separate_cfg, **cfg)
            cache_dit.enable_cache(p, cache_config=cc, calibrator_config=calibrators[cal]())
            return ""

        out.append(Method(method + cal, setting, "cache-dit", enable, cache_dit.disable_cache))

    def dbcache(cal, th, mc, bn=0):
        add(f"cache-dit DBCache F1B{bn}", f"threshold={th},W=2,MC={mc}", cal, Fn_compute_blocks=1,
            Bn_compute_blocks=bn, residual_diff_threshold=th, max_warmup_steps=2, max_continuous_cached_steps=mc)

    # MC (max_continuous_cached_steps) 3 floors the block fraction near 0.33 at 28 steps (2 warm-up steps, then at
    # least one computed step in four); 6 and unlimited reach 0.2-0.25 (measured on the deep pair, 4 seeds)
    dbcache("", 0.5, 3)
    for th in (0.1, 0.5):
        dbcache(" + TaylorSeer o1", th, 3)
    dbcache(" + TaylorSeer o1", 0.8, 6)
    if not quick:
        dbcache(" + TaylorSeer o1", 0.3, -1)
        for cal in (" + TaylorSeer o2", " + DMD", " + FoCa"):
            dbcache(cal, 0.8, 6)
        if deep:  # a back compute block: 1 of 16 there (1 of 4-6 on the shallow pipelines)
            dbcache(" + TaylorSeer o1", 0.8, 6, bn=1)
    mask = cache_dit.steps_mask(mask_policy="ultra", total_steps=steps)  # its sparsest: 8 of 28 steps computed
    add("cache-dit SCM static F1B0", f"mask=ultra ({sum(mask)}/{steps} steps)", " + TaylorSeer o1",
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=0, steps_computation_mask=mask,
        steps_computation_policy="static")  # fmt: skip
    return out


# ---- the run ---------------------------------------------------------------------------------------------------------
def all_methods(name: str, steps: int, quick: bool) -> list[Method]:
    return [*ditkern_methods(name, steps, quick), *diffusers_methods(name, steps, quick),
            *cachedit_methods(name, steps, quick)]


def _sha() -> str:
    sha = os.environ.get("DITKERN_GIT_SHA")
    if sha:
        return sha
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # what the run imports, changed and not committed (the working tree is shared): say so beside the sha
    dirty = git("status", "--porcelain", "--", "ditkern", "bench/cache_variants.py", "bench/cache_sweep.py")
    return git("rev-parse", "--short", "HEAD") + ("+uncommitted" if dirty else "")


def speedup_aba(before: float, method: float, after: float) -> float:
    """A-B-A: the mean of the uncached seconds on either side over the method's seconds."""
    if min(before, method, after) <= 0:
        raise ValueError(f"seconds must be positive, got before={before}, method={method}, after={after}")
    return (before + after) / 2 / method


def meets_goal(row: dict, accuracy_uncached: float) -> bool:
    return bool(row.get("block_fraction") is not None and row["block_fraction"] <= GOAL["block_fraction"] + 1e-9
                and row["psnr_mean_db"] >= GOAL["psnr_mean_db"] and row["psnr_worst_db"] >= GOAL["psnr_worst_db"]
                and row["accuracy"] >= accuracy_uncached - GOAL["accuracy_drop"] - 1e-9)  # fmt: skip


def run_case(name: str, steps: int, n_seeds: int, quick: bool, out_dir: Path, methods=None, progress=True,
             make_methods=all_methods, settings=None) -> list[dict]:  # fmt: skip
    """One pipeline x step count: the reference, then every row A-B-A; writes the table after every row."""
    from tqdm import tqdm  # noqa: PLC0415

    import ditkern.zoo as zoo  # noqa: PLC0415
    from ditkern.zoo import classifier  # noqa: PLC0415
    from ditkern.zoo.fidelity import psnr  # noqa: PLC0415

    pipe = zoo.load(name)
    seeds = list(range(n_seeds))
    classes = [s % 10 for s in seeds]
    rows_meta = dict(pipeline=name, steps=steps, seeds=n_seeds, date=time.strftime("%Y-%m-%d"), sha=_sha())
    todo = [m for m in make_methods(name, steps, quick)
            if (not methods or m.method in methods) and (not settings or m.setting in settings)]  # fmt: skip
    counter = BlockCounter(pipe.transformer)

    def gen():
        counter.reset()
        t0 = time.perf_counter()
        imgs = zoo.generate(pipe, classes, seeds, num_inference_steps=steps)
        return imgs, time.perf_counter() - t0, counter.runs, counter.attention

    rows: list[dict] = []
    try:
        zoo.generate(pipe, classes[:1], seeds[:1], num_inference_steps=2)  # warm-up
        ref, t_before, runs_ref, attn_ref = gen()
        acc_ref = classifier.accuracy(ref, classes)
        rows.append(dict(rows_meta, method="uncached", kind="uncached", setting="", block_fraction=1.0,
                         attention_fraction=1.0, speedup=1.0, seconds=t_before, seconds_uncached=t_before,
                         psnr_pooled_db=math.inf, psnr_mean_db=PSNR_CAP, psnr_worst_db=math.inf, accuracy=acc_ref,
                         accuracy_uncached=acc_ref, meets_goal=False, error="", note=""))  # fmt: skip
        write_case(rows, out_dir)
        for m in tqdm(todo, desc=f"{name} {steps} steps", disable=not progress, file=sys.stderr):
            row = dict(rows_meta, method=m.method, kind=m.kind, setting=m.setting, accuracy_uncached=acc_ref,
                       error="", note="")  # fmt: skip
            try:
                row["note"] = m.enable(pipe) or ""
                try:
                    imgs, secs, runs, attn = gen()
                finally:
                    m.disable(pipe)
            except Exception as exc:  # a baseline that fails on this model is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                rows.append(row)
                write_case(rows, out_dir)
                continue
            again, t_after, _, _ = gen()
            notes = [row["note"]] if row["note"] else []
            if runs == runs_ref and attn == attn_ref and torch.equal(imgs, ref):
                notes.append("changed nothing on this model (every block and attention ran, bit-identical)")
            if not torch.equal(again, ref):  # the method left something behind: later rows would be wrong too
                notes.append("uncached run after it differs from the reference")
            row["note"] = "; ".join(notes)
            p = psnr(imgs, ref)
            mse = ((imgs - ref) ** 2).mean().item()
            row.update(block_fraction=runs / runs_ref, attention_fraction=attn / attn_ref,
                       speedup=speedup_aba(t_before, secs, t_after), seconds=secs,
                       seconds_uncached=(t_before + t_after) / 2,
                       psnr_pooled_db=math.inf if mse == 0 else -10 * math.log10(mse),
                       psnr_mean_db=float(p.clamp(max=PSNR_CAP).mean()), psnr_worst_db=float(p.min()),
                       accuracy=classifier.accuracy(imgs, classes))  # fmt: skip
            row["meets_goal"] = meets_goal(row, acc_ref)
            rows.append(row)
            t_before = t_after
            write_case(rows, out_dir, plot_it=False)
    finally:
        counter.remove()
    write_case(rows, out_dir)
    return rows


# ---- tables and plots ------------------------------------------------------------------------------------------------
def _case(r):
    return (r["pipeline"], r["steps"])


def _cap(v):
    return PSNR_CAP if v is None or math.isinf(v) else v


def compute_fraction(row: dict) -> float:
    """The x of the frontier: the fraction of attention computations, which is the block fraction for every
    block-level method; attention-level ones (PAB, FasterCache, diffusers' attention TaylorSeer) run every block and
    MLP, so measuring them by their attention alone favours them."""
    return min(row["block_fraction"], row.get("attention_fraction", row["block_fraction"]))


def _attention_level(row: dict) -> bool:
    """Whether the row's method ran every block and saved attention computations only."""
    return row.get("attention_fraction", row["block_fraction"]) < row["block_fraction"] - 1e-9


def frontier(rows: list[dict], up_to: float = 1.0) -> dict[str, dict[str, float | int | None]]:
    """Per non-ditkern method of one case: the least margin of ditkern's frontier over its rows at a compute fraction
    of at most ``up_to``, per metric (mean, worst). A row's margin = the best ditkern PSNR at the same or a lower
    compute fraction, minus the row's (negative: that method is above ditkern there); rows below every ditkern row's
    fraction are counted as uncovered. Rows at a compute fraction of 1 (a method that ran every block and attention,
    e.g. diffusers' attention-level TaylorSeer on DiT, whose processors it does not hook) save nothing and are left
    out: they are the uncached images, not a point of a caching curve. ditkern's attention-level rows (every block
    and MLP runs) cover only other attention-level rows: placed at their attention fraction they would favour ditkern
    over a block-level method as much as that placement favours attention-level peers."""
    ok = [r for r in rows if not r.get("error") and r["method"] != "uncached" and r.get("block_fraction") is not None
          and compute_fraction(r) < 1 - 1e-9]  # fmt: skip
    ours = [r for r in ok if r["kind"] == "ditkern"]
    out: dict[str, dict[str, float | int | None]] = {}
    for m in dict.fromkeys(r["method"] for r in ok if r["kind"] != "ditkern"):
        theirs = [r for r in ok if r["method"] == m and compute_fraction(r) <= up_to + 1e-9]
        if not theirs:
            continue
        cover = ours if all(_attention_level(r) for r in theirs) else [o for o in ours if not _attention_level(o)]
        res: dict[str, float | int | None] = {}
        for key in ("psnr_mean_db", "psnr_worst_db"):
            margins = []
            for r in theirs:
                best = [_cap(o[key]) for o in cover if compute_fraction(o) <= compute_fraction(r) + 1e-9]
                margins.append(max(best) - _cap(r[key]) if best else None)
            known = [x for x in margins if x is not None]
            res[key] = min(known) if known else None
            res[key + "_uncovered"] = len(margins) - len(known)
        out[m] = res
    return out


def _fmt(v, nd=2):
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{nd}f}"
    return str(v)


def _load(out_dir: Path) -> list[dict]:
    prev = out_dir / "cache_sweep.json"
    text = prev.read_text() if prev.exists() else ""
    if not text.strip():  # none yet (the lock's open creates it empty)
        return []
    return [r for r in json.loads(text)["rows"] if "kind" in r]  # rows before the A-B-A harness: dropped


def write_case(case_rows: list[dict], out_dir: Path, plot_it: bool = True):
    """Replace this case's rows in the table (other cases' rows are kept) and rewrite it; plot this case. Runs of
    other cases in other processes may write the same table: the read-merge-write holds a lock."""
    import fcntl  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    cases = {_case(r) for r in case_rows}
    with open(out_dir / "cache_sweep.json", "a+") as lock:  # a+: opened without truncating
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [r for r in _load(out_dir) if _case(r) not in cases] + case_rows
        write(rows, out_dir, plot_cases=())
    if plot_it:
        plot(case_rows, out_dir / f"cache_sweep_{case_rows[0]['pipeline']}_{case_rows[0]['steps']}.png")


def _method_order(rows):
    kinds = {"uncached": 0, "ditkern": 1, "diffusers": 2, "cache-dit": 3}
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r["method"], i)
    return lambda r: (kinds.get(r["kind"], 9), first[r["method"]])


def write(rows: list[dict], out_dir: Path, plot_cases=None):
    """The json, csv and markdown of every row, and the plots of ``plot_cases`` (None: every case)."""
    import csv  # noqa: PLC0415

    order = _method_order(rows)
    rows = sorted(rows, key=lambda r: (_case(r), order(r)))
    meta = dict(goal=GOAL, torch=torch.__version__, written=time.strftime("%Y-%m-%d %H:%M"))
    (out_dir / "cache_sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    fields = ["pipeline", "steps", "seeds", "method", "kind", "setting", "block_fraction", "attention_fraction",
              "speedup", "seconds", "seconds_uncached", "psnr_pooled_db", "psnr_mean_db", "psnr_worst_db", "accuracy",
              "accuracy_uncached", "meets_goal", "date", "sha", "error", "note"]  # fmt: skip
    with open(out_dir / "cache_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out_dir / "cache_sweep.md").write_text(markdown(rows))
    for case in sorted({_case(r) for r in rows} if plot_cases is None else plot_cases):
        plot([r for r in rows if _case(r) == case], out_dir / f"cache_sweep_{case[0]}_{case[1]}.png")


def markdown(rows: list[dict]) -> str:
    g = GOAL
    lines = ["# Block caching on the reference pipelines (CPU, one thread)", "",
             "One run per pipeline x steps (same seeds, same process; each case says its seeds, date and git sha). "
             "'blocks' = block executions / uncached (deterministic); 'attn' = attention computations / uncached "
             "(what attention-level methods save; equal to 'blocks' for block-level ones); speedup = A-B-A wall time "
             "(mean of the uncached runs before and after the row / the row's, one thread on a shared 2-core "
             "machine). PSNR against the uncached images of the same seeds: pooled (of the MSE over all images), "
             f"mean of the per-image values (capped at {PSNR_CAP:.0f} dB), worst image. "
             f"'goal' = blocks <= {g['block_fraction']}, mean >= {g['psnr_mean_db']:.0f} dB, worst >= "
             f"{g['psnr_worst_db']:.0f} dB, accuracy at most {g['accuracy_drop'] * 100:.0f} points below uncached.", ""]
    for case in sorted({_case(r) for r in rows}):
        sel = [r for r in rows if _case(r) == case]
        r0 = sel[0]
        head = "| method | setting | blocks | attn | speedup | PSNR pooled | mean | worst | accuracy | goal | note |"
        later = {}  # rows merged in from a later run (their own date and sha): say which
        for r in sel:
            if (r["date"], r["sha"]) != (r0["date"], r0["sha"]):
                later.setdefault((r["date"], r["sha"]), []).append(f"{r['method']} {r['setting']}")
        also = "".join(f"; {', '.join(m)}: {d} at {sha}" for (d, sha), m in later.items())
        lines += [f"## {case[0]}, {case[1]} steps ({r0['seeds']} seeds, {r0['date']} at {r0['sha']}{also})", "",
                  head, "|---" * head.count(" | ") + "|---|"]
        for r in sel:
            lines.append("| " + " | ".join([
                r["method"], r["setting"], _fmt(r.get("block_fraction")), _fmt(r.get("attention_fraction")),
                _fmt(r.get("speedup")) + ("x" if r.get("speedup") else ""), _fmt(r.get("psnr_pooled_db"), 1),
                _fmt(r.get("psnr_mean_db"), 1), _fmt(r.get("psnr_worst_db"), 1), _fmt(r.get("accuracy")),
                _fmt(r.get("meets_goal")), r.get("error") or r.get("note", "")]) + " |")  # fmt: skip
        met = [f"{r['method']} {r['setting']}" for r in sel if r.get("meets_goal")]
        lines += ["", "Rows that meet the goal: " + ("; ".join(met) if met else "none") + ".", ""]
        full, low = frontier(sel), frontier(sel, up_to=0.5)
        if full:
            lines += ["ditkern's frontier against each other method: the least margin (dB) of the best ditkern row at "
                      "the same or a lower compute fraction (attention computations; = blocks for block-level "
                      "methods) over that method's rows, over all its rows / over those at <= 0.5 (negative: the "
                      "method is above ditkern there; 'n uncovered': rows below every ditkern row's fraction; "
                      "ditkern's attention-level rows count against attention-level methods only).", "",
                      "| method | mean PSNR: all | <= 0.5 | worst image: all | <= 0.5 |", "|---|---|---|---|---|"]

            def cell(v, k):
                if v is None:  # no row of that method in the range
                    return "-"
                value = _fmt(v[k], 1) if v[k] is not None else "no ditkern row as low"
                return value + (f" ({v[k + '_uncovered']} uncovered)" if v[k + "_uncovered"] else "")

            for m, v in full.items():
                lines.append(f"| {m} | {cell(v, 'psnr_mean_db')} | {cell(low.get(m), 'psnr_mean_db')} | "
                             f"{cell(v, 'psnr_worst_db')} | {cell(low.get(m), 'psnr_worst_db')} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path):
    """One case: mean and worst-image PSNR against the fraction of blocks run, one curve per method (up and to the
    left is better; the goal's lines at 0.20 blocks and 36 / 30 dB)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    sel = [r for r in rows if r["method"] != "uncached" and not r.get("error") and r.get("block_fraction") is not None]
    if not sel:
        return
    name, steps, seeds = rows[0]["pipeline"], rows[0]["steps"], rows[0]["seeds"]
    methods = list(dict.fromkeys(r["method"] for r in sorted(sel, key=_method_order(rows))))
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, key in ((axes[0], "psnr_mean_db"), (axes[1], "psnr_worst_db")):
        goal = GOAL[key]
        for i, m in enumerate(methods):
            mine = [r for r in sel if r["method"] == m]
            pts = sorted((compute_fraction(r), min(_cap(r[key]), 60.0)) for r in mine)
            kind = mine[0]["kind"]
            if any(compute_fraction(r) < r["block_fraction"] - 1e-9 for r in mine):
                m += " (x: attention computations)"
            style = {"ditkern": "-o", "diffusers": "--s"}.get(kind, ":^")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=cmap(i % 20), label=m, markersize=4,
                    lw=1.6 if kind == "ditkern" else 1.0)
        ax.axhline(goal, color="grey", lw=0.8, ls=":")
        ax.axvline(GOAL["block_fraction"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel("fraction of block executions (attention computations for attention-level methods)", fontsize=8)
        ax.set_ylabel(("mean" if key == "psnr_mean_db" else "worst-image") + " PSNR vs uncached, dB (capped at 60)",
                      fontsize=8)
        ax.set_title(f"{name}, {steps} steps, {seeds} seeds")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.cache_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipelines", default="digits-dit,digits-flux,digits-dit-deep,digits-flux-deep")
    p.add_argument("--steps", default="28,50", help="comma-separated step counts, one run each")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="fewer settings")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--methods", help="comma-separated method names to run (the case's other rows are dropped)")
    p.add_argument("--settings", help="';'-separated settings to run (e.g. 'budget=0.36'; the others are dropped)")
    p.add_argument("--rewrite", action="store_true", help="only rewrite the CSV, markdown and plots from the JSON")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine two threads spin-wait ~20x the CPU time)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.rewrite:
        write(_load(out), out)
        print((out / "cache_sweep.md").read_text())
        return 0
    torch.set_num_threads(a.threads)
    methods = set(a.methods.split(",")) if a.methods else None
    for name in a.pipelines.split(","):
        for steps in (int(s) for s in a.steps.split(",")):
            run_case(name, steps, a.seeds, a.quick, out, methods=methods, settings=set(a.settings.split(";")) if a.settings else None)
    print((out / "cache_sweep.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
