"""HiDream family on a tiny random HiDreamImageTransformer2DModel: patched == unpatched (STYLE.md rule against a
float64 model), unpatch bit-exact with the state dict untouched, torch.compile(fullgraph=True) of a patched block
(the original cannot), options and skip reasons."""

import copy

import pytest
import torch

import ditkern
from ditkern.moe import MoEConfig
from ditkern.nn import SparseMoE
from tests.moe.tiny_hidream import hidream


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _to(inputs, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def _hooks_left(model):
    return [n for n, m in model.named_modules() if hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ or
            "_ditkern_sparse_moe" in m.__dict__]  # fmt: skip


def _storage_bytes(model):
    """Bytes of the distinct storages behind the model's parameters and the patched layers' stacked experts."""
    tensors = list(model.parameters())
    for m in model.modules():
        sparse = m.__dict__.get("_ditkern_sparse_moe")
        tensors += list(sparse.parameters()) if sparse is not None else []
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_hidream_patched_matches_unpatched_and_unpatch_is_exact():
    """Also: the experts are held once (the layer's nn.Linear weights become views of the stacks, the same Parameter
    objects), and unpatch gives them independent storage again."""
    model, inputs = hidream()
    model.eval()
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    before = _run(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    experts = [p for n, p in params.items() if ".experts." in n]
    total = _storage_bytes(model)

    report = ditkern.patch(model, backend="triton")
    # without the tie the stacks would add every expert's bytes again
    assert _storage_bytes(model) == total, (_storage_bytes(model), total)
    layer = model.single_stream_blocks[0].block.ff_i
    sparse = layer.__dict__["_ditkern_sparse_moe"]
    assert layer.experts[1].w3.weight.data_ptr() == sparse.w3[1].data_ptr()  # a view into the stack
    assert dict(model.named_parameters()) == params
    classes = sorted(r.cls for r in report.patched)
    blocks = ["HiDreamImageTransformerBlock", "HiDreamImageSingleTransformerBlock"]
    assert classes == sorted(["MOEFeedForwardSwiGLU"] * 2 + blocks), str(report)
    assert not report.skipped and "experts stacked in place" in str(report)
    assert model.state_dict().keys() == state.keys()  # the stacked experts are not registered in the model
    patched = _run(model, inputs)
    err_unpatched = (before.double() - ref64).abs().max().item()
    err_patched = (patched.double() - ref64).abs().max().item()
    assert err_patched <= 2 * err_unpatched + 1e-5, (err_patched, err_unpatched)
    assert not torch.equal(patched, before)  # the fused path really ran

    ditkern.unpatch(model)
    assert _hooks_left(model) == []
    assert torch.equal(_run(model, inputs), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    stacks = {t.data_ptr() for t in (sparse.w1, sparse.w3, sparse.w2)}
    for p in experts:  # independent again: a storage of its own, not inside a stack
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size() and p.data_ptr() not in stacks


def test_hidream_fp16_within_rule():
    model, inputs = hidream(batch=1)
    model.eval()
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    model, inputs = model.half(), _to(inputs, torch.float16)
    before = _run(model, inputs)
    with ditkern.patched(model, backend="triton"):
        patched = _run(model, inputs)
    err_unpatched = (before.double() - ref64).abs().max().item()
    err_patched = (patched.double() - ref64).abs().max().item()
    assert err_patched <= 2 * err_unpatched + 2e-3, (err_patched, err_unpatched)


def _block_inputs(model, inputs, which):
    got = {}

    def grab(module, args, kwargs):
        got.setdefault("kw", {k: v for k, v in kwargs.items()})

    h = which.register_forward_pre_hook(grab, with_kwargs=True)
    _run(model, inputs)
    h.remove()
    return got["kw"]


def test_compile_fullgraph_of_patched_block_and_not_of_the_original():
    model, inputs = hidream(batch=1)
    model.eval()
    block = model.single_stream_blocks[0]
    kw = _block_inputs(model, inputs, block)
    with torch.no_grad():
        expected = block(**kw)
        torch._dynamo.reset()
        # diffusers' moe_infer: bincount().cpu().numpy() and a Python loop over data-dependent expert counts
        with pytest.raises(Exception, match=r"moe_infer|data-dependent|numpy"):
            torch.compile(copy.deepcopy(block), fullgraph=True, backend="aot_eager")(**kw)
        with ditkern.patched(model, backend="triton"):
            eager = block(**kw)
            torch._dynamo.reset()
            compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(**kw)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


def test_moe_option_and_fused_norms_switch_the_rules_independently():
    model, inputs = hidream()
    model.eval()
    before = _run(model, inputs)
    r = ditkern.patch(model, backend="triton", moe=False)
    assert sorted(x.cls for x in r.patched) == ["HiDreamImageSingleTransformerBlock", "HiDreamImageTransformerBlock"]
    r = ditkern.patch(model, backend="triton", fused_norms=False, moe=MoEConfig(block_m=32))
    assert [x.cls for x in r.patched] == ["MOEFeedForwardSwiGLU"] * 2
    assert model.double_stream_blocks[0].block.ff_i.__dict__["_ditkern_sparse_moe"].block_m == 32
    torch.testing.assert_close(_run(model, inputs), before, atol=1e-5, rtol=1e-5)
    ditkern.unpatch(model)
    assert _hooks_left(model) == []
    with pytest.raises(TypeError, match="moe must be None, True/False or a ditkern.moe.MoEConfig"):
        ditkern.patch(model, moe="fast")
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        MoEConfig(block_m=48)


def test_training_mode_runs_the_original_moe_forward():
    model, inputs = hidream(batch=1)
    layer = model.single_stream_blocks[0].block.ff_i
    x = torch.randn(1, 7, 32)
    with ditkern.patched(model, backend="triton", fused_norms=False):
        model.train()
        torch.manual_seed(1)
        with torch.no_grad():
            trained = layer(x)
        model.eval()
        with torch.no_grad():
            fused = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(fused, trained, atol=1e-5, rtol=1e-5)  # same function, both paths


def test_changed_moe_source_is_skipped_with_reason(monkeypatch):
    from ditkern.patch.families import hidream as fam

    monkeypatch.setitem(fam.FINGERPRINTS, "MOEFeedForwardSwiGLU.moe_infer", {"0000000000000000"})
    model, _ = hidream()
    report = ditkern.patch(model, backend="torch")
    skipped = [r for r in report.skipped if r.cls == "MOEFeedForwardSwiGLU"]
    assert len(skipped) == 2 and "moe_infer" in skipped[0].reason and "differs" in skipped[0].reason
    ditkern.unpatch(model)


def test_moved_model_after_patch_is_a_clear_error():
    model, inputs = hidream(batch=1)
    model.eval()
    with ditkern.patched(model, backend="torch", fused_norms=False):
        model.half()
        with pytest.raises(RuntimeError, match="patch after moving / casting the model"):
            _run(model, _to(inputs, torch.float16))


def test_from_hidream_is_independent_or_shared():
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    layer = MOEFeedForwardSwiGLU(dim=32, hidden_dim=64, num_routed_experts=4, num_activated_experts=2).eval()
    x = torch.randn(3, 5, 32)
    own = SparseMoE.from_hidream(layer, block_m=16, backend="triton")
    shared = SparseMoE.from_hidream(layer, share=True, block_m=16, backend="triton")
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(own(x), expected, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(shared(x), expected, atol=2e-6, rtol=1e-5)
        layer.gate.weight.mul_(-1)  # a shared router follows the layer, a copied one does not
        torch.testing.assert_close(shared(x), layer(x), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(own(x), expected, atol=2e-6, rtol=1e-5)
    assert layer.gate.weight.requires_grad  # sharing does not change the model's parameters
    assert own.activated_parameters() == 4 * 32 + 2 * own.expert_parameters() + sum(
        p.numel() for p in layer.shared_experts.parameters()
    )
