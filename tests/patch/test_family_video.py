"""The video families (WanVACE, LTX-2, HunyuanVideo 1.5) on tiny random diffusers models built from config: patched ==
unpatched within the STYLE.md rule, unpatch bit-exact, the report rows, a module of unexpected structure skipped with
its reason, torch.compile(fullgraph=True) of a patched block, the Taylor cache, int4 quantization, windowed attention
and gradients - each where the family declares it, and the declared reason where it does not."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import ditkern
from ditkern.patch import engine
from tests.patch import tiny_video
from tests.test_grad import FLOOR, _assert_rule, _err


@dataclass(frozen=True)
class Case:
    expected: dict  # {patched class: count} of the default (lossless) patch
    norm: tuple[str, str]  # (a block list, a norm attribute of its block 0) to swap for a GroupNorm
    cache: str | None = None  # None: the Taylor cache runs; else a part of its declared reason
    attention: str | None = None  # None: windowed attention runs; else a part of its declared reason
    window_layers: int = 0  # windowed self-attention layers when it runs
    block: str = "transformer_blocks"  # the block list whose block 0 is compiled


CASES = {
    "wan_vace": Case(
        expected={"WanTransformerBlock": 2, "WanVACETransformerBlock": 2},
        norm=("vace_blocks", "norm3"),
        cache="leaving fewer than two blocks after it",  # the tiny model's last hint follows its last block
        window_layers=2,
        block="vace_blocks",
    ),
    "ltx2": Case(expected={"LTX2VideoTransformerBlock": 2}, norm=("transformer_blocks", "norm2"), window_layers=2),
    "hunyuan_video15": Case(
        expected={"HunyuanVideo15TransformerBlock": 2, "AdaLayerNormZero": 4, "AdaLayerNormContinuous": 1},
        norm=("transformer_blocks", "norm2"),
        window_layers=2,  # the processor's padding mask taken as text_mask (padded batch: see the test below)
    ),
}
FAMILIES = sorted(CASES)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)


def _to(inputs, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def _hooks_left(model):
    return [n for n, m in model.named_modules() if hasattr(m, "_diffusers_hook") or "forward" in m.__dict__]


def _max_err(outs, refs):
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(outs, refs))


def _tiny(family, **kw):
    model, inputs = tiny_video.FAMILIES[family](**kw)
    return model.eval(), inputs


def test_supported_models_lists_the_video_families():
    assert {"WanVACETransformer3DModel", "LTX2VideoTransformer3DModel", "HunyuanVideo15Transformer3DModel"} <= set(
        ditkern.supported_models()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_matches_unpatched_and_unpatch_is_exact(family):
    model, inputs = _tiny(family)
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    before = _run(model, inputs)

    report = ditkern.patch(model, backend="triton")  # the Triton kernels, through the interpreter on CPU
    assert Counter(r.cls for r in report.patched) == Counter(CASES[family].expected), str(report)
    assert not report.skipped and all(r.backend == "triton" for r in report.patched), str(report)
    assert all(cls in str(report) for cls in CASES[family].expected)
    patched = _run(model, inputs)

    # STYLE.md: err(patched) <= 2 * err(unpatched fp32) + floor, both against the float64 model
    err_unpatched, err_patched = _max_err(before, ref64), _max_err(patched, ref64)
    assert err_patched <= 2 * err_unpatched + 1e-5, (err_patched, err_unpatched)
    assert any(not torch.equal(a, b) for a, b in zip(patched, before))  # the fused path really ran

    ditkern.unpatch(model)
    assert not ditkern.is_patched(model) and _hooks_left(model) == []
    assert all(torch.equal(a, b) for a, b in zip(_run(model, inputs), before))  # bit-exact


@pytest.mark.parametrize("variant", ["ltx2_3", "hunyuan_video15_i2v"])
def test_variants_within_rule(variant):
    """LTX-2.3's options (gated attention, prompt modulation, the perturbed processor with STG on block 1, modalities
    isolated: the norm3 modulation without the a2v/v2a residual) and HunyuanVideo 1.5 image-to-video."""
    if variant == "ltx2_3":
        model, inputs = _tiny("ltx2", v23=True)
        calls = [inputs, dict(inputs, spatio_temporal_guidance_blocks=[1], isolate_modalities=True)]
    else:
        model, inputs = _tiny("hunyuan_video15", i2v=True)
        calls = [inputs]
    for call in calls:
        ref64 = _run(copy.deepcopy(model).double(), _to(call, torch.float64))
        before = _run(model, call)
        with ditkern.patched(model, backend="triton") as report:
            assert report.patched and not report.skipped, str(report)
            patched = _run(model, call)
        assert _max_err(patched, ref64) <= 2 * _max_err(before, ref64) + 1e-5
        assert all(torch.equal(a, b) for a, b in zip(_run(model, call), before))


@pytest.mark.parametrize("family", FAMILIES)
def test_unexpected_structure_is_skipped_with_its_reason(family, monkeypatch):
    model, inputs = _tiny(family)
    blocks, attr = CASES[family].norm
    block = getattr(model, blocks)[0]
    width = getattr(block, attr).normalized_shape[0] if hasattr(getattr(block, attr), "normalized_shape") else None
    setattr(block, attr, nn.GroupNorm(1, width or block.scale_shift_table.shape[-1]))
    report = ditkern.patch(model, backend="torch")
    skipped = [r for r in report.skipped if r.module == f"{blocks}.0"]
    assert len(skipped) == 1 and "norm GroupNorm is not a layer or RMS norm" in skipped[0].reason, str(report)
    assert any(r.cls == type(getattr(model, blocks)[1]).__name__ for r in report.patched)  # the rest still patched
    ditkern.unpatch(model)

    # a changed diffusers forward is reported, not patched
    from ditkern.patch import fingerprints

    cls = type(getattr(model, blocks)[1]).__name__
    monkeypatch.setitem(fingerprints.FINGERPRINTS, cls, {"0000000000000000"})
    report = ditkern.patch(model, backend="torch")
    assert all("differs from the versions" in r.reason for r in report.skipped if r.cls == cls), str(report)
    assert not any(r.cls == cls for r in report.patched)
    ditkern.unpatch(model)


def _block_call(model, inputs, blocks):
    """(block 0 of ``blocks``, the args and kwargs the model calls it with)."""
    block = getattr(model, blocks)[0]
    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    _run(model, inputs)
    handle.remove()
    return block, *seen["call"]


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_fullgraph_of_patched_block(family):
    model, inputs = _tiny(family, batch=1)
    block, args, kwargs = _block_call(model, inputs, CASES[family].block)
    with torch.no_grad():
        expected = block(*args, **kwargs)
        with ditkern.patched(model, backend="triton"):
            eager = block(*args, **kwargs)
            torch._dynamo.reset()
            compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*args, **kwargs)
    for a, b, c in zip(compiled, eager, expected):
        if c is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def _steps(family, inputs, ts):
    for t in ts:
        step = dict(inputs, timestep=torch.full_like(inputs["timestep"], t))
        if "sigma" in step:
            step["sigma"] = step["timestep"] / 1000
        yield step


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_cache(family):
    model, inputs = _tiny(family)
    ts = [999.0, 900.0, 780.0, 640.0, 500.0]
    case = CASES[family]
    if case.cache is not None:
        report = ditkern.patch(model, cache=ditkern.TaylorCache(interval=2), backend="torch")
        reasons = [r.reason for r in report.skipped if r.cls == type(model).__name__]
        assert len(reasons) == 1 and reasons[0].startswith("Taylor cache not applied") and case.cache in reasons[0]
        assert report.patched  # the fused blocks are patched as without the cache
        ditkern.unpatch(model)
        if family != "wan_vace":
            return
        # Wan VACE: the blocks after the last control hint are one chain; 4 blocks, hints after blocks 0 and 1
        torch.manual_seed(0)
        model = type(model).from_config({**model.config, "num_layers": 4}).eval()
    ditkern.patch(model, backend="torch")
    fused = [_run(model, s) for s in _steps(family, inputs, ts)]
    report = ditkern.patch(model, cache=ditkern.TaylorCache(order=1, interval=1), backend="torch")
    n_stack = len(engine.FAMILIES[type(model).__name__].stack.modules(model))
    of = " (of 4; the others always run)" if family == "wan_vace" else ""
    assert any(r.what.startswith(f"Taylor cache over 2 blocks{of}") for r in report.patched), str(report)
    cached = [_run(model, s) for s in _steps(family, inputs, ts)]
    assert all(torch.equal(a, b) for outs, refs in zip(cached, fused) for a, b in zip(outs, refs))
    assert ditkern.cache.stats(model)["forecast_calls"] == 0

    ditkern.patch(model, cache=ditkern.TaylorCache(order=1, interval=2, warmup=1), backend="torch")
    outs = [_run(model, s) for s in _steps(family, inputs, ts)]
    st = ditkern.cache.stats(model)
    assert st["calls"] == len(ts) and st["forecast_calls"] > 0 and st["block_fraction"] < 1.0, st
    # a forecast call skips the 2 chain blocks of the stack's n_stack blocks
    assert st["block_fraction"] == pytest.approx(1 - st["forecast_calls"] * 2 / (len(ts) * n_stack)), st
    assert all(o.isfinite().all() for out in outs for o in out)
    # a forecast step differs from the full computation of that step, and every output stream was forecast
    step = 2  # warmup 1, then full / forecast alternating: step 2 is a forecast
    assert all(not torch.equal(a, b) for a, b in zip(outs[step], fused[step]))
    if family == "wan_vace":  # a second generation resets the state and repeats the first; the gated mode forecasts
        again = [_run(model, s) for s in _steps(family, inputs, ts)]
        assert ditkern.cache.stats(model)["generations"] == 2  # counted from the first generation
        assert all(torch.equal(a, b) for outs_, refs in zip(again, outs) for a, b in zip(outs_, refs))
        ditkern.patch(model, cache=ditkern.TaylorCache(order=1, gate=1e9), backend="torch")
        outs = [_run(model, s) for s in _steps(family, inputs, ts)]
        st = ditkern.cache.stats(model)
        assert st["forecast_calls"] == len(ts) - 1 and st["block_fraction"] < 1.0, st
        assert all(o.isfinite().all() for out in outs for o in out)
    ditkern.unpatch(model)
    assert _hooks_left(model) == []


def _sqnr_db(x, ref):
    return (10 * torch.log10(ref.double().pow(2).sum() / (x.double() - ref.double()).pow(2).sum())).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_quantizes_every_linear_but_the_skip_list(family):
    from ditkern.quant.feature import default_skip

    model, inputs = _tiny(family)
    before = _run(model, inputs)
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    report = ditkern.patch(model, quant="int4", backend="torch")
    quantized = {r.module for r in report.patched if r.what.startswith("quantized linear")}
    kept = {r.module for r in report.skipped if r.cls == "Linear"}
    assert quantized | kept == linears and not quantized & kept, str(report)
    assert all("kept in high precision" in r.reason for r in report.skipped if r.cls == "Linear")
    import fnmatch

    skip = default_skip(model)
    assert kept == {n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in skip)}
    assert not any("embed" in n or n.startswith(("proj_out", "norm_out")) for n in quantized)
    lists = ("blocks", "vace_blocks", "transformer_blocks")
    in_blocks = {n for n in linears if n.split(".")[0] in lists and ("attn" in n or "ff" in n)}
    assert in_blocks and in_blocks <= quantized  # every attention and feed-forward linear of the blocks
    out = _run(model, inputs)
    # int4 g64 on tiny random weights: a loose SQNR floor (a wrong packing or scale gives ~0 dB or NaN)
    assert all(_sqnr_db(a, b) > 8 for a, b in zip(out, before)), [_sqnr_db(a, b) for a, b in zip(out, before)]
    ditkern.unpatch(model)
    assert all(torch.equal(a, b) for a, b in zip(_run(model, inputs), before))


@pytest.mark.parametrize("family", FAMILIES)
def test_window_attention(family):
    model, inputs = _tiny(family)
    case = CASES[family]
    if case.attention is not None:
        report = ditkern.patch(model, attention=ditkern.WindowAttention(window=3), backend="torch")
        reasons = [r.reason for r in report.skipped if r.cls == type(model).__name__]
        assert len(reasons) == 1 and "windowed attention is not available" in reasons[0], str(report)
        assert case.attention in reasons[0]
        ditkern.unpatch(model)
        return
    before = _run(model, inputs)
    # a window covering the whole grid (clamped neighbourhoods: the largest axis) is dense attention
    report = ditkern.patch(model, fused_norms=False, attention=ditkern.WindowAttention(window=9), backend="torch")
    windowed = [r for r in report.patched if "(window_attention)" in r.what]
    assert len(windowed) == case.window_layers, str(report)
    assert _max_err(_run(model, inputs), before) < 1e-4
    # a small window is a real restriction; layers= picks blocks of the declared stack
    report = ditkern.patch(model, fused_norms=False, attention=ditkern.WindowAttention(window=1, layers=[-1]),
                           backend="torch")  # fmt: skip
    assert [r.detail.split(":")[0] for r in report.patched if "(window_attention)" in r.what] == ["block 1"]
    assert any("kept dense (block 0" in r.reason for r in report.skipped)
    assert _max_err(_run(model, inputs), before) > 1e-4
    ditkern.unpatch(model)
    assert all(torch.equal(a, b) for a, b in zip(_run(model, inputs), before))


def test_hunyuan_video15_window_with_text_padding_mask():
    """A padded batch (Qwen and ByT5 prompts of different lengths per item, the zeroed text-to-video image tokens
    padded): the [B, 1, S, S] mask becomes text_mask; a window covering the grid is dense attention (the image
    stream, all the model returns, within the rule against fp64), a small window is not, and a mask that masks an
    image key is refused at call time."""
    model, inputs = _tiny("hunyuan_video15")
    m, m2 = inputs["encoder_attention_mask"], inputs["encoder_attention_mask_2"]
    assert not torch.equal(m[0], m[1]) and not torch.equal(m2[0], m2[1])
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))[0]
    before = _run(model, inputs)[0]
    with ditkern.patched(model, fused_norms=False, attention=ditkern.WindowAttention(window=9), backend="torch"):
        out = _run(model, inputs)[0]
    err_window, err_dense = _err(out, ref64), _err(before, ref64)
    assert err_window <= 2 * err_dense + FLOOR[torch.float32] * ref64.abs().max().item(), (err_window, err_dense)
    with ditkern.patched(model, fused_norms=False, attention=ditkern.WindowAttention(window=1), backend="torch"):
        assert _err(_run(model, inputs)[0], before) > 1e-3
        attn = model.transformer_blocks[0].attn

        def mask_an_image_key(module, args, kwargs):  # a full-length mask: the processor pads nothing in front
            mask = kwargs["attention_mask"]
            S = module.processor.ctx.text + 12  # the text tokens + the 1 x 3 x 4 grid
            full = torch.ones(mask.shape[0], S, dtype=torch.bool)
            full[:, S - mask.shape[1] :] = mask.bool()
            full[0, 0] = False
            return args, dict(kwargs, attention_mask=full)

        handle = attn.register_forward_pre_hook(mask_an_image_key, with_kwargs=True)
        try:
            with pytest.raises(NotImplementedError, match="masks image keys"):
                _run(model, inputs)
        finally:
            handle.remove()
    assert torch.equal(_run(model, inputs)[0], before)


def _grads(model, inputs, cotangents):
    inputs = dict(inputs)
    x = inputs["hidden_states"].detach().clone().requires_grad_(True)
    inputs["hidden_states"] = x
    model.zero_grad(set_to_none=True)
    outs = model(**inputs, return_dict=False)
    sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cotangents)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["<input hidden_states>"] = x.grad
    return grads


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_through_patched_model_matches_unpatched(family):
    model, inputs = _tiny(family)
    ref = copy.deepcopy(model).double()
    cot = [torch.randn_like(o, dtype=torch.float64) for o in _run(model, inputs)]
    g64 = _grads(ref, _to(inputs, torch.float64), cot)
    unpatched = _grads(model, inputs, cot)
    with ditkern.patched(model, backend="triton") as report:
        assert report.patched and not report.skipped
        patched = _grads(model, inputs, cot)
    rows = []
    for name, r in g64.items():
        if r is None:
            assert unpatched[name] is None and patched[name] is None, name
            continue
        assert patched[name] is not None, name
        rows.append((name, _err(patched[name], r), _err(unpatched[name], r), r.abs().max().item()))
    assert len(rows) > 10
    _assert_rule(rows, torch.float32)
    assert FLOOR[torch.float32] < 1e-6
