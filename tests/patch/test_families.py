"""ditkern.patch on tiny random models of every family: patched == unpatched (STYLE.md rule), unpatch bit-exact,
the report lists what was swapped, patching twice is harmless, and a patched block compiles with fullgraph=True."""

import copy
from collections import Counter

import pytest
import torch

import ditkern
from tests.patch import tiny


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out


def _to(inputs, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def _hooks_left(model):
    return [n for n, m in model.named_modules() if hasattr(m, "_diffusers_hook") or "forward" in m.__dict__]


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_patch_matches_unpatched_and_unpatch_is_exact(family):
    model, inputs = tiny.FAMILIES[family]()
    model.eval()
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    before = _run(model, inputs)

    report = ditkern.patch(model, backend="triton")  # the Triton kernels, through the interpreter on CPU
    assert Counter(r.cls for r in report.patched) == Counter(tiny.EXPECTED[family]), str(report)
    assert not report.skipped, str(report)
    assert all(r.backend == "triton" for r in report.patched)
    text = str(report)
    for cls in tiny.EXPECTED[family]:
        assert cls in text
    patched = _run(model, inputs)

    # STYLE.md: err(patched) <= 2 * err(unpatched, same dtype) + floor, both against the float64 model
    err_unpatched = (before.double() - ref64).abs().max().item()
    err_patched = (patched.double() - ref64).abs().max().item()
    assert err_patched <= 2 * err_unpatched + 1e-5, (err_patched, err_unpatched)
    assert not torch.equal(patched, before)  # the fused path really ran (fp32 rounding differs)

    ditkern.unpatch(model)
    assert not ditkern.is_patched(model)
    assert _hooks_left(model) == []
    assert torch.equal(_run(model, inputs), before)  # bit-exact


@pytest.mark.parametrize("family", ["flux", "dit"])
def test_patch_twice_is_harmless(family):
    model, inputs = tiny.FAMILIES[family]()
    model.eval()
    r1 = ditkern.patch(model, backend="torch")
    out1 = _run(model, inputs)
    r2 = ditkern.patch(model, backend="torch")
    assert len(r2.patched) == len(r1.patched)
    assert torch.equal(_run(model, inputs), out1)
    ditkern.unpatch(model)
    ditkern.unpatch(model)  # unpatching an unpatched model is a no-op
    assert _hooks_left(model) == []


def test_wan_per_token_modulation():
    """Wan 2.2 TI2V passes one timestep per token: modulation is [B, S, 6, D], read as strided views."""
    model, inputs = tiny.wan(per_token=True)
    model.eval()
    before = _run(model, inputs)
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    with ditkern.patched(model, backend="triton") as report:
        assert len(report.patched) == 2
        patched = _run(model, inputs)
    err_unpatched = (before.double() - ref64).abs().max().item()
    assert (patched.double() - ref64).abs().max().item() <= 2 * err_unpatched + 1e-5
    assert torch.equal(_run(model, inputs), before)


def test_fp16_flux_within_rule():
    """Half precision: the fused path rounds once where the eager chain rounds at every op."""
    model, inputs = tiny.flux()
    model.eval()
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    model = model.half()
    inputs = _to(inputs, torch.float16)
    before = _run(model, inputs)
    with ditkern.patched(model, backend="triton"):
        patched = _run(model, inputs)
    err_unpatched = (before.double() - ref64).abs().max().item()
    err_patched = (patched.double() - ref64).abs().max().item()
    assert err_patched <= 2 * err_unpatched + 2e-3, (err_patched, err_unpatched)


def test_unknown_model_reports_instead_of_raising():
    report = ditkern.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert not report.patched
    assert "unknown model class 'Sequential'" in str(report)
    assert "FluxTransformer2DModel" in str(report)
    report = ditkern.patch(object())
    assert "nothing patched" in str(report)


def test_bad_options_are_rejected():
    model, _ = tiny.dit()
    with pytest.raises(TypeError, match="unknown patch option.*fused_norm\\b"):
        ditkern.patch(model, fused_norm=True)
    with pytest.raises(ValueError, match="backend"):
        ditkern.patch(model, backend="tpu")
    with pytest.raises(TypeError, match="config must be a ditkern.PatchConfig"):
        ditkern.patch(model, config={"backend": "torch"})


def test_fused_norms_false_patches_nothing():
    model, _ = tiny.flux()
    report = ditkern.patch(model, fused_norms=False)
    assert not report.patched
    ditkern.unpatch(model)


def test_changed_diffusers_source_is_skipped_with_reason(monkeypatch):
    from ditkern.patch import fingerprints

    monkeypatch.setitem(fingerprints.FINGERPRINTS, "FluxTransformerBlock", {"0000000000000000"})
    model, inputs = tiny.flux()
    report = ditkern.patch(model, backend="torch")
    skipped = [r for r in report.skipped if r.cls == "FluxTransformerBlock"]
    assert len(skipped) == 2 and "differs from the versions" in skipped[0].reason
    assert any(r.cls == "AdaLayerNormZero" for r in report.patched)  # the rest still patched
    ditkern.unpatch(model)


def test_non_adaln_basic_block_is_skipped_with_reason():
    from diffusers.models.attention import BasicTransformerBlock

    from ditkern.config import PatchConfig
    from ditkern.patch.basic import basic_block_rule

    block = BasicTransformerBlock(16, 2, 8, norm_type="layer_norm")
    assert "has no adaLN-Zero modulation" in basic_block_rule(block, PatchConfig())


def test_compile_fullgraph_of_patched_block():
    model, inputs = tiny.flux(batch=1)
    model.eval()
    block = model.transformer_blocks[0]
    D = 32
    args = (torch.randn(1, 9, D), torch.randn(1, 4, D), torch.randn(1, D))
    with torch.no_grad():
        expected = block(*args)
        with ditkern.patched(model, backend="triton"):
            eager = block(*args)
            compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
    for a, b, c in zip(compiled, eager, expected):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_feature_option_without_feature_is_a_clear_error(monkeypatch):
    from ditkern.patch import engine

    monkeypatch.setattr(engine, "FEATURES", [f for f in engine.FEATURES if f.name != "moe"])
    model, _ = tiny.dit()
    with pytest.raises(ValueError, match="option moe=... is not available"):
        ditkern.patch(model, moe=object())


def test_feature_rules_compose_with_family_rules(monkeypatch):
    """A feature's rule on a class the family also patches installs a second hook; unpatch removes both."""
    from ditkern.patch import engine

    calls = []

    def rule(module, cfg):
        def forward(module, *args, **kwargs):
            calls.append(type(module).__name__)
            return module._diffusers_hook._fn_refs[-1].original_forward(*args, **kwargs)

        return engine.Plan("probe", "probe hook", forward, detail="probe")

    feature = engine.Feature("probe", lambda family, model, cfg: {"BasicTransformerBlock": rule})
    monkeypatch.setattr(engine, "FEATURES", [*engine.FEATURES, feature])
    model, inputs = tiny.dit()
    model.eval()
    before = _run(model, inputs)
    report = ditkern.patch(model, backend="torch")
    assert sum(r.what == "probe hook" for r in report.patched) == 2
    _run(model, inputs)
    assert calls == ["BasicTransformerBlock"] * 2
    ditkern.unpatch(model)
    assert _hooks_left(model) == [] and torch.equal(_run(model, inputs), before)
