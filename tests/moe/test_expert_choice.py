"""Expert-choice MoE (``ditkern.nn.ExpertChoiceMoE``) against diffusers' ``NucleusMoELayer``: the STYLE.md rule against
the float64 layer at odd token counts and capacities (torch backend and the Triton kernels through the interpreter),
the static layout of ``expert_choice_align``, gradients, ``torch.compile(fullgraph=True)`` (no data-dependent host
read), no host sync on CUDA, and the patched tiny Nucleus model (output, report row, unpatch bit-exact)."""

from __future__ import annotations

import copy

import pytest
import torch

import ditkern
from ditkern.nn import ExpertChoiceMoE
from ditkern.ops.moe import expert_choice_align
from tests.patch import tiny_image


def _layer(D=32, F=16, E=4, cf=2.0, sigmoid=False, route_scale=2.5, seed=0):
    from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoELayer

    torch.manual_seed(seed)
    layer = NucleusMoELayer(D, F, E, cf, sigmoid, route_scale).eval()
    for p in layer.parameters():  # SwiGLUExperts allocates its packed weights with torch.empty
        if p.dim() == 3:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return layer


def _inputs(B, S, D, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, 2 * D, generator=g)[..., ::2]  # non-contiguous
    return [t.to(dtype) for t in (x, torch.randn(B, S, D, generator=g), torch.randn(B, D, generator=g))]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_expert_choice_align_layout():
    sorted_ids, block_expert = expert_choice_align(3, 5, 16)
    assert sorted_ids.dtype == block_expert.dtype == torch.int32
    assert block_expert.tolist() == [0, 1, 2]
    expect = [e * 5 + i if i < 5 else 15 for e in range(3) for i in range(16)]
    assert sorted_ids.tolist() == expect
    sorted_ids, block_expert = expert_choice_align(2, 33, 16)  # 3 blocks per expert
    assert block_expert.tolist() == [0, 0, 0, 1, 1, 1] and sorted_ids.numel() == 96


# (batch, tokens, experts, capacity_factor, sigmoid): capacities 1 (floor), 7, 4, 9 = S and 11 = S (every token)
CASES = [(1, 7, 3, 0.3, False), (2, 13, 4, 2.0, False), (3, 11, 5, 1.7, True), (2, 9, 2, 2.0, False),
         (1, 11, 4, 4.0, True)]  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B,S,E,cf,sigmoid", CASES, ids=[f"B{c[0]}-S{c[1]}-E{c[2]}-cf{c[3]}" for c in CASES])
def test_matches_nucleus_layer(backend, B, S, E, cf, sigmoid):
    layer = _layer(E=E, cf=cf, sigmoid=sigmoid)
    moe = ExpertChoiceMoE.from_nucleus(layer, block_m=16, backend=backend)
    x, xu, t = _inputs(B, S, 32)
    with torch.no_grad():
        ref64 = copy.deepcopy(layer).double()(x.double(), xu.double(), t.double())
        base = layer(x, xu, t)
        out = moe(x, xu, t)
    # STYLE.md: err <= 2 * err(torch same dtype) + floor, against the float64 layer
    assert _err(out, ref64) <= 2 * _err(base, ref64) + 1e-6, (_err(out, ref64), _err(base, ref64))


