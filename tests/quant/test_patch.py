"""ditkern.patch(model, quant=...) on tiny random models of every family: the quantized model computes exactly what
the model with dequantized weights computes, unpatch is bit-exact, the report shows formats and memory, skip lists,
memory budgets, calibration, composition with the fused norms and the cache, compile, checkpoints."""

import copy
import importlib

import pytest
import torch

import ditkern
from ditkern.quant import formats as F
from ditkern.quant.feature import default_skip, quantized_layers, weight_memory
from tests.patch import tiny


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _linears(model):
    return {p: m for p, m in model.named_modules() if type(m).__name__ == "Linear"}


def _dequantized_copy(model, layers):
    """An unpatched copy of ``model`` whose quantized layers hold W_hat: the function the patch must compute."""
    ref = copy.deepcopy(model)
    ditkern.unpatch(ref)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for p, qw in layers.items():
            mods[p].weight.copy_(qw.dequantize(mods[p].weight.dtype))
    return ref


@pytest.mark.parametrize(
    "family, quant", [(f, "fp4") for f in sorted(tiny.FAMILIES)] + [("flux", "w6a8"), ("wan", "w6a8")]
)
def test_quantized_model_equals_dequantized_model_and_unpatch_is_exact(family, quant):
    model, inputs = tiny.FAMILIES[family]()
    model.eval()
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    before = _run(model, inputs)

    report = ditkern.patch(model, quant=quant, backend="torch")
    layers = quantized_layers(model)
    rows = [r for r in report.patched if r.cls == "Linear"]
    assert len(rows) == len(layers) > 0
    skipped = {r.module for r in report.skipped if r.cls == "Linear"}
    assert skipped and set(layers).isdisjoint(skipped) and set(layers) | skipped == set(_linears(model))
    want = "fp4_e2m1 g64:" if quant == "fp4" else "fp6_e2m3 g64 A8:"
    path = "weight-only" if quant == "fp4" else "FP8 E4M3 activations"
    for r in rows:  # bits per weight of the layer as stored (tiny K: the padding to a whole group counts too)
        qw = layers[r.module]
        bits = f"{8 * qw.nbytes / (qw.shape[0] * qw.shape[1]):.3g} bits/weight"
        assert r.detail.startswith(f"{want} {path}, {bits}, ") and "->" in r.detail and "x, saves " in r.detail, r
    mem = weight_memory(model)
    assert mem["quantized_bytes"] < mem["original_bytes"]
    out = _run(model, inputs)
    assert F.sqnr_db(before, out) > 15  # a quantized model, still close to the original

    if quant == "fp4":  # weight-only: exactly the model with W_hat in fp32 (same ops up to summation order)
        ref = _run(_dequantized_copy(model, layers), inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    ditkern.unpatch(model)
    assert torch.equal(_run(model, inputs), before)  # bit-exact
    assert list(model.state_dict()) == keys_before  # same keys, same order
    assert all(p is params_before[n] for n, p in model.named_parameters())  # the very same Parameter objects
    assert not any("_ditkern_quant" in m.__dict__ or "qweight_packed" in m._buffers for m in model.modules())


@pytest.mark.parametrize("family", ["dit"])
def test_triton_backend_through_the_interpreter(family):
    model, inputs = tiny.FAMILIES[family](batch=1)
    model.eval()
    ditkern.patch(model, quant="w4a8", backend="torch")
    ref = _run(model, inputs)
    ditkern.patch(model, quant="w4a8", backend="triton")
    got = _run(model, inputs)
    ditkern.unpatch(model)
    # same quantized operands; fp32 summation order differs, and an FP8 activation near a rounding tie may flip
    # one E4M3 step downstream, so compare with a relative error bound rather than bitwise
    assert F.sqnr_db(ref, got) > 60


def test_default_skip_list_and_skip_all():
    model, inputs = tiny.flux()
    pats = default_skip(model)
    assert "transformer_blocks.0.norm*" in pats and "single_transformer_blocks.1.norm*" in pats
    # the model-level layers by exact path, none inside the blocks
    top = ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
           "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2", "context_embedder",
           "x_embedder", "norm_out.linear", "proj_out"]  # fmt: skip
    assert sorted(p for p in pats if "*" not in p) == sorted(top)
    report = ditkern.patch(model, quant="fp4", backend="torch")
    why = {r.module: r.reason for r in report.skipped if r.cls == "Linear"}
    assert why["x_embedder"] == "kept in high precision (model-level embedder, outside the blocks)"
    assert why["proj_out"] == "kept in high precision (final projection, outside the blocks)"
    assert why["norm_out.linear"] == "kept in high precision (final adaLN modulation, outside the blocks)"
    assert why["transformer_blocks.0.norm1.linear"].startswith(
        "kept in high precision (adaLN modulation of the first / last block")
    report = ditkern.patch(model, quant=ditkern.QuantConfig(keep_edge_adaln=False), backend="torch")
    assert sorted(r.module for r in report.skipped if r.cls == "Linear") == sorted(top)  # every block linear quantized
    report = ditkern.patch(model, quant=ditkern.QuantConfig(skip=[]), backend="torch")
    assert len([r for r in report.patched if r.cls == "Linear"]) == len(_linears(model))
    _run(model, inputs)
    report = ditkern.patch(model, quant=ditkern.QuantConfig(skip=["*attn*"]), backend="torch")
    assert {r.module for r in report.skipped if r.cls == "Linear"} == {p for p in _linears(model) if "attn" in p}
    ditkern.unpatch(model)


