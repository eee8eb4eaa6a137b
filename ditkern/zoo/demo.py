"""``python -m ditkern demo``: both reference pipelines, unpatched | patched, side by side with the numbers.

:func:`run_demo` loads ``digits-dit`` and ``digits-flux``, generates a grid of digits (column = class) with and
without ``ditkern.patch(pipe, **patch_options)``, writes a PNG with one row per pipeline (unpatched | patched, the
measurements in the captions) and prints the fidelity/speed table, one row per pipeline x setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from . import FAST_NAMES
from .fidelity import FidelityTable, compare


def _grid(images: torch.Tensor, ncol: int = 10) -> torch.Tensor:
    n, _, h, w = images.shape
    nrow = math.ceil(n / ncol)
    canvas = torch.ones(nrow * (h + 2) + 2, ncol * (w + 2) + 2)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = images[i, 0]
    return canvas


def _fmt_db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def save_figure(results, out_path: str) -> str:
    """One row per result: unpatched grid | patched grid, captioned with timings, PSNR and class accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = [(_grid(r.images_unpatched), _grid(r.images_patched)) for r in results]
    aspect = max(g[0].shape[0] / g[0].shape[1] for g in grids)
    fig, axes = plt.subplots(len(results), 2, figsize=(12, len(results) * (6 * aspect + 0.8)), squeeze=False)
    for (ax_ref, ax_out), r, (g_ref, g_out) in zip(axes, results, grids):
        ax_ref.imshow(g_ref.numpy(), cmap="gray", vmin=0, vmax=1)
        ax_out.imshow(g_out.numpy(), cmap="gray", vmin=0, vmax=1)
        steps = r.sampler.get("num_inference_steps")
        ax_ref.set_title(f"{r.pipeline} unpatched ({steps} steps)\n{r.seconds_unpatched:.2f} s, "
                         f"class accuracy {r.accuracy_unpatched:.0%}", fontsize=9)
        ax_out.set_title(f"{r.pipeline} patched [{r.setting}]\n{r.seconds_patched:.2f} s ({r.speedup:.2f}x), "
                         f"PSNR {_fmt_db(r.psnr_db)} dB (worst {_fmt_db(r.psnr_worst_db)}), "
                         f"max|err| {r.max_abs_err:.1e}, accuracy {r.accuracy_patched:.0%}", fontsize=9)
        for ax in (ax_ref, ax_out):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def run_demo(
    out_path: str = "ditkern_demo.png",
    patch_options: dict | None = None,
    seeds: Sequence[int] | None = None,
    rows: int = 2,
    pipelines: Sequence[str] = FAST_NAMES,
    settings: dict[str, dict] | None = None,
    apply: Callable | None = None,
    undo: Callable | None = None,
    sampler: dict | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> FidelityTable:
    """Run the demo and return its :class:`~ditkern.zoo.fidelity.FidelityTable`.

    patch_options: keyword arguments for ``ditkern.patch(pipe, **patch_options)`` (``ditkern.unpatch(pipe)`` undoes
        it). ``settings`` ({label: patch_options}) adds more rows to the table; the PNG shows the first setting.
    seeds: one image per seed (default ``range(10 * rows)``); image i shows digit i % 10, ten digits per grid row.
    apply / undo: stand-ins for ``ditkern.patch`` / ``ditkern.unpatch`` (``apply(pipe)`` patches in place).
    """
    from tqdm.auto import tqdm

    from . import load

    seeds = list(range(10 * rows)) if seeds is None else list(seeds)
    if settings is None:
        label = ",".join(f"{k}={v}" for k, v in (patch_options or {}).items()) or (
            getattr(apply, "__name__", "patched") if apply is not None else "default")
        settings = {label: dict(patch_options or {})}
    table = FidelityTable()
    shown = []
    work = [(name, label, opts) for name in pipelines for label, opts in settings.items()]
    pipes = {}
    for name, label, opts in tqdm(work, desc="ditkern demo", disable=not progress):
        if name not in pipes:
            pipes[name] = load(name)
        r = compare(pipes[name], seeds, sampler=sampler, patch_options=opts, apply=apply, undo=undo, setting=label,
                    progress=progress)
        table.append(r)
        if label == next(iter(settings)):
            shown.append(r)
    save_figure(shown, out_path)
    if verbose:
        print(table)
        print(f"wrote {out_path}")
    return table


def main(argv=None):
    import argparse
    import json

    p = argparse.ArgumentParser(description="ditkern demo: reference pipelines unpatched | patched, with numbers.")
    p.add_argument("--out", default="ditkern_demo.png")
    p.add_argument("--rows", type=int, default=2, help="grid rows of 10 digits")
    p.add_argument("--options", default="{}", help="ditkern.patch options as JSON, e.g. '{\"window\": 8}'")
    args = p.parse_args(argv)
    run_demo(args.out, patch_options=json.loads(args.options), rows=args.rows)


if __name__ == "__main__":
    main()
