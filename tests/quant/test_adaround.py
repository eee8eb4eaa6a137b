"""Learned rounding (``method="adaround"``) on a small layer with structured activations, the per-layer format choice
under a bits budget (``format="auto", bits=...``), and a checkpoint of an adaround model."""

import pytest
import torch

import ditkern
from ditkern.quant import formats as F
from ditkern.quant.adaround import adaround_quantize, neighbours, polish, signed_grid
from ditkern.quant.calibrate import LayerStats, gptq_quantize, layer_error
from ditkern.quant.feature import bit_counts, quantized_layers
from tests.patch import tiny

FMTS = ["fp4_e2m1", "fp6_e3m2", "fp6_e2m3", "int4"]


def _layer(K=96, N=40, R=200, seed=0):
    """Uneven, correlated input channels (a few large ones, a shared low-rank part), K not a multiple of 64."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(K, generator=g) * 3 + 0.1
    scale[:4] *= 8
    x = torch.randn(R, K, generator=g) * scale + 0.7 * torch.randn(R, 2, generator=g) @ torch.randn(2, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.05
    return w, LayerStats(x.abs().mean(0), x, R)


@pytest.mark.parametrize("fmt", FMTS)
def test_adaround_output_error_below_gptq_and_absmax(fmt):
    w, st = _layer()
    q = adaround_quantize(w, fmt, 32, "bf16", st)
    e_ada = layer_error(w, q, st)
    e_gptq = layer_error(w, gptq_quantize(w, fmt, 32, "bf16", st), st)
    e_abs = layer_error(w, F.quantize(w, fmt, 32, "bf16"), st)
    assert e_ada < e_abs, (e_ada, e_abs)
    # the learned rounding alone ended 1.04-1.05x above GPTQ here (and above GPTQ + polish on 33 of 36 digits-dit
    # layers), so GPTQ + polish is the second candidate and the lower error is kept: below GPTQ (measured 0.945x for
    # fp4_e2m1, 0.965x for int4), it could only fail if the polish or the choice were broken
    assert e_ada < e_gptq, (e_ada, e_gptq)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "int4"])
def test_values_on_the_grid_scales_as_stored_and_deterministic(fmt):
    w, st = _layer()
    q = adaround_quantize(w, fmt, 32, "bf16", st)
    assert q.format == fmt and q.scales.dtype == torch.bfloat16 and q.smooth is None and q.shape == (40, 96)
    units = F.unpack(q.packed, q.fmt)[:, 96:]
    assert torch.equal(units, torch.zeros_like(units))  # the K padding holds zero codes
    s = F.load_scale(q.scales).repeat_interleave(32, 1)[:, :96]
    v = q.dequantize() / s
    assert torch.isin(v, signed_grid(q.fmt)).all()  # every value is a grid value at its group's scale
    q2 = adaround_quantize(w, fmt, 32, "bf16", st)
    assert torch.equal(q.packed, q2.packed) and torch.equal(q.scales, q2.scales)


def test_neighbours_bracket_and_polish_never_increases_the_error():
    f = F.get_format("fp4_e2m1")
    v = torch.tensor([-7.0, -6.0, -0.2, 0.0, 0.26, 1.75, 5.9, 6.0])
    lo, hi = neighbours(v, f)
    assert torch.all(lo <= v.clamp(-6, 6)) and torch.all(v.clamp(-6, 6) <= hi) and torch.all(lo < hi)
    assert lo.tolist() == [-6.0, -6.0, -0.5, 0.0, 0.0, 1.5, 4.0, 4.0] and hi[5] == 2.0
    w, st = _layer()
    H = (st.rows.T @ st.rows).float()
    sk = F.absmax_scales(torch.nn.functional.pad(w, (0, 0)), f, 32).repeat_interleave(32, 1)
    rtn = F.round_to_grid(w / sk, f) * sk

    def err(wq):
        d = (wq - w).double()
        return ((d @ H.double()) * d).sum().item()

    out = polish(rtn, w, H, sk, f)
    assert err(out) < 0.7 * err(rtn)
    assert torch.isin(out / sk, signed_grid(f)).all()


def _calibrated_tiny_flux():
    from ditkern.quant import calibrate

    torch.manual_seed(0)
    model, inputs = tiny.flux()
    model.eval()
    with torch.no_grad():
        cal = calibrate(model, lambda: model(**inputs, return_dict=False))
    return model, inputs, cal


def test_auto_format_respects_the_bits_budget():
    model, inputs, cal = _calibrated_tiny_flux()
    qc = ditkern.QuantConfig(format="auto", bits=4.9, group_size=32, scale_dtype="bf16", skip=[], method="adaround",
                             calibration=cal)  # fmt: skip
    ditkern.patch(model, quant=qc, backend="torch")
    b = bit_counts(model)
    fmts = {qw.format for qw in quantized_layers(model).values()}
    assert b["quantized"] <= 4.9 and b["all"] <= 4.9  # nothing kept: every linear is counted
    assert "fp6_e2m3" in fmts and fmts & {"fp4_e2m1", "int4"}  # some layers were upgraded, not all
    ditkern.unpatch(model)
    with pytest.raises(ValueError, match=r"QuantConfig.bits=4.2 .* is below what the quantized layers need"):
        ditkern.patch(model, quant=ditkern.QuantConfig(format="auto", bits=4.2, group_size=32, scale_dtype="bf16",
                                                       skip=[]))  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="adaround"), "QuantConfig.method='adaround' needs calibration"),
        (dict(format="auto"), 'format="auto" chooses formats under a budget: give bits='),
        (dict(bits=0), "QuantConfig.bits=0 must be None or bits per weight"),
        (dict(bits="4.5"), "QuantConfig.bits='4.5' must be None or bits per weight"),
        (dict(bits=4.6, memory_budget=0.3), "give one budget, not both"),
        (dict(method="ada"), "QuantConfig.method='ada' is not one of"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ditkern.QuantConfig(**kwargs)


def test_checkpoint_of_an_adaround_model_round_trips_bit_exact(tmp_path):
    model, inputs, cal = _calibrated_tiny_flux()
    qc = ditkern.QuantConfig(format="fp4_e2m1", group_size=32, scale_dtype="bf16", skip=[], method="adaround",
                             calibration=cal)  # fmt: skip
    ditkern.patch(model, quant=qc, backend="torch")
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    for path in (str(tmp_path / "dir"), str(tmp_path / "one.safetensors")):
        ditkern.save_quantized(model, path)
        rec = ditkern.quant.checkpoint.read_metadata(path)["calibration"]
        rec = rec if isinstance(rec, dict) else __import__("json").loads(rec)
        assert rec["method"] == "adaround" and rec["calibrated_layers"] == len(cal) and rec["format"] == "fp4_e2m1"
        loaded = ditkern.load_quantized(path, backend="torch")
        with torch.no_grad():
            assert torch.equal(loaded(**inputs, return_dict=False)[0], out)
        ditkern.save_quantized(loaded, str(tmp_path / "again"))  # a re-save keeps the record of the first
        assert ditkern.quant.checkpoint.read_metadata(str(tmp_path / "again"))["calibration"]["method"] == "adaround"