def test_quant_composes_with_fused_norms_and_cache():
    model, inputs = tiny.flux()
    model.eval()
    before = _run(model, inputs)
    report = ditkern.patch(model, quant="fp4", cache=ditkern.TaylorCache(interval=2), backend="torch")
    whats = {r.what for r in report.patched}
    assert any("fpx_linear" in w for w in whats) and any("adaln" in w for w in whats)
    _run(model, inputs)
    ditkern.unpatch(model)
    assert torch.equal(_run(model, inputs), before)


def test_dtype_cast_after_patching_does_not_round_the_scales():
    model, inputs = tiny.dit()
    model.eval()
    ditkern.patch(model, quant=ditkern.QuantConfig(format="int4", scale_dtype="fp32"), backend="torch")
    layers = quantized_layers(model)
    model.half()
    mods = dict(model.named_modules())
    for p, qw in layers.items():
        assert torch.equal(mods[p].qweight_scales.view(torch.float32), qw.scales)
    out = _run(model, {k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()})
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ditkern.unpatch(model)


def test_non_finite_weight_names_the_layer():
    model, _ = tiny.dit()
    with torch.no_grad():
        model.transformer_blocks[1].ff.net[2].weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match="transformer_blocks.1.ff.net.2 has 1 non-finite"):
        ditkern.patch(model, quant="fp4")
    assert not ditkern.is_patched(model)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(format="fp5"), ValueError, "QuantConfig.format='fp5' is not a known format"),
        (dict(group_size=0), ValueError, "QuantConfig.group_size=0 must be positive"),
        (
            dict(group_size=6, format="fp6_e3m2"),
            ValueError,
            "QuantConfig.group_size=6 must be a multiple of the packing unit",
        ),
        (dict(group_size=96), ValueError, "QuantConfig.group_size=96 is not supported"),
        (dict(group_size=64.0), TypeError, "QuantConfig.group_size must be an int"),
        (dict(activations="int8"), ValueError, "QuantConfig.activations='int8'"),
        (dict(scale_dtype="fp8"), ValueError, "QuantConfig.scale_dtype='fp8'"),
        (dict(memory_budget=1.5), ValueError, "QuantConfig.memory_budget=1.5"),
        (dict(method="awq"), ValueError, "QuantConfig.method=.awq. needs calibration"),
        (dict(method="gptq"), ValueError, "QuantConfig.method=.gptq. needs calibration"),
        (dict(skip="proj_out"), TypeError, "QuantConfig.skip must be None or a list"),
        (dict(keep_edge_adaln=0), TypeError, "QuantConfig.keep_edge_adaln must be True or False"),
    ],
)
def test_bad_configs_name_the_field(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ditkern.QuantConfig(**kwargs)


def test_bad_preset_is_rejected():
    model, _ = tiny.dit()
    with pytest.raises(ValueError, match="quant='fp3' is not a preset"):
        ditkern.patch(model, quant="fp3")


def test_memory_budget_and_auto4():
    model, inputs = tiny.flux()
    model.eval()
    cfg = ditkern.QuantConfig(format="auto4", group_size=32, skip=[], memory_budget=0.38)
    report = ditkern.patch(model, quant=cfg, backend="torch")
    layers = quantized_layers(model)
    kept = [r for r in report.skipped if r.cls == "Linear"]
    fmts = {qw.format for qw in layers.values()}
    assert fmts & {"fp4_e2m1", "int4"} and (kept or "fp6_e2m3" in fmts)  # some layers were upgraded
    total = sum(qw.nbytes for qw in layers.values()) + sum(
        m.weight.numel() * m.weight.element_size() for p, m in _linears(model).items() if p not in layers
    )
    bf16 = sum(m.weight.numel() * 2 for m in _linears(model).values())
    assert total <= 0.38 * bf16
    ditkern.unpatch(model)
    with pytest.raises(ValueError, match="memory_budget=0.05 .* is below"):
        ditkern.patch(model, quant=ditkern.QuantConfig(skip=[], memory_budget=0.05))


def test_awq_calibration_never_worse_on_its_rows():
    from ditkern.quant import calibrate
    from ditkern.quant.calibrate import layer_error

    model, inputs = tiny.dit()
    model.eval()
    cal = calibrate(model, lambda: _run(model, inputs))
    assert len(cal) == len(_linears(model))
    ditkern.patch(model, quant=ditkern.QuantConfig(method="awq", calibration=cal, skip=[]), backend="torch")
    awq = quantized_layers(model)
    ditkern.unpatch(model)
    mods = _linears(model)
    for p, qw in awq.items():
        base = F.quantize(mods[p].weight.detach(), "fp4_e2m1", 64)
        assert (
            layer_error(mods[p].weight, qw, cal.layers[p]) <= layer_error(mods[p].weight, base, cal.layers[p]) + 1e-12
        )


@pytest.mark.parametrize("family, quant", [("flux", "w4a8"), ("dit", "int4")])
def test_compile_fullgraph_of_quantized_block(family, quant):
    """torch.compile(fullgraph=True) traces a quantized block (the ops' fakes; no graph break) and matches eager:
    the FP8-activation path and the weight-only path (fpx_linear)."""
    torch.manual_seed(0)
    model, inputs = tiny.FAMILIES[family](batch=1)
    model.eval()
    block = model.transformer_blocks[1]
    if family == "flux":
        args, kwargs = (torch.randn(1, 9, 32), torch.randn(1, 4, 32), torch.randn(1, 32)), {}
    else:  # BasicTransformerBlock with ada_norm_zero: timestep and class labels condition its norm1
        args = (torch.randn(1, 16, 16),)
        kwargs = dict(timestep=torch.tensor([300]), class_labels=torch.tensor([3]))
    with torch.no_grad(), ditkern.patched(model, quant=quant, backend="torch") as report:
        rows = [r for r in report.patched if r.module.startswith("transformer_blocks.1.") and r.cls == "Linear"]
        path = "FP8 E4M3 activations" if quant == "w4a8" else "weight-only"
        assert rows and all(f" {path}, " in r.detail for r in rows)
        eager = block(*args, **kwargs)
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*args, **kwargs)
    eager = eager if isinstance(eager, tuple) else (eager,)
    compiled = compiled if isinstance(compiled, tuple) else (compiled,)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_save_load_bit_exact(tmp_path, family):
    model, inputs = tiny.FAMILIES[family]()
    model.eval()
    cal = None
    if family == "pixart":  # a calibrated checkpoint (smoothing factors) with FP8 activations
        from ditkern.quant import calibrate

        cal = calibrate(model, lambda: _run(model, inputs))
    cfg = ditkern.QuantConfig(format="fp6_e3m2", group_size=32, activations="fp8" if cal else None,
                              method="awq" if cal else "absmax", calibration=cal)  # fmt: skip
    ditkern.patch(model, quant=cfg, backend="torch")
    out = _run(model, inputs)
    path = str(tmp_path / "q.safetensors")
    ditkern.save_quantized(model, path)

    fresh, _ = tiny.FAMILIES[family]()  # other random weights: everything comes from the file
    fresh.eval()
    loaded = ditkern.load_quantized(fresh, path, backend="torch")
    assert loaded is fresh and ditkern.is_patched(fresh)
    assert torch.equal(_run(fresh, inputs), out)
    built = ditkern.load_quantized(type(model), path, backend="torch")  # from the saved config
    built.eval()
    assert torch.equal(_run(built, inputs), out)
    if family == "flux":  # a ditkern-quant-1 file (FP6 four codes in three bytes) is repacked on load
        from safetensors.torch import load_file, save_file

        from ditkern.quant.checkpoint import read_metadata

        tensors = load_file(path)
        for k in [k for k in tensors if k.endswith(".qweight_packed")]:
            codes = F.unpack(tensors[k], F.FORMATS["fp6_e3m2"])
            c = codes.to(torch.int32).view(codes.shape[0], -1, 4)
            word = c[..., 0] | c[..., 1] << 6 | c[..., 2] << 12 | c[..., 3] << 18
            old = torch.stack([word & 255, word >> 8 & 255, word >> 16 & 255], -1).reshape(codes.shape[0], -1)
            assert not torch.equal(old.to(torch.uint8), tensors[k])  # the layouts differ
            tensors[k] = old.to(torch.uint8).contiguous()
        v1 = str(tmp_path / "q1.safetensors")
        save_file(tensors, v1, metadata=read_metadata(path) | {"checkpoint_format": "ditkern-quant-1"})
        assert torch.equal(_run(ditkern.load_quantized(type(model), v1, backend="torch").eval(), inputs), out)


