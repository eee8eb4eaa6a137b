"""``python -m ditkern demo``: the reference pipelines, unpatched beside every patch setting, with the numbers.

:func:`run_demo` loads each pipeline, generates a grid of digits (column = class) unpatched once (timed once: the
fastest of TIMING_REPEATS runs; shared by every row of that pipeline) and again under each setting
(``ditkern.patch(pipe, **options)``), prints the patch reports, the fidelity/speed table, the weight memory and cache
figures and what this machine can and cannot show, and writes one PNG: a row per pipeline (unpatched | each setting,
measurements in the captions) and a speed-vs-PSNR plot of every row.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch

from . import FAST_NAMES
from .fidelity import FidelityTable, _patch_callables, compare, unpatched_run

# Each side's seconds are the fastest of this many identical runs: a generation of these small pipelines takes
# 0.6-2 s on a CPU, where one run of identical code measured 0.81x-1.10x of another (5 demo runs on 2 idle cores).
TIMING_REPEATS = 3

#: The seeds a ``TaylorCache(budget=...)`` row is calibrated on (``ditkern.cache.calibrate``, untimed, right after it is
#: patched: once per pipeline and step count, as a user would), apart from the seeds the demo shows and measures. Six,
#: not two: on the 2026-12-04 sweep's 160 budget rows six measured +0.37 dB mean / +0.34 dB worst image above two on
#: average (docs/cache.md, "How many calibration seeds").
CALIB_SEEDS = tuple(range(1000, 1006))


def _needs_calibration(opts) -> bool:
    cache = opts.get("cache") if isinstance(opts, dict) else None
    return getattr(cache, "budget", None) is not None and getattr(cache, "schedule", None) is None


def _calibrate_cache(pipe, sampler) -> None:
    """Calibrate the budget cache patched on ``pipe`` on :data:`CALIB_SEEDS` with the demo's sampler, then zero its
    counters (the demo's block fraction counts only the measured generations)."""
    import ditkern.cache  # noqa: PLC0415

    from . import generate  # noqa: PLC0415

    classes = [s % 10 for s in CALIB_SEEDS]
    ditkern.cache.calibrate(pipe, lambda: generate(pipe, classes, list(CALIB_SEEDS), **(sampler or {})))
    ditkern.cache.reset_stats(pipe)


def _grid(images: torch.Tensor, ncol: int = 5) -> torch.Tensor:
    n, _, h, w = images.shape
    ncol = min(ncol, n)
    nrow = math.ceil(n / ncol)
    canvas = torch.ones(nrow * (h + 2) + 2, ncol * (w + 2) + 2)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = images[i, 0]
    return canvas


def _fmt_db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages of a module's parameters and buffers (what its weights hold in memory)."""
    seen = {}
    for t in [*module.parameters(), *module.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def save_figure(table: FidelityTable, out_path: str) -> str:
    """A row per pipeline: its unpatched grid, then one grid per setting (captions: time, PSNR, accuracy); below, a
    speed-vs-PSNR plot of every row (bit-identical rows are drawn at the top edge, labelled inf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_pipe: dict[str, list] = {}
    for r in table.rows:
        by_pipe.setdefault(r.pipeline, []).append(r)
    ncols = 1 + max(len(rs) for rs in by_pipe.values())
    g0 = _grid(table.rows[0].images_unpatched)
    cell_h = 3.2 * g0.shape[0] / g0.shape[1] + 0.9
    fig = plt.figure(figsize=(3.4 * ncols, cell_h * len(by_pipe) + 4.2))
    spec = fig.add_gridspec(len(by_pipe) + 1, ncols, height_ratios=[cell_h] * len(by_pipe) + [4.0])
    for i, (name, rs) in enumerate(by_pipe.items()):
        r0 = rs[0]
        cells = [(r0.images_unpatched, f"{name} unpatched ({r0.sampler.get('num_inference_steps')} steps)\n"
                                       f"{r0.seconds_unpatched:.2f} s, accuracy {r0.accuracy_unpatched:.0%}")]
        cells += [(r.images_patched, f"{r.setting}\n{r.seconds_patched:.2f} s ({r.speedup:.2f}x), PSNR "
                                     f"{_fmt_db(r.psnr_db)} dB, acc {r.accuracy_patched:.0%}") for r in rs]
        for j, (images, title) in enumerate(cells):
            ax = fig.add_subplot(spec[i, j])
            ax.imshow(_grid(images).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    ax = fig.add_subplot(spec[-1, :])
    finite = [r.psnr_db for r in table.rows if math.isfinite(r.psnr_db)]
    top = (max(finite) if finite else 40.0) + 10.0
    for k, (name, rs) in enumerate(by_pipe.items()):
        xs, ys = [r.speedup for r in rs], [r.psnr_db if math.isfinite(r.psnr_db) else top for r in rs]
        ax.scatter(xs, ys, label=name, s=40)
        for r, x, y in zip(rs, xs, ys):  # each pipeline's labels one line lower: the rows at inf share a height
            ax.annotate(r.setting + (" (bit-identical)" if math.isinf(r.psnr_db) else ""), (x, y), fontsize=7,
                        xytext=(4, 3 - 9 * k), textcoords="offset points")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("speedup over unpatched (same run)")
    ax.set_ylabel("PSNR vs unpatched, dB (higher = closer)")
    ax.set_title("speed vs fidelity, every setting", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def machine_line(threads: int | None = None) -> str:
    """What this machine can and cannot show about ditkern (``threads``: the intra-op threads the demo ran on)."""
    if torch.cuda.is_available():
        return (f"this machine: GPU ({torch.cuda.get_device_name()}): the kernel speed shows in every row; these "
                "reference models are tiny (launch-bound), so for speed at real model size run `python -m bench.e2e`.")
    return (f"this machine: CPU ({threads or torch.get_num_threads()} thread(s)): no fused kernel runs on a CPU (the "
            "lossless patch keeps the modules' native ops there), so the lossless row can show no speedup beyond "
            "timing noise; what a CPU can show is caching (blocks skipped: wall time saved) and quantization's "
            "weight memory (above; its CPU path dequantizes per call, so it is slower here). Kernel speed needs a GPU "
            "(`python -m bench.e2e`, `make bench` there).")


def run_demo(
    out_path: str = "out/ditkern_demo.png",
    patch_options: dict | None = None,
    seeds: Sequence[int] | None = None,
    rows: int = 1,
    pipelines: Sequence[str] = FAST_NAMES,
    settings: dict[str, dict] | None = None,
    apply: Callable | None = None,
    undo: Callable | None = None,
    sampler: dict | None = None,
    progress: bool = True,
    verbose: bool = True,
    warmup: bool | int | None = None,
    threads: int | None = None,
) -> FidelityTable:
    """Run the demo and return its :class:`~ditkern.zoo.fidelity.FidelityTable` (one row per pipeline x setting).

    settings: {label: options for ``ditkern.patch(pipe, **options)``} (``ditkern.unpatch(pipe)`` undoes each);
        without it, one row with ``patch_options``.
    seeds: one image per seed (default ``range(10 * rows)``); image i shows digit i % 10, five digits per grid row.
    apply / undo: stand-ins for ``ditkern.patch`` / ``ditkern.unpatch`` (``apply(pipe)`` patches in place).
    sampler: overrides of :data:`ditkern.zoo.DEFAULTS` (e.g. ``{"num_inference_steps": 8}``).
    warmup: the untimed run before each timed one (see :func:`~ditkern.zoo.fidelity.compare`); default: the full
        sampler on a GPU (kernels compile, autotune), 2 steps on the CPU (torch paths: nothing compiles).
    threads: torch's intra-op threads for the run (restored after); default 1 on the CPU, where these models are
        tiny: a second thread adds synchronisation, not speed, and stalls whenever the other core is busy (measured
        on a busy 2-core machine: ten digits-dit images at 8 steps in 4.8 s on one thread, 11.0 s on two).
    """
    seeds = list(range(10 * rows)) if seeds is None else list(seeds)
    if warmup is None:
        warmup = True if torch.cuda.is_available() else 2
    if settings is None:
        label = ",".join(f"{k}={v}" for k, v in (patch_options or {}).items()) or (
            getattr(apply, "__name__", "patched") if apply is not None else "default")
        settings = {label: dict(patch_options or {})}
    if threads is None and not torch.cuda.is_available():
        threads = 1
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        table, lines = _run(seeds, pipelines, settings, apply, undo, sampler, progress, verbose, warmup)
    finally:
        torch.set_num_threads(saved_threads)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_figure(table, out_path)
    if verbose:
        print()
        print(table)
        print("\n".join(lines))
        print(machine_line(threads or saved_threads))
        print(f"wrote {out_path} (every setting beside the unpatched samples, and the speed-vs-PSNR plot)")
    return table


def _run(seeds, pipelines, settings, apply, undo, sampler, progress, verbose, warmup):
    from tqdm.auto import tqdm

    from . import load

    table = FidelityTable()
    facts: dict[tuple[str, str], dict] = {}
    lines: list[str] = []
    with tqdm(total=len(pipelines) * (1 + len(settings)), desc="ditkern demo", disable=not progress) as bar:
        for name in pipelines:
            pipe = load(name)
            bar.set_postfix_str(f"{name} unpatched")
            ref = unpatched_run(pipe, seeds, sampler=sampler, warmup=warmup, progress=progress, repeats=TIMING_REPEATS)
            bar.update()
            base_bytes = weight_bytes(pipe.transformer)
            for label, opts in settings.items():
                fact = facts[name, label] = {}
                do_apply, do_undo = _patch_callables(opts, apply, undo)

                calibrate = _needs_calibration(opts)

                def apply_fn(p, fact=fact, do_apply=do_apply, calibrate=calibrate):
                    fact["report"] = do_apply(p)
                    fact["weight_bytes"] = weight_bytes(p.transformer)
                    if calibrate:
                        _calibrate_cache(p, sampler)

                def undo_fn(p, fact=fact, do_undo=do_undo):
                    import ditkern.cache  # noqa: PLC0415

                    try:
                        fact["cache"] = ditkern.cache.stats(p)
                    except ValueError:  # this setting has no cache
                        pass
                    do_undo(p)

                bar.set_postfix_str(f"{name} [{label}]")
                # a calibrated cache is warmed up with the sampler it was calibrated for (one image): a shorter run is
                # off its calibrated timesteps (it would run uncached and warn)
                table.append(compare(pipe, seeds, sampler=sampler, apply=apply_fn, undo=undo_fn, setting=label,
                                     progress=progress, reference=ref, warmup=True if calibrate else warmup,
                                     repeats=TIMING_REPEATS))  # fmt: skip
                bar.update()
                lines.append(_facts_line(name, label, fact, base_bytes))
                if verbose:
                    report = fact.get("report")
                    if report is not None and hasattr(report, "summary"):
                        first = label == next(iter(settings))
                        tqdm.write(f"\n{name} [{label}]:\n{report if first else report.summary()}")
    return table, lines


def _facts_line(name: str, label: str, fact: dict, base_bytes: int) -> str:
    parts = []
    if "weight_bytes" in fact:
        after = fact["weight_bytes"]
        parts.append(f"transformer weights {base_bytes / 2**20:.2f} -> {after / 2**20:.2f} MiB "
                     f"({after / base_bytes:.2f}x)")
    if "cache" in fact:
        parts.append(f"blocks executed {fact['cache']['block_fraction']:.0%} "
                     f"({fact['cache']['blocks_run']}/{fact['cache']['blocks_total']})")
    return f"  {name} [{label}]: " + ("; ".join(parts) or "no memory or cache figures")


# The command line is ``python -m ditkern demo`` (ditkern/__main__.py); this module is the library it calls, so it
# imports nothing of the CLI (no import circle: __main__ -> demo -> zoo.demo).
