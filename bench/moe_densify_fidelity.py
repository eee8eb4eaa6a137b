"""Dense2MoE converter on the reference pipelines (CPU): activated FFN parameters vs fidelity.

For each reference pipeline the dense FFNs of the transformer blocks are converted with
``ditkern.moe.densify_to_moe`` (calibrated on FFN inputs recorded while the pipeline generates one image of every
digit with seeds the evaluation does not use), swapped in, and judged with the zoo's fidelity harness against the
unconverted pipeline on the same seeds: PSNR (pooled and worst image) and class accuracy. Activated parameters are
per token and per converted FFN, summed over the converted layers (router included).

    python -m bench.moe_densify_fidelity [--seeds 40] [--out bench/results/moe]

FFNs converted: DiT ``BasicTransformerBlock.ff``; FLUX double blocks ``ff`` and ``ff_context`` (the single blocks'
MLP shares its projection with attention: not a separable FFN, left dense and counted as such nowhere).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import torch

# (experts, top_k); E == K is the exactness check. Every sparse setting runs without and with compensation.
CONFIGS = [(8, 8), (8, 6), (8, 4), (8, 2), (16, 8), (16, 4), (16, 2)]
CALIBRATION_SEEDS = range(1000, 1010)  # one image per digit, disjoint from the evaluation seeds


def _ffns(pipe):
    tr = pipe.transformer
    name = type(tr).__name__
    found = []
    if name == "DiTTransformer2DModel":
        for i, blk in enumerate(tr.transformer_blocks):
            found.append((f"transformer_blocks.{i}.ff", blk, "ff"))
    elif name == "FluxTransformer2DModel":
        for i, blk in enumerate(tr.transformer_blocks):
            found.append((f"transformer_blocks.{i}.ff", blk, "ff"))
            found.append((f"transformer_blocks.{i}.ff_context", blk, "ff_context"))
    else:
        raise ValueError(f"no FFN list for {name}")
    return found


def _calibrate(pipe, ffns, zoo):
    rec = {path: [] for path, _, _ in ffns}

    def grab(module, args, p):
        rec[p].append(args[0].detach().reshape(-1, args[0].shape[-1]))

    hooks = [
        getattr(parent, attr).register_forward_pre_hook(lambda m, args, p=path: grab(m, args, p))
        for path, parent, attr in ffns
    ]
    try:
        seeds = list(CALIBRATION_SEEDS)
        zoo.generate(pipe, classes=[s % 10 for s in seeds], seeds=seeds)
    finally:
        for h in hooks:
            h.remove()
    return {p: torch.cat(v) for p, v in rec.items()}


def run(pipe_name: str, seeds: int, out_dir: str, rows: list, images: dict):
    import ditkern.zoo as zoo
    from ditkern.moe import densify_to_moe
    from ditkern.moe.densify import dense_parameters
    from ditkern.zoo import fidelity

    pipe = zoo.load(pipe_name)
    ffns = _ffns(pipe)
    t0 = time.perf_counter()
    calib = _calibrate(pipe, ffns, zoo)
    t_cal = time.perf_counter() - t0
    dense_total = sum(dense_parameters(getattr(parent, attr)) for _, parent, attr in ffns)
    settings = [(E, K, c) for E, K in CONFIGS for c in ((False,) if E == K else (False, True))]
    for E, K, comp in settings:
        t1 = time.perf_counter()
        moes = {
            path: densify_to_moe(getattr(parent, attr), E, K, calib[path], seed=0, backend="torch", compensate=comp)
            for path, parent, attr in ffns
        }
        t_conv = time.perf_counter() - t1
        originals = {path: getattr(parent, attr) for path, parent, attr in ffns}

        def apply(p):
            for path, parent, attr in ffns:
                setattr(parent, attr, moes[path])

        def undo(p):
            for path, parent, attr in ffns:
                setattr(parent, attr, originals[path])

        setting = f"E={E} top-{K}{' comp' if comp else ''}"
        r = fidelity.compare(pipe, seeds=range(seeds), apply=apply, undo=undo, setting=setting, progress=False)
        active = sum(m.activated_parameters() for m in moes.values())
        row = dict(
            pipeline=pipe_name, experts=E, top_k=K, compensate=comp, ffn_layers=len(ffns), dense_ffn_params=dense_total,
            activated_params=active, activated_reduction_pct=round(100 * (1 - active / dense_total), 1),
            psnr_db=round(r.psnr_db, 2), psnr_worst_db=round(r.psnr_worst_db, 2), max_abs_err=round(r.max_abs_err, 5),
            accuracy_dense=r.accuracy_unpatched, accuracy_moe=r.accuracy_patched, images=r.num_images,
            calibration_tokens=min(4096, int(next(iter(calib.values())).shape[0])), calibrate_s=round(t_cal, 1),
            convert_s=round(t_conv, 1),
        )  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        images[(pipe_name, E, K, comp)] = (r.images_unpatched[:10], r.images_patched[:10])


def _write(rows, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "densify_fidelity.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["pipeline", "experts", "top_k", "compensate", "ffn_layers", "dense_ffn_params", "activated_params",
            "activated_reduction_pct", "psnr_db", "psnr_worst_db", "accuracy_dense", "accuracy_moe",
            "images"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    with open(os.path.join(out_dir, "densify_fidelity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _plot(rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["pipeline"] for r in rows}):
        for comp, marker in ((False, "o"), (True, "s")):
            rs = [r for r in rows if r["pipeline"] == name and r["experts"] != r["top_k"] and r["compensate"] == comp]
            x = [r["activated_reduction_pct"] for r in rs]
            label = f"{name}{' +comp' if comp else ''}"
            axes[0].plot(x, [r["psnr_db"] for r in rs], marker, label=label)
            axes[1].plot(x, [r["accuracy_moe"] for r in rs], marker, label=label)
            for r in rs:
                xy = (r["activated_reduction_pct"], r["psnr_db"])
                axes[0].annotate(f"{r['experts']}/{r['top_k']}", xy, fontsize=7)
        base = [r["accuracy_dense"] for r in rows if r["pipeline"] == name][0]
        axes[1].axhline(base, ls="--", lw=0.8, color=axes[1].lines[-1].get_color())
    axes[0].set(xlabel="activated FFN parameters saved (%)", ylabel="PSNR vs dense (dB)", title="fidelity")
    axes[1].set(xlabel="activated FFN parameters saved (%)", ylabel="class accuracy", title="accuracy (dashed: dense)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "densify_fidelity.png"), dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--pipelines", default="digits-dit,digits-flux")
    ap.add_argument("--out", default="bench/results/moe")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows, images = [], {}
    for name in args.pipelines.split(","):
        run(name, args.seeds, args.out, rows, images)
        _write(rows, args.out)
    _plot(rows, args.out)


if __name__ == "__main__":
    main()
