"""Zero-shot fidelity of windowed attention on the reference pipelines (digits-dit, digits-flux): window size x layer
selection vs PSNR against the dense pipeline and class accuracy, same seeds and classes.

Uses the zoo's harness pieces (``ditkern.zoo.generate``, ``fidelity.psnr`` / ``pooled_psnr``,
``classifier.accuracy``); the dense reference images are generated once per pipeline and every setting is compared
to them. CPU, fp32, torch backend (ditkern's chunked masked SDPA: the CPU path), one thread.

``python -m bench.attention_fidelity [--seeds 40] [--out bench/results/attention]``
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import time
from pathlib import Path

import torch

import ditkern
from ditkern.ops.window_attention import window_sparsity


def _grid_of(pipe, name, generate):
    """Record the transformer's token grid and text length from one (short) call."""
    from ditkern.attention.processors import flux_grid, spatial_grid  # noqa: PLC0415

    infer = flux_grid if "flux" in name else spatial_grid
    seen = {}

    def hook(module, args, kwargs):
        seen["grid"], _, seen["text"] = infer(module, args, kwargs)

    h = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate(pipe, [0], [0], num_inference_steps=1)
    finally:
        h.remove()
    return tuple(seen["grid"]), seen["text"]


def settings_for(grid, n_blocks):
    side = min(grid)
    windows = [w for w in (3, 5, 7, 9, 11) if w < side]
    layer_sets = {"all": "all", "all but first+last": slice(1, -1)}
    if n_blocks >= 6:
        layer_sets["all but first2+last2"] = slice(2, -2)
    out = []
    for w in windows:
        for lname, layers in layer_sets.items():
            out.append((f"window {w}, {lname}", dict(window=w, layers=layers)))
    # Sliding-tile variant: 4x4 tiles, 3 tiles (12 tokens) per axis where the grid allows it
    if side >= 16:
        out.append(("tile 4x4, 3 tiles (12), all", dict(window=12, granularity="tile", tile=(4, 4))))
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--pipelines", nargs="*", default=["digits-dit", "digits-flux"])
    p.add_argument("--out", default="bench/results/attention")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ditkern import zoo  # noqa: PLC0415
    from ditkern.zoo import classifier, fidelity  # noqa: PLC0415

    rows = []
    for name in a.pipelines:
        pipe = zoo.load(name)
        grid, text = _grid_of(pipe, name, zoo.generate)
        tr = pipe.transformer
        n_blocks = len(getattr(tr, "transformer_blocks", [])) + len(getattr(tr, "single_transformer_blocks", []) or [])
        seeds = list(range(a.seeds))
        classes = fidelity.default_classes(len(seeds))
        sampler = zoo.DEFAULTS[name]
        t0 = time.perf_counter()
        ref = zoo.generate(pipe, classes, seeds, **sampler)
        t_ref = time.perf_counter() - t0
        acc_ref = classifier.accuracy(ref, classes)
        rows.append(dict(pipeline=name, setting="dense (unpatched)", grid="x".join(map(str, grid)), text=text,
                         blocks=n_blocks, local_blocks=0, sparsity=0.0, psnr_db=math.inf, psnr_worst_db=math.inf,
                         accuracy=acc_ref, accuracy_dense=acc_ref, seconds=round(t_ref, 1)))  # fmt: skip
        print(rows[-1], flush=True)
        for label, kw in settings_for(grid, n_blocks):
            cfg = ditkern.WindowAttention(backend="torch", **kw)
            report = ditkern.patch(pipe, fused_norms=False, attention=cfg)
            local = sum(1 for r in report.patched if r.cls != type(tr).__name__)
            try:
                t0 = time.perf_counter()
                out = zoo.generate(pipe, classes, seeds, **sampler)
                secs = time.perf_counter() - t0
            finally:
                ditkern.unpatch(pipe)
            sp = window_sparsity(grid, kw["window"], text_tokens=text, granularity=kw.get("granularity", "token"),
                                 tile=kw.get("tile"))  # fmt: skip
            rows.append(dict(
                pipeline=name, setting=label, grid="x".join(map(str, grid)), text=text, blocks=n_blocks,
                local_blocks=local, sparsity=round(sp, 3), psnr_db=round(fidelity.pooled_psnr(out, ref), 2),
                psnr_worst_db=round(fidelity.psnr(out, ref).min().item(), 2),
                accuracy=classifier.accuracy(out, classes), accuracy_dense=acc_ref, seconds=round(secs, 1),
            ))  # fmt: skip
            print(rows[-1], flush=True)
        write(rows, Path(a.out), a.seeds)
    write(rows, Path(a.out), a.seeds)


def write(rows, out: Path, n_seeds: int):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "fidelity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# Windowed attention, zero-shot: fidelity on the reference pipelines",
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d} · CPU, fp32, torch backend · {n_seeds} seeds per pipeline "
        "(image i shows digit i % 10), the zoo's default sampler · PSNR against the dense pipeline's images (same "
        "seeds), pooled and worst image · accuracy: the zoo's digit classifier · sparsity: fraction of the attention "
        "scores a windowed layer skips · `python -m bench.attention_fidelity`",
        "",
        "| pipeline | setting | grid | text | local blocks | sparsity | PSNR dB | worst PSNR dB | accuracy | dense accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pipeline']} | {r['setting']} | {r['grid']} | {r['text']} | {r['local_blocks']}/{r['blocks']} | "
            f"{r['sparsity']} | {r['psnr_db']} | {r['psnr_worst_db']} | {r['accuracy']:.3f} | {r['accuracy_dense']:.3f} |"
        )
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")
    (out / "fidelity.json").write_text(json.dumps(rows, indent=1, default=str))
    try:
        plot(rows, out / "fidelity.png")
    except ImportError:
        pass


def plot(rows, path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for pipe_name, ax in zip(("digits-dit", "digits-flux"), axes):
        sel = [r for r in rows if r["pipeline"] == pipe_name and r["setting"].startswith("window")]
        for lname in sorted({r["setting"].split(", ", 1)[1] for r in sel}):
            pts = [(r["sparsity"], r["psnr_db"]) for r in sel if r["setting"].split(", ", 1)[1] == lname]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=lname)
        ax.set_title(pipe_name)
        ax.set_xlabel("attention sparsity of a windowed layer")
        ax.set_ylabel("PSNR vs dense (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
