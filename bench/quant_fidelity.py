"""Fidelity of quantized reference pipelines (CPU): ``python -m bench.quant_fidelity [--seeds 50] [--quick]``.

For ``digits-dit`` and ``digits-flux`` (``ditkern.zoo``), every image is generated with the fp32 pipeline (the
reference) and again with each setting on the same seeds and classes: ditkern's formats weight-only and with FP8 / FP6
activations, with and without the default skip list, the skip-list ablations (which sensitive layers matter),
activation-aware calibration (AWQ, calibrated on other seeds), the per-layer 4-bit choice, bf16 as a yardstick, and
torchao's CPU-capable configurations where torchao is installed. Reported: pooled PSNR (dB) vs the fp32 images, the
worst image's PSNR, class accuracy, and the weight bits per quantized weight (scales included) and the transformer's
linear-weight memory vs fp32. Writes bench/results/quant/fidelity.{csv,md,json} and fidelity.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import csv
import json
import math
import re
import time
import traceback
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "quant"


FORMATS = ("fp4_e2m1", "int4", "fp6_e2m3", "fp6_e3m2")


def ditkern_settings(quick: bool):
    from ditkern import QuantConfig

    s = [(f, QuantConfig(format=f)) for f in FORMATS]
    s += [(f"{f} A8", QuantConfig(format=f, activations="fp8")) for f in FORMATS]
    s += [("fp4_e2m1 A6", QuantConfig(format="fp4_e2m1", activations="fp6"))]
    s += [(f"{f} skip=[]", QuantConfig(format=f, skip=[])) for f in FORMATS]
    s += [("fp4_e2m1 g32 bf16", QuantConfig(format="fp4_e2m1", group_size=32, scale_dtype="bf16")),
          ("int4 g32 bf16", QuantConfig(format="int4", group_size=32, scale_dtype="bf16"))]  # fmt: skip
    return s[:3] if quick else s


def ablations(model, base_qc=None, tag="fp4_e2m1"):
    """What each layer group the default skip list keeps buys: the default list minus one group at a time (that group
    quantized too), the list before it was made explicit (``*embed*`` also keeping DiT's per-block timestep
    embedders), and nothing kept."""

    from ditkern import QuantConfig
    from ditkern.quant.feature import default_skip
    from ditkern.patch.engine import family_of

    base_qc = base_qc if base_qc is not None else QuantConfig(format="fp4_e2m1")
    base = default_skip(model)
    fam = family_of(model)
    old = fam.quant.default_skip(model, fam.stack if not isinstance(fam.stack, str) else None)
    groups = {
        "embedders": [p for p in base if "*" not in p and ("embed" in p or "caption" in p or "adaln_single" in p)],
        "final proj/norm": [p for p in base if p.startswith(("proj_out", "norm_out"))],
        "first/last adaLN": [p for p in base if ".norm*" in p],
    }
    out = [(f"{tag} default skip", dataclasses.replace(base_qc, skip=None)),
           (f"{tag} old skip (*embed* in blocks)", dataclasses.replace(base_qc, skip=old))]
    for g, pats in groups.items():
        if pats:
            out.append((f"{tag} quantize {g}", dataclasses.replace(base_qc, skip=[p for p in base if p not in pats])))
    out.append((f"{tag} skip=[]", dataclasses.replace(base_qc, skip=[])))
    return out


def headline_settings(cal):
    """Every block linear quantized (4.5 / 6.5 bits per block weight): the layers outside the blocks kept."""
    from ditkern import QuantConfig

    g32 = dict(group_size=32, scale_dtype="bf16", keep_edge_adaln=False)
    gptq = dict(g32, method="gptq", calibration=cal)
    ada = dict(g32, method="adaround", calibration=cal)
    return [
        ("fp4_e2m1 g32 bf16 blocks", QuantConfig(format="fp4_e2m1", **g32)),
        ("int4 g32 bf16 blocks", QuantConfig(format="int4", **g32)),
        ("fp4_e2m1 g32 bf16 gptq blocks", QuantConfig(format="fp4_e2m1", **gptq)),
        ("int4 g32 bf16 gptq blocks", QuantConfig(format="int4", **gptq)),
        ("fp6_e2m3 g32 bf16 blocks", QuantConfig(format="fp6_e2m3", **g32)),
        ("fp6_e2m3 g32 bf16 gptq blocks", QuantConfig(format="fp6_e2m3", **gptq)),
        # learned rounding; the auto row after them reuses their per-layer results (same calibration: memoised)
        ("fp4_e2m1 g32 bf16 adaround blocks", QuantConfig(format="fp4_e2m1", **ada)),
        ("int4 g32 bf16 adaround blocks", QuantConfig(format="int4", **ada)),
        ("fp6_e2m3 g32 bf16 adaround blocks", QuantConfig(format="fp6_e2m3", **ada)),
        # the rounding of each layer chosen on images of --choice-seeds calibration seeds (choose_rounding)
        ("fp4_e2m1 g32 bf16 adaround+choice blocks", QuantConfig(format="fp4_e2m1", **ada)),
        ("int4 g32 bf16 adaround+choice blocks", QuantConfig(format="int4", **ada)),
        ("auto <= 4.6 bits g32 bf16 adaround blocks", QuantConfig(format="auto", bits=4.6, **ada)),
        # FP formats only (FP4DiT's point): E2M1 everywhere, the layers that gain most per byte upgraded to E2M3
        ("fp4_e2m1 <= 4.6 bits (+fp6_e2m3) g32 bf16 adaround blocks",
         QuantConfig(format="fp4_e2m1", bits=4.6, **ada)),
        # and the same budget for GPTQ's INT4, for an equal-bits comparison
        ("int4 <= 4.6 bits (+fp6_e2m3) g32 bf16 gptq blocks", QuantConfig(format="int4", bits=4.6, **gptq)),
    ]


def calibrated_settings(cal):
    from ditkern import QuantConfig

    g32 = dict(group_size=32, scale_dtype="bf16", method="gptq", calibration=cal)
    return [
        ("fp4_e2m1 awq", QuantConfig(format="fp4_e2m1", method="awq", calibration=cal)),
        ("fp4_e2m1 g32 bf16 gptq", QuantConfig(format="fp4_e2m1", **g32)),
        ("int4 g32 bf16 gptq", QuantConfig(format="int4", **g32)),
        ("auto4 g32 bf16 gptq", QuantConfig(format="auto4", **g32)),
        ("int4 g32 bf16 A8 gptq", QuantConfig(format="int4", activations="fp8", **g32)),
        ("fp6_e2m3 A8 gptq", QuantConfig(format="fp6_e2m3", activations="fp8", method="gptq", calibration=cal)),
        ("int4 g32 bf16 gptq budget=0.35", QuantConfig(format="int4", memory_budget=0.35, **g32)),
    ]


def backfill_bits(path: Path, calib_seeds: int) -> None:
    """Add the bit-count columns to the rows of an earlier run (``path``: its fidelity.json) without generating
    images again: each setting is patched as it was then, with the skip list of that run (the family's patterns as
    written: ``*embed*`` also keeping DiT's per-block embedders), and counted; torchao rows get their nominal bits
    at their scope. GPTQ / AWQ / budget rows are calibrated on the same seeds as then (deterministic)."""
    import fnmatch

    import ditkern
    from ditkern import QuantConfig, zoo
    from ditkern.patch.engine import family_of
    from ditkern.quant import calibrate
    from ditkern.quant.feature import bit_counts

    torch.set_num_threads(1)
    rows = json.loads(path.read_text())
    for name in sorted({r["pipeline"] for r in rows}):
        pipe = zoo.load(name)
        model = pipe.transformer
        fam = family_of(model)
        old = fam.quant.default_skip(model, fam.stack if not isinstance(fam.stack, str) else None)
        seeds = list(range(1000, 1000 + calib_seeds))
        cal = calibrate(pipe, lambda: [zoo.generate(pipe, [s % 10], [s]) for s in seeds])
        groups = {"embedders": [p for p in old if "embed" in p or "caption" in p or "adaln_single" in p],
                  "final proj/norm": [p for p in old if p.startswith(("proj_out", "norm_out"))],
                  "first/last adaLN": [p for p in old if ".norm*" in p]}  # fmt: skip
        settings = ditkern_settings(False) + calibrated_settings(cal)
        settings += [(f"fp4_e2m1 quantize {g}", QuantConfig(format="fp4_e2m1", skip=[p for p in old if p not in pats]))
                     for g, pats in groups.items() if pats]  # fmt: skip
        settings = {n: (dataclasses.replace(q, skip=old) if q.skip is None else q) for n, q in settings}
        linears = {f: m for f, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for r in rows:
            if r["pipeline"] != name or r.get("psnr_db") is None:
                continue
            st = r["setting"]
            if st in settings:
                if settings[st].skip == tuple(old):
                    why = "skip list of that run: *embed* also in blocks"
                    r["note"] = "; ".join(x for x in (r.get("note"), why) if x)
                ditkern.patch(pipe, quant=settings[st], fused_norms=False, backend="torch")
                b = bit_counts(model)
                ditkern.unpatch(pipe)
            elif st.startswith("torchao"):
                nominal = r["bits_per_quantized_weight"]
                if st.endswith("(default skip)"):
                    kept = {f for f in linears if any(fnmatch.fnmatchcase(f, p) for p in old)}
                else:  # NVFP4 keeps layers whose dims are not multiples of 16 (the run's note lists them)
                    kept = {f for f, m in linears.items() if "NVFP4" in st and (m.weight.shape[0] % 16 or
                                                                                m.weight.shape[1] % 16)}  # fmt: skip
                b = _nominal_bits(model, kept, nominal)
            elif st.startswith("bf16 pipeline"):
                b = dict.fromkeys(("quantized", "blocks", "blocks_bf16", "all"), 16.0) | {"blocks_kept": 1.0}
            else:
                continue
            r.update(bits_per_quantized_weight=round(b["quantized"], 3), bits_blocks=round(b["blocks"], 3),
                     bits_blocks_bf16=round(b["blocks_bf16"], 3), bits_all_linears=round(b["all"], 3),
                     blocks_kept_fraction=round(b["blocks_kept"], 3))  # fmt: skip
            print(name, st, r["bits_blocks_bf16"], flush=True)
    _write(rows, path.parent)
    _plot(rows, path.parent)


def _fnmatch_any(path, patterns) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def torchao_settings():
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no peer baseline here
        return [], f"torchao unavailable: {type(exc).__name__}: {exc}"
    from torchao.quantization import (  # noqa: PLC0415
        Float8WeightOnlyConfig,
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup  # noqa: PLC0415

    s = [
        (
            "torchao IntxWeightOnly int4 PerGroup(64)",
            lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)),
            4.5,
        ),
        ("torchao Float8WeightOnly", lambda: Float8WeightOnlyConfig(), 8.0),
        (
            "torchao Int8DynAct Int4 PerGroup(64)",
            lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(64)),
            4.5,
        ),
    ]
    try:
        from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig  # noqa: PLC0415

        s.insert(0, ("torchao NVFP4WeightOnly", lambda: NVFP4WeightOnlyConfig(), 4.5))
    except Exception as exc:  # noqa: BLE001
        s.insert(0, ("torchao NVFP4WeightOnly", exc, 4.5))
    return s, ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--calib-seeds", type=int, default=10)
    p.add_argument("--choice-seeds", type=int, default=30,
                   help="images (seeds 1000.., the calibration seeds first) the +choice rows choose roundings on")
    p.add_argument("--pipelines", nargs="*", default=["digits-dit", "digits-flux"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(OUT))
    p.add_argument(
        "--merge",
        nargs="+",
        help="combine fidelity.json files of several runs (a later run's row replaces "
        "an earlier row of the same pipeline and setting) into --out, and exit",
    )
    p.add_argument("--only", help="regex: run only the ditkern settings whose name matches (and no torchao rows)")
    p.add_argument("--skip-study", action="store_true",
                   help="only the skip-list study (fp4_e2m1 absmax and int4 g32 bf16 gptq: what each kept group buys)")
    p.add_argument("--headline", action="store_true",
                   help="only the settings at <= 4.6 (4-bit) / 6.6 (FP6) bits per block linear weight "
                        "(keep_edge_adaln=False), and torchao on all layers: the issue's equal-scope comparison")
    p.add_argument("--backfill-bits", action="store_true",
                   help="add the bit-count columns to --out's fidelity.json rows (no image generated) and exit")
    a = p.parse_args(argv)
    if a.backfill_bits:
        backfill_bits(Path(a.out) / "fidelity.json", a.calib_seeds)
        return
    if a.merge:
        merged: dict = {}
        for path in a.merge:
            for r in json.loads(Path(path).read_text()):
                if r.get("setting") == "fp32 (reference)" and (r["pipeline"], r["setting"]) in merged:
                    continue
                merged[(r["pipeline"], r["setting"].replace("bf16 pipeline (no quantization)", "bf16 pipeline"))] = r
        rows = list(merged.values())
        Path(a.out).mkdir(parents=True, exist_ok=True)
        _write(rows, Path(a.out))
        _plot(rows, Path(a.out))
        return
    torch.set_num_threads(1)
    import ditkern
    from ditkern import zoo
    from ditkern.quant import calibrate
    from ditkern.quant.feature import bit_counts, weight_memory
    from ditkern.zoo import classifier, fidelity

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    seeds = list(range(a.seeds))
    classes = [i % 10 for i in seeds]
    calib_seeds = list(range(1000, 1000 + a.calib_seeds))
    tao, tao_note = torchao_settings()
    if tao_note:
        print(tao_note, flush=True)

    def gen(pipe, batch=25):
        chunks = [zoo.generate(pipe, classes[i : i + batch], seeds[i : i + batch]) for i in range(0, len(seeds), batch)]
        return torch.cat(chunks)

    def record(name, setting, images, ref, seconds, model=None, bits=None, note=""):
        per = fidelity.psnr(images, ref)
        mem = weight_memory(model) if model is not None else None
        b = bit_counts(model) if model is not None and bits is None else (bits or {})
        r3 = lambda v: None if v is None else round(v, 3)  # noqa: E731
        row = dict(pipeline=name, setting=setting, psnr_db=round(fidelity.pooled_psnr(images, ref), 2),
                   psnr_worst_db=round(per.min().item(), 2), accuracy=round(classifier.accuracy(images, classes), 3),
                   bits_per_quantized_weight=r3(b.get("quantized")), bits_blocks=r3(b.get("blocks")),
                   bits_blocks_bf16=r3(b.get("blocks_bf16")), bits_all_linears=r3(b.get("all")),
                   blocks_kept_fraction=r3(b.get("blocks_kept")),
                   linear_memory_vs_fp32=None if mem is None else round(mem["quantized_bytes"] / mem["original_bytes"],
                                                                          4),
                   seconds=round(seconds, 1), note=note)  # fmt: skip
        rows.append(row)
        print(row, flush=True)

    for name in a.pipelines:
        pipe = zoo.load(name)
        t0 = time.perf_counter()
        ref = gen(pipe)
        record(name, "fp32 (reference)", ref, ref, time.perf_counter() - t0, note="unquantized")
        cal = calibrate(pipe, lambda: [zoo.generate(pipe, [s % 10], [s]) for s in calib_seeds])
        settings = ditkern_settings(a.quick)
        if a.headline:
            settings = headline_settings(cal)
        elif a.skip_study:
            from ditkern import QuantConfig

            g32 = dict(group_size=32, scale_dtype="bf16", method="gptq", calibration=cal)
            settings = ablations(pipe.transformer) + ablations(
                pipe.transformer, QuantConfig(format="int4", **g32), "int4 g32 bf16 gptq")
        elif not a.quick:
            settings += ablations(pipe.transformer)[1:] + calibrated_settings(cal)
        if a.only:
            settings = [(n, q) for n, q in settings if re.search(a.only, n)]
        for setting, qc in settings:
            try:
                t0 = time.perf_counter()
                if "+choice" in setting:  # the choice's runs are part of the row's time
                    from ditkern.quant import choose_rounding

                    sel = list(range(1000, 1000 + a.choice_seeds))
                    chosen = choose_rounding(pipe, lambda: zoo.generate(pipe, [s % 10 for s in sel], sel), qc)
                    print(setting, chosen.rounding, flush=True)
                    qc = dataclasses.replace(qc, calibration=chosen)
                ditkern.patch(pipe, quant=qc, fused_norms=False, backend="torch")
                images = gen(pipe)
                record(name, setting, images, ref, time.perf_counter() - t0, model=pipe.transformer)
            except Exception as exc:  # noqa: BLE001 - one failing setting must not lose the others
                traceback.print_exc()
                rows.append(dict(pipeline=name, setting=setting, note=f"failed: {type(exc).__name__}: {exc}"))
            finally:
                ditkern.unpatch(pipe)
        # bf16 as a yardstick for "how close is close" (a bf16 pipeline: the VAE must match the latents' dtype)
        t0 = time.perf_counter()
        try:
            record(name, "bf16 pipeline (no quantization)", gen(zoo.load(name, torch_dtype=torch.bfloat16)), ref,
                   time.perf_counter() - t0,
                   bits=dict.fromkeys(("quantized", "blocks", "blocks_bf16", "all"), 16.0))  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(pipeline=name, setting="bf16 pipeline", note=f"failed: {type(exc).__name__}: {exc}"))
        if a.only or a.skip_study:
            _write(rows, out_dir)
            continue
        scopes = ("blocks only", "all layers") if a.headline else ("default skip", "all layers")
        if tao_note:
            rows.append(dict(pipeline=name, setting="torchao (all configs)", note=tao_note))
        from ditkern.quant.feature import default_skip

        skip = default_skip(pipe.transformer)
        # "blocks only": every linear outside the block stack kept (ditkern's headline rows keep those too)
        outside = [f for f in skip if "*" not in f]
        for (setting, make, bits), scope in [(t, sc) for t in tao for sc in scopes]:
            original = pipe.transformer
            nvfp4 = "NVFP4" in setting
            note = "nominal bits"

            def keep_hp(fqn, m):
                if scope == "default skip" and _fnmatch_any(fqn, skip):
                    return True
                if scope == "blocks only" and fqn in outside:
                    return True
                # NVFP4 needs both weight dims divisible by 16: other layers stay in fp32
                return nvfp4 and (m.weight.shape[0] % 16 or m.weight.shape[1] % 16)

            try:
                if isinstance(make, Exception):
                    raise make
                from torchao.quantization import quantize_

                pipe.transformer = copy.deepcopy(original)
                kept = [
                    f for f, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear) and keep_hp(f, m)
                ]
                quantize_(pipe.transformer, make(),
                          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not keep_hp(fqn, m))  # fmt: skip
                if nvfp4 and scope == "all layers":
                    note += f"; kept in fp32 (dims not multiples of 16): {', '.join(kept) or 'none'}"
                t0 = time.perf_counter()
                images = gen(pipe)
                record(name, f"{setting} ({scope})", images, ref, time.perf_counter() - t0,
                       bits=_nominal_bits(original, set(kept), bits), note=note)  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                msg = str(exc).splitlines()[0][:200] if str(exc) else ""
                rows.append(dict(pipeline=name, setting=f"{setting} ({scope})",
                                 note=f"failed on CPU: {type(exc).__name__}: {msg}"))  # fmt: skip
                print(setting, "failed:", type(exc).__name__, msg, flush=True)
            finally:
                pipe.transformer = original
        _write(rows, out_dir)
    _write(rows, out_dir)
    _plot(rows, out_dir)


def _nominal_bits(model, kept: set[str], nominal: float) -> dict:
    """Bits per weight of a torchao-quantized copy of ``model`` at the same scopes as ditkern's rows: ``nominal``
    bits for its quantized linears, the real bits of the ``kept`` ones (fp32 here; bf16 for ``blocks_bf16``)."""
    from ditkern.patch.engine import family_of

    fam = family_of(model)
    lists = set(fam.stack.lists) if fam is not None and not isinstance(fam.stack, str) else set()
    acc = {k: [0.0, 0] for k in ("quantized", "blocks", "blocks_bf16", "all", "blocks_kept")}
    for path, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        n, q, blk = m.weight.numel(), path not in kept, path.split(".")[0] in lists
        real = 8 * m.weight.element_size()
        for k, b, on in [("quantized", nominal, q), ("all", nominal if q else real, True),
                         ("blocks", nominal if q else real, blk), ("blocks_bf16", nominal if q else 16, blk),
                         ("blocks_kept", 0 if q else 1, blk)]:  # fmt: skip
            if on:
                acc[k][0] += b * n
                acc[k][1] += n
    return {k: (b / n if n else None) for k, (b, n) in acc.items()}


def _write(rows, out_dir: Path):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "fidelity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out_dir / "fidelity.json").write_text(json.dumps(rows, indent=1))
    head = ["pipeline", "setting", "PSNR dB", "worst dB", "class acc", "bits/quantized weight", "bits/block weight",
            "bits/block weight (kept at bf16)", "bits/linear weight", "block weights kept", "s", "note"]
    lines = ["# Quantized reference pipelines: fidelity vs the fp32 pipeline (CPU)", "",
             "Command: `python -m bench.quant_fidelity` (ditkern's torch reference path; same seeds and classes; "
             "PSNR pooled over all images). Bits per weight, scales included: over the quantized layers; over every "
             "linear weight of the transformer blocks, layers left in high precision at their real bits (fp32 in "
             "this CPU run) and at bf16; over every linear weight of the transformer; torchao rows: its nominal bits "
             "for the layers it quantizes, at the same scopes.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in rows:
        v = [r.get("pipeline"), r.get("setting"), r.get("psnr_db"), r.get("psnr_worst_db"), r.get("accuracy"),
             r.get("bits_per_quantized_weight"), r.get("bits_blocks"), r.get("bits_blocks_bf16"),
             r.get("bits_all_linears"), r.get("blocks_kept_fraction"), r.get("seconds"), r.get("note", "")]  # fmt: skip
        lines.append("| " + " | ".join("" if x is None else str(x) for x in v) + " |")
    (out_dir / "fidelity.md").write_text("\n".join(lines) + "\n")


def _plot(rows, out_dir: Path, low_bits: float = 4.6):
    """Top: PSNR vs bits per block weight, every row. Bottom: the rows of <= ``low_bits`` bits per block weight as
    bars (mean PSNR; the dot is the worst image), best first: the 4-bit comparison without overlapping labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bits(r):
        return r.get("bits_blocks_bf16") or r.get("bits_per_quantized_weight")

    pipes = sorted({r["pipeline"] for r in rows})
    low = {n: sorted((r for r in rows if r["pipeline"] == n and r.get("psnr_db") is not None and bits(r) is not None
                      and bits(r) <= low_bits + 1e-9 and not math.isinf(r["psnr_db"])),
                     key=lambda r: r["psnr_db"]) for n in pipes}  # fmt: skip
    n_low = max([len(v) for v in low.values()] + [1])
    fig, axes = plt.subplots(2, len(pipes), figsize=(7 * len(pipes), 5 + 0.28 * n_low + 1.5), squeeze=False,
                             gridspec_kw=dict(height_ratios=[5, 0.28 * n_low + 1.5]))  # fmt: skip

    def color(r):
        tao = r["setting"].startswith("torchao")
        return "tab:red" if tao else ("tab:orange" if "A8" in r["setting"] else "tab:blue")

    for ax, bx, name in zip(axes[0], axes[1], pipes):
        for r in rows:
            x = bits(r)
            if r["pipeline"] != name or r.get("psnr_db") is None or x is None or math.isinf(r["psnr_db"]):
                continue
            ax.scatter(x, r["psnr_db"], marker="s" if r["setting"].startswith("torchao") else "o", color=color(r))
            ax.annotate(r["setting"], (x, r["psnr_db"]), fontsize=6)
        ax.set_xlabel("bits per block linear weight (scales included, kept layers at bf16; torchao: nominal)")
        ax.set_ylabel("PSNR vs fp32 pipeline (dB)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        rs = low[name]
        ys = list(range(len(rs)))
        for y, r in zip(ys, rs):
            w = r.get("psnr_worst_db")
            if w is not None:
                bx.plot([w, r["psnr_db"]], [y, y], color="0.6", lw=1, zorder=1)
                bx.scatter([w], [y], color="k", s=10, zorder=3, label="worst image" if y == 0 else None)
            bx.scatter([r["psnr_db"]], [y], color=color(r), s=30, zorder=3, label="mean (pooled)" if y == 0 else None)
            bx.annotate(f"{r['psnr_db']:.2f}", (r["psnr_db"], y), fontsize=6, va="center", xytext=(4, 0),
                        textcoords="offset points")  # fmt: skip
        bx.set_yticks(ys, [f"{r['setting']} ({bits(r):.2f} b)" for r in rs], fontsize=6)
        vals = [v for r in rs for v in (r["psnr_db"], r.get("psnr_worst_db")) if v is not None]
        if vals:
            bx.set_xlim(min(vals) - 1, max(vals) + 2)
            bx.legend(fontsize=7, loc="lower right")
        bx.set_xlabel(f"PSNR (dB) of the rows of <= {low_bits:g} bits per block weight: mean and worst image")
        bx.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out_dir / "fidelity.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