def test_load_rejects_mismatches(tmp_path):
    from safetensors.torch import load_file, save_file

    model, inputs = tiny.dit()
    ditkern.patch(model, quant="fp4", backend="torch")
    path = str(tmp_path / "q.safetensors")
    ditkern.save_quantized(model, path)
    other, _ = tiny.flux()
    with pytest.raises(ValueError, match="holds a DiTTransformer2DModel, not a FluxTransformer2DModel"):
        ditkern.load_quantized(other, path)
    from ditkern.quant.checkpoint import read_metadata

    meta = read_metadata(path)
    bad_meta = [
        ("ditkern_version", "9.9.0", "written by ditkern 9.9.0"),
        ("checkpoint_format", "ditkern-quant-0", "checkpoint format 'ditkern-quant-0'"),
    ]
    for key, value, match in bad_meta:
        bad = str(tmp_path / f"bad_{key}.safetensors")
        save_file(load_file(path), bad, metadata=meta | {key: value})
        with pytest.raises(ValueError, match=match):
            ditkern.load_quantized(tiny.dit()[0], bad)
    with pytest.raises(ValueError, match="no quantized layer"):
        ditkern.save_quantized(tiny.dit()[0], str(tmp_path / "x.safetensors"))


@pytest.mark.parametrize("family", ["flux", "sd3", "dit"])
def test_adaln_fp8_fusion_changes_nothing_but_the_work(family, monkeypatch):
    """With the fusion, the norm modules emit FP8 activations and the q/k/v layers reuse them: outputs bit-identical
    to the unfused W4A8 model, and fewer activation quantizations."""
    qmod = importlib.import_module("ditkern.ops.quantize_fp8")  # the module (ditkern.ops.quantize_fp8 is the op)
    from ditkern.quant import fp8_companion

    model, inputs = tiny.FAMILIES[family](batch=1)
    model.eval()
    calls = []
    real = qmod._quantize_fp8_op
    monkeypatch.setattr(qmod, "_quantize_fp8_op", lambda *a: calls.append(1) or real(*a))
    fmod = importlib.import_module("ditkern.ops.fpx_fp8_linear")

    monkeypatch.setattr(fmod, "quantize_fp8", qmod.quantize_fp8)
    ditkern.patch(model, quant=ditkern.QuantConfig(activations="fp8", fuse_adaln=False), backend="torch")
    unfused = _run(model, inputs)
    n_unfused = len(calls)
    calls.clear()
    report = ditkern.patch(model, quant=ditkern.QuantConfig(activations="fp8"), backend="torch")
    fused_rows = [r for r in report.patched if "adaln_modulate_fp8" in r.what]
    assert fused_rows and all(r.detail == "emits e4m3 activations" for r in fused_rows)
    fused = _run(model, inputs)
    assert torch.equal(fused, unfused)
    assert len(calls) < n_unfused, (len(calls), n_unfused)
    ditkern.unpatch(model)
    fp8_companion.clear()


