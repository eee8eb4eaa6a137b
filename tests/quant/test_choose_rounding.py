"""The per-layer rounding chosen on the model's outputs (``ditkern.quant.choose_rounding``) and the candidates it
chooses among (``ditkern.quant.adaround.adaround_candidates``)."""

import dataclasses
import math

import pytest
import torch

import ditkern
from ditkern.quant import formats as F
from ditkern.quant.adaround import CANDIDATES, adaround_candidates, adaround_quantize, signed_grid
from ditkern.quant.calibrate import LayerStats, gptq_quantize, layer_error
from ditkern.quant.feature import quantized_layers
from tests.patch import tiny


def _layer(K=64, N=24, R=160, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K, generator=g) * (torch.rand(K, generator=g) * 3 + 0.1)
    return torch.randn(N, K, generator=g) * 0.05, LayerStats(x.abs().mean(0), x, R)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "int4"])
def test_candidates_are_the_roundings_they_name(fmt):
    w, st = _layer()
    c = adaround_candidates(w, fmt, 32, "bf16", st)
    assert tuple(c) == CANDIDATES
    grid = signed_grid(F.get_format(fmt))
    for name, q in c.items():
        v = q.dequantize() / F.load_scale(q.scales).repeat_interleave(32, 1)
        assert torch.isin(v, grid).all(), name  # every weight a grid value at its group's scale
    assert torch.equal(c["absmax"].packed, F.quantize(w, fmt, 32, "bf16").packed)
    assert torch.equal(c["gptq"].dequantize(), gptq_quantize(w, fmt, 32, "bf16", st, H=st.rows.double().T
                                                             @ st.rows.double()).dequantize())  # fmt: skip
    err = {k: layer_error(w, q, st) for k, q in c.items()}
    assert err["learned+polish"] <= err["learned"] and err["gptq+polish"] <= err["gptq"]  # the polish never hurts
    default = adaround_quantize(w, fmt, 32, "bf16", st)
    assert torch.equal(default.dequantize(), c[min(("learned+polish", "gptq+polish"), key=err.get)].dequantize())
    st.choice[F.get_format(fmt).name] = "absmax"  # a recorded choice is what adaround_quantize returns
    assert torch.equal(adaround_quantize(w, fmt, 32, "bf16", st).packed, c["absmax"].packed)


def _snr(out, ref):
    return 10 * math.log10(ref.double().pow(2).sum().item() / (out - ref).double().pow(2).sum().item())


def test_choose_rounding_improves_the_outputs_and_the_patch_uses_the_choice(tmp_path):
    from ditkern.quant import calibrate, choose_rounding

    torch.manual_seed(0)
    model, inputs = tiny.flux()
    model.eval()
    run = lambda: model(**inputs, return_dict=False)[0]  # noqa: E731
    with torch.no_grad():
        cal = calibrate(model, run)
        ref = run()
    qc = ditkern.QuantConfig(format="fp4_e2m1", group_size=32, scale_dtype="bf16", skip=[], method="adaround",
                             calibration=cal)  # fmt: skip
    chosen = choose_rounding(model, run, qc, min_gain_db=0.0, progress=False)
    assert all(not st.choice for st in cal.layers.values())  # the calibration given is left as it was
    r = chosen.rounding
    assert r["layers"] == len(cal) and sum(r["chosen"].values()) == len(cal) and r["layers_changed"] >= 1
    assert r["snr_db_chosen"] > r["snr_db_default"]

    def patched_snr(c):
        ditkern.patch(model, quant=dataclasses.replace(qc, calibration=c), backend="torch")
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
        layers = quantized_layers(model)
        return _snr(out, ref), layers

    s_default, _ = patched_snr(cal)
    ditkern.unpatch(model)
    with torch.no_grad():
        assert torch.equal(run(), ref)  # the weights are the full-precision ones again
    s_chosen, layers = patched_snr(chosen)
    # the patched model computes what the choice measured (fake-quantized weights there, packed kernels here)
    assert abs(s_default - r["snr_db_default"]) < 0.01 and abs(s_chosen - r["snr_db_chosen"]) < 0.01
    assert s_chosen > s_default
    mods = dict(model.named_modules())
    for p, qw in layers.items():
        name = chosen.layers[p].choice["fp4_e2m1"]
        w = mods[p].__dict__["_ditkern_quant"]["param"].detach()
        want = adaround_candidates(w, "fp4_e2m1", 32, "bf16", chosen.layers[p])[name]
        assert torch.equal(qw.packed, want.packed) and torch.equal(qw.scales, want.scales), p
    ditkern.save_quantized(model, str(tmp_path / "ckpt"))
    rec = ditkern.quant.checkpoint.read_metadata(str(tmp_path / "ckpt"))["calibration"]
    assert rec["rounding_choice"]["layers_changed"] == r["layers_changed"]
    ditkern.unpatch(model)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(method="gptq"), ValueError, "qc.method='gptq'; the choice is among learned roundings"),
        (dict(format="auto4"), ValueError, "qc.format='auto4'.*give a fixed format and no budget"),
        (dict(bits=4.6), ValueError, "bits=4.6.*give a fixed format and no budget"),
        (dict(candidates=("learned", "nearest")), ValueError, r"candidates=\['learned', 'nearest'\]; choose among"),
        (dict(passes=0), ValueError, "passes=0 must be an int >= 1"),
        (dict(min_gain_db=-1), ValueError, "min_gain_db=-1 must be a number >= 0"),
        (dict(run="text"), TypeError, "run\\(\\) must return a tensor.*got str"),
        (dict(patched=True), ValueError, r"quantized already .*ditkern.unpatch\(pipe\) first"),
    ],
)
def test_bad_arguments_name_the_argument(change, exc, match):
    from ditkern.quant import calibrate, choose_rounding

    model, inputs = tiny.flux()
    run = lambda: model(**inputs, return_dict=False)[0]  # noqa: E731
    with torch.no_grad():
        cal = calibrate(model, run)
    qkw = {k: change.pop(k) for k in ("method", "format", "bits") if k in change}
    qc = ditkern.QuantConfig(**{**dict(format="fp4_e2m1", group_size=32, skip=[], method="adaround",
                                       calibration=cal), **qkw})  # fmt: skip
    if "run" in change:
        value = change.pop("run")
        run = lambda: value  # noqa: E731
    if change.pop("patched", False):
        ditkern.patch(model, quant=qc, backend="torch")
    with pytest.raises(exc, match=match):
        choose_rounding(model, run, qc, progress=False, **change)
