"""Q-Sched on the reference pipelines (CPU): ``python -m bench.qsched [--quick] [--seeds 50] [--steps 4 12]``.

For ``digits-dit`` and ``digits-flux`` at each step count (few-step and the default 12), on the same measured seeds
in the same run: the fp32 pipeline (the reference), two 4-bit settings over every block linear (INT4 GPTQ g32 bf16,
the current best 4-bit, and plain FP4 E2M1 absmax g32 bf16, which loses more), each alone and with Q-Sched
coefficients calibrated for it (:func:`ditkern.quant.qsched.calibrate`, reference-free JAQ-form objective, on
calibration seeds disjoint from the measured ones, no full-precision model involved), and, as a diagnostic bound, the
same search with an oracle objective (PSNR against the fp32 images of the calibration seeds: not reference-free,
it says how much the per-step scalar coefficients can recover at all). Reported: PSNR pooled over the measured
images and the worst image vs the fp32 images of the same seeds and step count, class accuracy, the JAQ objective on
the measured images, and the fraction of the quantized setting's squared error that Q-Sched removes
(``1 - MSE(q + Q-Sched) / MSE(q)``; the issue's goal, recovering half of what quantization loses, is >= 0.5, i.e.
+3.01 dB). Writes bench/results/quant/qsched/{qsched.json, qsched.md, qsched.png, README.md} and the calibrated
coefficients as ``<pipeline>_<setting>_<steps>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "quant" / "qsched"
GPTQ_CALIB_SEEDS = range(1000, 1010)  # as bench.quant_fidelity: GPTQ's activations from the model's own sampling
QSCHED_SEED0 = 2000  # Q-Sched calibration seeds start here; measured seeds are 0..n-1


def settings(cal):
    from ditkern import QuantConfig

    g32 = dict(group_size=32, scale_dtype="bf16", keep_edge_adaln=False)
    return [("int4 g32 bf16 gptq", QuantConfig(format="int4", method="gptq", calibration=cal, **g32)),
            ("fp4_e2m1 g32 bf16 absmax", QuantConfig(format="fp4_e2m1", **g32))]  # fmt: skip


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")


def run_pipeline(name, a, out_dir: Path) -> list[dict]:
    import ditkern
    from ditkern import zoo
    from ditkern.quant import calibrate as capture
    from ditkern.quant import qsched
    from ditkern.zoo import classifier, fidelity

    rows = []
    seeds = list(range(a.seeds))
    classes = [s % 10 for s in seeds]
    cseeds = list(range(QSCHED_SEED0, QSCHED_SEED0 + a.calib_seeds))
    cclasses = [s % 10 for s in cseeds]
    pipe = zoo.load(name)
    base = pipe.scheduler

    def gen(steps, cls=classes, sd=seeds):
        return zoo.generate(pipe, cls, sd, num_inference_steps=steps)

    ref = {n: gen(n) for n in a.steps}
    ref_cal = {n: gen(n, cclasses, cseeds) for n in a.steps}

    def record(steps, setting, images, **extra):
        per = fidelity.psnr(images, ref[steps])
        row = dict(pipeline=name, steps=steps, setting=setting,
                   psnr_db=round(fidelity.pooled_psnr(images, ref[steps]), 3), psnr_worst_db=round(per.min().item(), 3),
                   accuracy=round(classifier.accuracy(images, classes), 3), jaq=round(qsched.jaq(images, classes), 4),
                   mse=(images.double() - ref[steps].double()).pow(2).mean().item(), **extra)  # fmt: skip
        rows.append(row)
        print({k: v for k, v in row.items() if k not in ("c_x", "c_eps")}, flush=True)
        return row

    for n in a.steps:
        record(n, "fp32 (reference)", ref[n])
    cal = capture(pipe, lambda: [zoo.generate(pipe, [s % 10], [s]) for s in GPTQ_CALIB_SEEDS])
    for setting, qc in settings(cal):
        ditkern.patch(pipe, quant=qc, fused_norms=False, backend="torch")
        try:
            for n in a.steps:
                q = record(n, setting, gen(n))

                def oracle(images, _classes, n=n):  # NOT reference-free: the bound of what the coefficients can do
                    return fidelity.pooled_psnr(images, ref_cal[n])

                for tag, objective in (("+ Q-Sched (JAQ)", None), ("+ oracle coefficients (bound)", oracle)):
                    t0 = time.perf_counter()
                    sched = qsched.calibrate(pipe, cclasses, n, seeds=cseeds, max_evals=a.max_evals,
                                             objective=objective, progress=not a.no_progress)  # fmt: skip
                    secs = time.perf_counter() - t0
                    pipe.scheduler = sched
                    try:
                        images = gen(n)
                    finally:
                        pipe.scheduler = base
                    if objective is None:
                        sched.save(out_dir / f"{name}_{_slug(setting)}_{n}.json")
                    r = record(n, f"{setting} {tag}", images, c_x=[round(v, 4) for v in sched.c_x],
                               c_eps=[round(v, 4) for v in sched.c_eps], evals=sched.meta["evals"],
                               calib_seconds=round(secs, 1))  # fmt: skip
                    r["recovered"] = round(1 - r["mse"] / q["mse"], 3)
                    r["gain_db"] = round(r["psnr_db"] - q["psnr_db"], 3)
        finally:
            ditkern.unpatch(pipe)
    return rows


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(rows, out_dir: Path, command: str, merged: list | None = None) -> None:
    (out_dir / "qsched.json").write_text(json.dumps(rows, indent=1) + "\n")
    head = ["pipeline", "steps", "setting", "PSNR dB", "worst dB", "class acc", "JAQ", "gain dB", "MSE removed",
            "c_x", "c_eps", "evals"]  # fmt: skip
    fmt = lambda c: "" if c is None else " ".join(f"{v:.3f}" for v in c)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        v = [r["pipeline"], r["steps"], r["setting"], r["psnr_db"], r["psnr_worst_db"], r["accuracy"], r["jaq"],
             r.get("gain_db"), r.get("recovered"), fmt(r.get("c_x")), fmt(r.get("c_eps")), r.get("evals")]  # fmt: skip
        lines.append("| " + " | ".join("" if x is None else str(x) for x in v) + " |")
    table = "\n".join(lines) + "\n"
    (out_dir / "qsched.md").write_text(table)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    runs = merged or [dict(command=command, date=now, git_sha=_git_sha(), torch=torch.__version__,
                           threads=torch.get_num_threads())]  # fmt: skip
    (out_dir / "run.json").write_text(json.dumps(runs, indent=1) + "\n")
    how = "; ".join(f"`{m['command']}`, {m['date']}, git {m['git_sha']}, torch {m['torch']}, {m['threads']} thread(s)"
                    for m in runs)  # fmt: skip
    if merged:
        how += f"; merged by `{command}` ({now})"
    readme = [
        "# Q-Sched on the reference pipelines (CPU)", "",
        f"Runs: {how}. See `bench/qsched.py` and docs/qsched.md.", "",
        "PSNR vs the fp32 images of the same seeds and step count (pooled over the measured images; worst image). "
        "Quantized settings cover every linear of the transformer blocks (`keep_edge_adaln=False`). "
        "\"Q-Sched (JAQ)\": coefficients from `ditkern.quant.qsched.calibrate` with its reference-free objective on "
        "calibration seeds 2000+ (disjoint from the measured seeds 0..n-1; no fp32 model used). \"oracle "
        "coefficients (bound)\": the same search maximising PSNR vs the fp32 images of the calibration seeds - not "
        "reference-free, it bounds what per-step scalar coefficients can recover. MSE removed = "
        "1 - MSE(with coefficients) / MSE(quantized alone); the goal is >= 0.5 (+3.01 dB).", "",
        table,
        "![PSNR per setting](qsched.png)", "",
    ]  # fmt: skip
    notes = out_dir / "notes.md"  # the reading of the numbers, written by hand, kept across re-runs
    if notes.is_file():
        readme += [notes.read_text()]
    (out_dir / "README.md").write_text("\n".join(readme))


def plot(rows, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipes = list(dict.fromkeys(r["pipeline"] for r in rows))
    fig, axes = plt.subplots(1, len(pipes), figsize=(6.5 * len(pipes), 4.2), squeeze=False)
    kinds = [("", "quantized"), (" + Q-Sched (JAQ)", "+ Q-Sched (JAQ, reference-free)"),
             (" + oracle coefficients (bound)", "+ oracle coefficients (bound)")]  # fmt: skip
    for ax, p in zip(axes[0], pipes):
        mine = [r for r in rows if r["pipeline"] == p and not r["setting"].startswith("fp32")]
        groups = list(dict.fromkeys((r["steps"], r["setting"].split(" + ")[0]) for r in mine))
        width = 0.27
        for k, (suffix, label) in enumerate(kinds):
            ys = []
            for steps, setting in groups:
                hit = [r["psnr_db"] for r in mine if r["steps"] == steps and r["setting"] == setting + suffix]
                ys.append(hit[0] if hit else math.nan)
            ax.bar([i + (k - 1) * width for i in range(len(groups))], ys, width, label=label)
            if k == 0:  # the goal: half the quantized setting's squared error removed
                ax.hlines([y + 10 * math.log10(2) for y in ys], [i - 1.5 * width for i in range(len(groups))],
                          [i + 1.5 * width for i in range(len(groups))], colors="k", linestyles="--", linewidth=1,
                          label="goal (MSE halved, +3.01 dB)")  # fmt: skip
        ax.set_xticks(range(len(groups)), [f"{s}\n{n} steps" for n, s in groups], fontsize=7)
        ax.set_ylabel("PSNR vs fp32, dB (pooled)")
        lo = min((r["psnr_db"] for r in mine), default=0)
        ax.set_ylim(max(0, lo - 3), None)
        ax.set_title(p)
        ax.set_ylim(None, max(r["psnr_db"] for r in mine) + 6)
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "qsched.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=50, help="measured images per pipeline and step count (seeds 0..n-1)")
    p.add_argument("--calib-seeds", type=int, default=20, help="Q-Sched calibration images (seeds 2000..)")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 12])
    p.add_argument("--max-evals", type=int, default=30, help="calibration-set generations per search")
    p.add_argument("--pipelines", nargs="*", default=["digits-dit", "digits-flux"])
    p.add_argument("--quick", action="store_true", help="10 measured seeds, 10 calibration seeds, 4 steps, 10 evals")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--merge", nargs="+", help="combine the qsched.json of several runs into --out (plot, README)")
    a = p.parse_args(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.qsched " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    if a.merge:
        rows = [r for path in a.merge for r in json.loads(Path(path).read_text())]
        runs = []
        for path in a.merge:
            meta = Path(path).parent / "run.json"
            m = json.loads(meta.read_text()) if meta.is_file() else []
            runs += m if isinstance(m, list) else [m]
        write(rows, out_dir, command, runs)
        for path in a.merge:  # the calibrated coefficients of each run
            for f in Path(path).parent.glob("digits-*.json"):
                (out_dir / f.name).write_text(f.read_text())
        plot(rows, out_dir)
        return
    if a.quick:
        a.seeds, a.calib_seeds, a.steps, a.max_evals = 10, 10, [4], 10
    torch.set_num_threads(1)  # small batches: one thread is the fastest on a shared CPU, and deterministic
    rows = []
    for name in a.pipelines:
        rows += run_pipeline(name, a, out_dir)
        write(rows, out_dir, command)
    plot(rows, out_dir)


if __name__ == "__main__":
    main()