def test_dit_block_embedders_are_quantized_and_bits_are_counted_honestly():
    """DiT's per-block timestep embedders (norm1.emb) are not model-level embedders: quantized by default. Bits per
    weight over the quantized layers, the block stack (kept layers at their real 32 bits) and all linears."""
    from ditkern.quant.feature import bit_counts

    model, _ = tiny.dit()
    model.transformer_blocks.append(copy.deepcopy(model.transformer_blocks[1]))  # 3 blocks: a middle one
    ditkern.patch(model, quant="fp4", backend="torch")
    layers = quantized_layers(model)
    assert "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1" in layers
    assert "transformer_blocks.1.norm1.linear" in layers and "transformer_blocks.0.norm1.linear" not in layers
    lin = _linears(model)
    n = {p: m.weight.numel() for p, m in lin.items()}
    blocks = [p for p in lin if p.startswith("transformer_blocks.")]
    kept = [p for p in blocks if p not in layers]
    q_bits = sum(8 * layers[p].nbytes for p in blocks if p in layers)
    b = bit_counts(model)
    assert b["quantized"] == pytest.approx(8 * sum(q.nbytes for q in layers.values()) / sum(n[p] for p in layers))
    assert b["blocks"] == pytest.approx((q_bits + 32 * sum(n[p] for p in kept)) / sum(n[p] for p in blocks))
    assert b["blocks_bf16"] == pytest.approx((q_bits + 16 * sum(n[p] for p in kept)) / sum(n[p] for p in blocks))
    assert b["blocks_kept"] == pytest.approx(sum(n[p] for p in kept) / sum(n[p] for p in blocks))
    assert b["quantized"] < b["blocks_bf16"] < b["blocks"] and b["all"] > b["quantized"]
    ditkern.unpatch(model)
    assert bit_counts(model)["quantized"] is None and bit_counts(model)["blocks"] == 32
