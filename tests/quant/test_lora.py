"""peft LoRA adapters on a ditkern-quantized transformer, with random low-rank adapters made here: the runtime path
(peft's low-rank branch beside the quantized GEMM) computes what the same adapters compute on the model whose linear
weights are the dequantized W_hat; set_adapters / disable / delete / unload behave as on that model; fuse_lora merges
and re-quantizes. Needs peft (skipped without it: it is not a ditkern dependency)."""

import copy

import pytest
import torch

import ditkern
import ditkern.quant.lora
from ditkern.formats import quantize
from ditkern.quant.feature import quantized_layers
from tests.patch import tiny
from tests.quant.test_patch import _dequantized_copy

peft = pytest.importorskip("peft", reason="peft is not installed (LoRA support is tested with it)")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _lora(seed, r=4):
    torch.manual_seed(seed)  # init_lora_weights=False: A and B both random, so the adapter changes the output
    return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)


def _reference(model):
    """A copy of the quantized model with its adapters, unpatched, whose quantized layers hold W_hat."""
    return _dequantized_copy(model, quantized_layers(model))


@pytest.fixture
def quantized():
    model, inputs = tiny.flux(batch=1)
    model.eval()
    ditkern.patch(model, quant=ditkern.QuantConfig(format="int4", group_size=32), backend="torch")
    return model, inputs, _run(model, inputs)


def test_runtime_adapters_match_the_dequantized_model(quantized):
    model, inputs, base = quantized
    model.add_adapter(_lora(1), adapter_name="a")
    model.add_adapter(_lora(2, r=2), adapter_name="b")
    wrapped = [p for p, m in model.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) > 10 and any("_ditkern_quant" in m.get_base_layer().__dict__ for _, m in
                                     [(p, dict(model.named_modules())[p]) for p in wrapped])  # fmt: skip
    ref = _reference(model)
    for adapters, weights in [(["a"], [1.0]), (["a"], [0.5]), (["a", "b"], [1.0, 0.3])]:
        model.set_adapters(adapters, weights)
        ref.set_adapters(adapters, weights)
        out = _run(model, inputs)
        assert not torch.allclose(out, base, atol=1e-3)  # the adapters change the output
        torch.testing.assert_close(out, _run(ref, inputs), rtol=1e-5, atol=1e-5)
    model.disable_adapters()
    assert torch.equal(_run(model, inputs), base)
    model.enable_adapters()
    model.delete_adapters(["a", "b"])
    assert torch.equal(_run(model, inputs), base)


def test_fuse_lora_requantizes_the_merged_weight(quantized):
    model, inputs, base = quantized
    model.add_adapter(_lora(3), adapter_name="a")
    model.set_adapters(["a"], [0.7])
    runtime = _run(model, inputs)
    mods = dict(model.named_modules())
    want = {}
    for p, m in mods.items():  # the independent reference: quantize(W_hat + 0.7 * alpha/r * B @ A) per layer
        if hasattr(m, "lora_A") and "_ditkern_quant" in m.get_base_layer().__dict__:
            qw = m.get_base_layer().__dict__["_ditkern_quant"]["qweight"]
            assert m.scaling["a"] == pytest.approx(0.7 * 2)  # set_adapters weight * lora_alpha / r
            with torch.no_grad():
                delta = (m.lora_B["a"].weight @ m.lora_A["a"].weight) * m.scaling["a"]
            want[p + ".base_layer"] = quantize(qw.dequantize() + delta, "int4", 32, "fp32")
    fused = ditkern.quant.lora.fuse_lora(model)
    assert sorted(p + ".base_layer" for p in fused) == sorted(want)
    layers = quantized_layers(model)
    for p, q in want.items():
        assert torch.equal(layers[p].packed, q.packed) and torch.equal(layers[p].scales, q.scales)
    out = _run(model, inputs)  # peft skips the merged adapter's runtime path: only the re-quantized GEMM runs
    assert not torch.equal(out, base)
    from ditkern.quant import formats as F

    assert F.sqnr_db(runtime, out) > 20  # re-quantizing W_hat + delta costs about one 4-bit rounding
    assert ditkern.quant.lora.fuse_lora(model) == []  # already merged


