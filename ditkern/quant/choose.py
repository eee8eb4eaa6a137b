"""Per-layer rounding chosen on the pipeline's own outputs (``method="adaround"``).

Learned rounding (:mod:`ditkern.quant.adaround`) computes several roundings of each layer - learned, learned +
polish, GPTQ, GPTQ + polish, absmax - and, by default, keeps the one with the lower *layer* output error of the two
polished ones. On the reference pipelines the layer error does not predict the image error well (the adaLN and
attention layers: docs/quant.md). :func:`choose_rounding` measures instead: it samples ``run()`` (a few images or
latents on calibration seeds) with the full-precision model as the reference, then, layer by layer in the order the
model holds them, tries each other candidate in place of the current one (every other layer as chosen so far) and
keeps it when the outputs' SNR against the reference rises by more than ``min_gain_db``. Greedy coordinate ascent:
the calibration outputs never get worse than the default pick. It needs the full-precision model, as calibration
does, and costs one ``run()`` per layer and candidate tried (``passes`` times).

The choice is recorded per layer and format in a new :class:`~ditkern.quant.calibrate.Calibration` (same statistics;
the one given is left as it was); ``QuantConfig(method="adaround", calibration=<it>)`` patches with it, and a
checkpoint records how many layers it changed. The threshold matters: with 10 calibration images and a threshold of
0.01 dB the choice fitted them (+3.5 dB) and lost 0.6 dB on other seeds (digits-flux); 30 images and 0.05 dB gained
+2.0 dB on them and +1.75 dB on 20 other seeds (bench/results/quant/headline_adaround).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from ditkern.quant.adaround import CANDIDATES, DEFAULT_PICK, _candidates
from ditkern.quant.calibrate import Calibration, _transformers
from ditkern.quant.config import AUTO_FORMATS, QuantConfig


def _outputs(value) -> torch.Tensor:
    """What ``run()`` returned as one flat fp64 CPU tensor: a tensor, a list / tuple of them, or an object with a
    tensor ``.images`` (a diffusers pipeline output with ``output_type="pt"`` or ``"latent"``)."""
    if hasattr(value, "images") and not isinstance(value, torch.Tensor):
        value = value.images
    if isinstance(value, torch.Tensor):
        return value.detach().double().cpu().reshape(-1)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return torch.cat([v.detach().double().cpu().reshape(-1) for v in value])
    raise TypeError(f"choose_rounding: run() must return a tensor, a list of tensors or an output with a tensor "
                    f".images (use output_type='pt' or 'latent'), got {type(value).__name__}")  # fmt: skip


def _snr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out - ref).pow(2).sum().item()
    return math.inf if err == 0 else 10 * math.log10(max(ref.pow(2).sum().item(), 1e-300) / err)


@torch.no_grad()
def choose_rounding(pipe, run: Callable[[], object], qc: QuantConfig, candidates=CANDIDATES, passes: int = 1,
                    min_gain_db: float = 0.05, progress: bool = True) -> Calibration:  # fmt: skip
    """Choose each quantized layer's rounding among ``candidates`` (:data:`ditkern.quant.adaround.CANDIDATES`) by
    the SNR of ``run()``'s outputs against the full-precision ones (see the module docstring). ``qc``: the
    ``method="adaround"`` config to patch with afterwards, with its ``calibration``; returns the calibration to use
    in its place (``dataclasses.replace(qc, calibration=...)``), whose ``rounding`` attribute summarises the
    choice (SNR before / after, layers changed, runs)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from ditkern.formats import get_format  # noqa: PLC0415
    from ditkern.quant.feature import kept_reason  # noqa: PLC0415

    if not isinstance(qc, QuantConfig):
        raise TypeError(f"choose_rounding: qc must be a ditkern.QuantConfig, got {type(qc).__name__}")
    if qc.method != "adaround":
        raise ValueError(f"choose_rounding: qc.method={qc.method!r}; the choice is among learned roundings: "
                         "use method='adaround'")  # fmt: skip
    if qc.format in AUTO_FORMATS or qc.bits is not None or qc.memory_budget is not None:
        raise ValueError(f"choose_rounding: qc.format={qc.format!r}, bits={qc.bits!r}, memory_budget="
                         f"{qc.memory_budget!r}; the choice is made for one format: give a fixed format and no budget")
    bad = [c for c in candidates if c not in CANDIDATES]
    if bad or not candidates:
        raise ValueError(f"choose_rounding: candidates={list(candidates)!r}; choose among {CANDIDATES}")
    if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
        raise ValueError(f"choose_rounding: passes={passes!r} must be an int >= 1")
    if not isinstance(min_gain_db, (int, float)) or isinstance(min_gain_db, bool) or min_gain_db < 0:
        raise ValueError(f"choose_rounding: min_gain_db={min_gain_db!r} must be a number >= 0")
    models = _transformers(pipe)
    if len(models) != 1:
        raise ValueError(f"choose_rounding: expected one transformer, found {len(models)}")
    model = models[0]
    if any("_ditkern_quant" in m.__dict__ for m in model.modules()):
        raise ValueError("choose_rounding: the transformer is quantized already (its full-precision weights are "
                         "needed): ditkern.unpatch(pipe) first")  # fmt: skip
    base = qc.calibration
    fmt = get_format(qc.format).name
    # a new calibration: the same statistics (and their memo of computed roundings), a choice of its own
    cal = Calibration({p: dataclasses.replace(st, choice=dict(st.choice)) for p, st in base.layers.items()})
    kept = kept_reason(model, qc)  # the layers the patch would quantize, as it decides them
    layers: dict[str, nn.Linear] = {p: m for p, m in model.named_modules()
                                    if type(m).__name__ == "Linear" and p in cal.layers and kept(p, m) is None}
    if not layers:
        raise ValueError("choose_rounding: no calibrated layer of the transformer is quantized by qc")
    ref = _outputs(run())
    cands, choice = {}, {}
    for p, m in tqdm(layers.items(), desc="rounding candidates", unit="layer", disable=not progress):
        # adaround_quantize's defaults, as the patch calls it: the same memo entry
        q, err = _candidates(m.weight.detach(), fmt, qc.group_size, qc.scale_dtype, cal.layers[p], name=p)
        cands[p] = q
        choice[p] = min(DEFAULT_PICK, key=err.get)
    fp = {p: m.weight.data for p, m in layers.items()}

    def put(p, name):
        w = cands[p][name].dequantize().to(device=fp[p].device, dtype=fp[p].dtype)
        layers[p].weight.data = w
        return w

    runs = 1
    try:
        for p in layers:
            put(p, choice[p])
        start = best = _snr_db(_outputs(run()), ref)
        runs += 1
        changed = set()
        bar = tqdm(total=passes * len(layers), desc="choose rounding", unit="layer", disable=not progress)
        for _ in range(passes):
            moved = False
            for p in layers:
                current = layers[p].weight.data
                for name in candidates:
                    if name == choice[p]:
                        continue
                    w = put(p, name)
                    v = _snr_db(_outputs(run()), ref)
                    runs += 1
                    if v > best + min_gain_db:
                        best, choice[p], moved, current = v, name, True, w
                        changed.add(p)
                    else:
                        layers[p].weight.data = current
                bar.set_postfix(snr_db=f"{best:.2f}")
                bar.update()
            if not moved:
                break
        bar.close()
    finally:
        for p, m in layers.items():
            m.weight.data = fp[p]
    for p in layers:
        cal.layers[p].choice[fmt] = choice[p]
    cal.rounding = dict(format=fmt, snr_db_default=round(start, 3), snr_db_chosen=round(best, 3),
                        layers=len(layers), layers_changed=len(changed), runs=runs,
                        chosen={c: sum(1 for p in layers if choice[p] == c) for c in CANDIDATES})  # fmt: skip
    return cal


__all__ = ["choose_rounding"]
