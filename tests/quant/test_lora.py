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


def test_pipeline_load_and_unload_lora_weights():
    """digits-flux: a LoRA state dict made here, loaded with the transformer's load_lora_adapter into the quantized
    transformer, then pipe.unload_lora_weights(): outputs as on the dequantized pipeline, then back to the quantized
    pipeline's bit for bit. (FluxPipeline.load_lora_weights itself stops in diffusers' Flux shape-expansion check,
    which reads ``transformer.state_dict()[<layer>.weight]``: a quantized layer has packed buffers there instead.)"""
    from peft.utils import get_peft_model_state_dict

    from ditkern import zoo

    pipe = zoo.load("digits-flux")
    ditkern.patch(pipe, quant=ditkern.QuantConfig(format="int4", group_size=32), backend="torch")
    base = zoo.generate(pipe, [3], [0], num_inference_steps=1)
    donor = copy.deepcopy(pipe.transformer)
    ditkern.unpatch(donor)
    donor.add_adapter(_lora(4), adapter_name="d")
    sd = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(donor, adapter_name="d").items()}
    ref_pipe = zoo.load("digits-flux")
    ref_pipe.transformer = _reference(pipe.transformer)
    pipe.transformer.load_lora_adapter(sd, prefix="transformer", adapter_name="r")
    ref_pipe.transformer.load_lora_adapter(sd, prefix="transformer", adapter_name="r")
    got = zoo.generate(pipe, [3], [0], num_inference_steps=1)
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got, zoo.generate(ref_pipe, [3], [0], num_inference_steps=1), rtol=1e-4, atol=1e-4)
    pipe.unload_lora_weights()
    assert torch.equal(zoo.generate(pipe, [3], [0], num_inference_steps=1), base)