def test_capacity_above_tokens_raises_like_diffusers():
    layer = _layer(E=2, cf=3.0)  # C = ceil(3 * 9 / 2) = 14 > 9 tokens: torch.topk refuses, in diffusers too
    moe = ExpertChoiceMoE.from_nucleus(layer, block_m=16, backend="torch")
    x, xu, t = _inputs(1, 9, 32)
    for fn in (layer, moe):
        with pytest.raises(RuntimeError, match="out of range"):
            fn(x, xu, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_matches_nucleus_layer_low_precision(dtype):
    """bf16 scores tie often: the routing runs diffusers' own torch.topk on the same values, so the same tokens are
    taken and the error against float64 stays within the rule."""
    layer = _layer(E=4, cf=2.0).to(dtype)
    moe = ExpertChoiceMoE.from_nucleus(layer, block_m=16, backend="torch")
    x, xu, t = _inputs(2, 13, 32, dtype)
    with torch.no_grad():
        ref64 = copy.deepcopy(layer).double()(x.double(), xu.double(), t.double())
        assert _err(moe(x, xu, t), ref64) <= 2 * _err(layer(x, xu, t), ref64) + 1e-6


def test_gradients_match_nucleus_layer():
    layer = _layer(E=4, cf=2.0)
    x, xu, t = (v.requires_grad_() for v in (v.clone() for v in _inputs(2, 13, 32)))
    cot = torch.randn(2, 13, 32, dtype=torch.float64)

    def grads(fn, params, dtype):
        ins = [v.detach().to(dtype).requires_grad_() for v in (x, xu, t)]
        for p in params:
            p.grad = None
        (fn(*ins).double() * cot).sum().backward()
        return [v.grad for v in ins] + [p.grad for p in params]

    ref = copy.deepcopy(layer).double()
    g64 = grads(ref, list(ref.parameters()), torch.float64)
    gbase = grads(layer, list(layer.parameters()), torch.float32)
    moe = ExpertChoiceMoE.from_nucleus(layer, block_m=16, backend="torch")
    gmoe = grads(moe, list(layer.parameters()), torch.float32)  # the layer's own parameters receive the gradients
    assert len(g64) == 3 + 5
    for r, b, m in zip(g64, gbase, gmoe):
        assert m is not None
        assert _err(m, r) <= 2 * _err(b, r) + 1e-6 * r.abs().max().item(), (_err(m, r), _err(b, r))


def test_compile_fullgraph():
    layer = _layer(E=4, cf=2.0)
    moe = ExpertChoiceMoE.from_nucleus(layer, block_m=16, backend="torch")
    x, xu, t = _inputs(2, 13, 32)
    with torch.no_grad():
        eager = moe(x, xu, t)
        torch._dynamo.reset()
        compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")(x, xu, t)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host-sync detection)")
def test_no_host_sync_on_cuda():
    layer = _layer(D=64, F=32, E=8, cf=2.0).cuda()
    moe = ExpertChoiceMoE.from_nucleus(layer, block_m=16, backend="triton")
    x, xu, t = (v.cuda() for v in _inputs(2, 37, 64))
    with torch.no_grad():
        expected = layer(x, xu, t)
        moe(x, xu, t)  # warm-up: compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = moe(x, xu, t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_patched_tiny_nucleus_model():
    torch.manual_seed(0)
    model, inputs = tiny_image.nucleusmoe(batch=2)
    model.eval()
    cast = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(**cast, return_dict=False)[0]
        before = model(**inputs, return_dict=False)[0]
        report = ditkern.patch(model, backend="torch")
        rows = [r for r in report.patched if r.cls == "NucleusMoELayer"]
        assert [r.module for r in rows] == ["transformer_blocks.1.img_mlp", "transformer_blocks.2.img_mlp"]
        assert all("MoE dispatch fused" in r.what and "expert-choice capacity" in r.detail and
                   "experts read in place" in r.detail for r in rows), str(report)  # fmt: skip
        assert "NucleusMoELayer" in str(report)
        patched = model(**inputs, return_dict=False)[0]
        moe = model.transformer_blocks[1].img_mlp.__dict__["_ditkern_sparse_moe"]
        assert isinstance(moe, ExpertChoiceMoE)
        ex = model.transformer_blocks[1].img_mlp.experts
        assert moe.w2.data_ptr() == ex.down_proj.data_ptr() and moe.w1.data_ptr() == ex.gate_up_proj.data_ptr()
        assert moe.stacked_bytes() == 0  # views of the packed experts, no copy
        w2 = moe.w2
        moe.w2 = torch.nn.Parameter(torch.zeros_like(w2), requires_grad=False)  # only the fused path reads moe.w2
        assert not torch.equal(model(**inputs, return_dict=False)[0], patched)  # (torch path: may equal diffusers)
        moe.w2 = w2
        ditkern.unpatch(model)
        after = model(**inputs, return_dict=False)[0]
    assert _err(patched, ref64) <= 2 * _err(before, ref64) + 1e-5, (_err(patched, ref64), _err(before, ref64))
    assert torch.equal(after, before)  # bit-exact


def test_moe_false_leaves_the_layers():
    torch.manual_seed(0)
    model, _ = tiny_image.nucleusmoe(batch=1)
    report = ditkern.patch(model.eval(), backend="torch", moe=False)
    assert not [r for r in report.patched if r.cls == "NucleusMoELayer"]
    ditkern.unpatch(model)