def test_pipeline_load_fuse_unfuse_and_unload_lora_weights(tmp_path):
    """digits-flux: a LoRA made here (peft state dict of a random adapter on an unquantized copy, saved with
    safetensors), loaded by path with pipe.load_lora_weights into the quantized pipeline and into the dequantized
    one (the reference: the same adapter on W_hat in full precision); pipe.fuse_lora re-quantizes the merged weight;
    pipe.transformer.unfuse_lora puts the packed weights back bit for bit; pipe.unload_lora_weights() gives back the
    quantized pipeline's outputs bit for bit."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ditkern import zoo

    def gen(p):
        return zoo.generate(p, [3], [0], num_inference_steps=1)

    pipe = zoo.load("digits-flux")
    ditkern.patch(pipe, quant=ditkern.QuantConfig(format="int4", group_size=32), backend="torch")
    base = gen(pipe)
    donor = copy.deepcopy(pipe.transformer)
    ditkern.unpatch(donor)
    donor.add_adapter(_lora(4), adapter_name="d")
    sd = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(donor, adapter_name="d").items()}
    save_file(sd, str(tmp_path / "lora.safetensors"))
    ref_pipe = type(pipe)(**{**pipe.components, "transformer": _reference(pipe.transformer)})
    for p in (pipe, ref_pipe):
        p.load_lora_weights(str(tmp_path / "lora.safetensors"), adapter_name="r")
    runtime = gen(pipe)
    assert not torch.allclose(runtime, base, atol=1e-3)
    torch.testing.assert_close(runtime, gen(ref_pipe), rtol=1e-4, atol=1e-4)

    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items() if k.endswith(".qweight_packed")}
    for p in (pipe, ref_pipe):
        p.fuse_lora(lora_scale=0.5)
    assert pipe.get_active_adapters() == ["r"] and pipe.transformer.lora_scale == 0.5
    fused, want = gen(pipe), gen(ref_pipe)
    assert not torch.allclose(fused, runtime, atol=1e-3)  # lora_scale=0.5 took effect
    from ditkern.quant import formats as F

    # the reference merges W_hat + 0.5 * BA in full precision; the quantized pipeline rounds that to int4 again
    # (one 4-bit rounding of every merged layer: measured 33 dB on this pipeline; floor 20 dB as in
    # test_fuse_lora_requantizes_the_merged_weight)
    assert F.sqnr_db(want, fused) > 20
    after = {k: v for k, v in pipe.transformer.state_dict().items() if k.endswith(".qweight_packed")}
    assert sum(not torch.equal(before[k], after[k]) for k in before) > 10  # the merged layers were re-quantized
    pipe.transformer.unfuse_lora()
    ref_pipe.transformer.unfuse_lora()
    after = {k: v for k, v in pipe.transformer.state_dict().items() if k.endswith(".qweight_packed")}
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(gen(pipe), gen(ref_pipe), rtol=1e-4, atol=1e-4)  # the runtime path again, at 0.5
    pipe.unload_lora_weights()
    assert torch.equal(gen(pipe), base)
    assert "fuse_lora" in pipe.transformer.__dict__
    ditkern.unpatch(pipe)
    assert "fuse_lora" not in pipe.transformer.__dict__


def test_peft_merge_on_a_quantized_layer_says_what_to_use(quantized):
    """peft's own merge cannot re-quantize: unsafe, torch refuses the in-place add on the placeholder; safe_merge
    replaces the placeholder's data (the packed GEMM would drop it), so the next forward says what to use."""
    model, inputs, base = quantized
    model.add_adapter(_lora(5), adapter_name="a")
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and "_ditkern_quant" in m.get_base_layer().__dict__)
    with pytest.raises(RuntimeError):
        layer.merge()
    layer.merge(safe_merge=True)
    with pytest.raises(RuntimeError, match="pipe.fuse_lora"):
        _run(model, inputs)
