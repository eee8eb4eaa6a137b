"""Gradients through ditkern.

* Every lossless op has a backward: float64 ``gradcheck`` through the raw custom op on the torch path (the references
  compute in float64 for float64 inputs), and the Triton path (interpreter on CPU; it computes in fp32, so no float64
  gradcheck there) in fp32 / bf16 / mixed dtypes against the reference's own autograd in float64, with the STYLE.md
  rule against torch doing the same in the same dtype. Gradients come back in each input's dtype and shape.
* ``loss.backward()`` through every patched family (tiny random models from config): every parameter gradient and the
  input gradient of the patched model against the unpatched model, both against a float64 copy (STYLE.md rule).
* Lossy features under grad: the Taylor cache and windowed attention step aside (exact path), quantized linears run
  their forward but refuse a backward with an error that says they are inference-only; the report says so.
"""

import copy

import pytest
import torch

import ditkern
from ditkern.ops.adaln_modulate import (
    adaln_modulate,
    adaln_modulate_ref,
    gated_residual_adaln,
    gated_residual_adaln_ref,
)
from ditkern.ops.linear_attention import linear_attention, linear_attention_ref
from ditkern.ops.moe import (
    moe_align,
    moe_align_ref,
    moe_combine,
    moe_combine_ref,
    moe_grouped_mlp,
    moe_grouped_mlp_ref,
    moe_route,
    moe_route_ref,
)
from tests.attention.test_sana import tiny_sana
from tests.moe.tiny_hidream import hidream
from tests.ops.test_adaln_modulate import _eager_same_dtype
from tests.patch import tiny

OPS = torch.ops.ditkern
# STYLE.md rule for gradients: err(ditkern) <= 2 * err(torch in the same dtype) + FLOOR * max|grad| (each against
# float64). The floor is one rounding (the dtype's epsilon: fp32 2^-23, bf16 2^-6 ~ 1.6e-2 ~ 2 ulps, fp16 2^-9)
# relative to the gradient's scale, not to each element: a gradient is a sum of many terms, and where they cancel (a
# key bias, whose exact softmax gradient is 0) both errors are ulps of the terms, not of the ~0 result.
FLOOR = {torch.float32: 1.2e-7, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _leaf(t, dtype=None):
    t = t.detach()
    return (t if dtype is None else t.to(dtype)).requires_grad_(True)


def _grads_of(fn, inputs, cotangents):
    """Gradients of ``sum(out * cotangent)`` w.r.t. every tensor of ``inputs`` that requires grad (None elsewhere)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    loss = sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cotangents) if c is not None)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = iter(torch.autograd.grad(loss, wrt))
    return [next(got) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]


def _check_rule(ours, eager, ref64, inputs, dtype, what):
    """STYLE.md rule per input, plus: each gradient has its input's dtype and shape."""
    for i, (g, e, r, t) in enumerate(zip(ours, eager, ref64, inputs)):
        if r is None:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, (what, i, g.dtype, t.dtype, g.shape, t.shape)
        err, err_eager = _err(g, r), _err(e, r)
        floor = FLOOR[dtype] * r.abs().max().item()
        assert err <= 2 * err_eager + floor, (what, i, err, err_eager, floor)


# ----------------------------------------------------------------------------------------------------------------------
# adaln_modulate / gated_residual_adaln
# ----------------------------------------------------------------------------------------------------------------------
def _modulation(kind, B, S, D, dtype):
    """(shift, scale, gate) in the layouts the families hand over."""
    if kind == "chunk":  # AdaLayerNormZero: strided [B, D] chunks of [B, 6 * D]
        emb = torch.randn(B, 6 * D, dtype=dtype)
        return emb[:, :D], emb[:, D : 2 * D], emb[:, 2 * D : 3 * D]
    if kind == "chunk_b1d":  # FLUX / HiDream: [B, 1, D] views of the chunks
        emb = torch.randn(B, 6 * D, dtype=dtype)[:, None]
        return emb[..., :D], emb[..., D : 2 * D], emb[..., 2 * D : 3 * D]
    if kind == "per_token":  # Wan 2.2 TI2V: strided [B, S, D]
        emb = torch.randn(B, S, 6 * D, dtype=dtype)
        return emb[..., :D], emb[..., D : 2 * D], emb[..., 2 * D : 3 * D]
    if kind == "batch1":  # batch size 1 broadcast over B
        return tuple(torch.randn(1, D, dtype=dtype) for _ in range(3))
    return None, None, None


MOD_KINDS = ["chunk", "chunk_b1d", "per_token", "batch1", "none"]


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("mod", MOD_KINDS)
def test_adaln_gradcheck_float64(norm, mod):
    B, S, D = 2, 3, 8
    affine = mod != "none"  # the plain norm once, the affine one with every modulation layout
    x = torch.randn(B, S, D, dtype=torch.float64)
    shift, scale, gate = _modulation(mod, B, S, D, torch.float64)
    w = torch.randn(D, dtype=torch.float64) if affine else None
    b = torch.randn(D, dtype=torch.float64) if affine else None
    # gradcheck differentiates the leaves; the layouts (strided chunks, views) are rebuilt from them in the function
    leaves = [_leaf(t) if t is not None else None for t in (x, shift, scale, w, b)]

    def f(x, shift, scale, w, b):
        return OPS.adaln_modulate(x, shift, scale, w, b, norm, 1e-6, "torch")

    assert torch.autograd.gradcheck(f, leaves)
    if mod == "chunk":
        assert torch.autograd.gradgradcheck(f, leaves)  # the backward is torch ops: double backward works


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("mod", MOD_KINDS)
def test_gated_residual_gradcheck_float64(norm, mod):
    B, S, D = 2, 3, 8
    x, y = torch.randn(B, S, D, dtype=torch.float64), torch.randn(B, S, D, dtype=torch.float64)
    shift, scale, gate = _modulation(mod, B, S, D, torch.float64)
    gate = None if mod == "batch1" else gate  # gate=None (a plain residual add) once
    w, b = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    leaves = [_leaf(t) if t is not None else None for t in (x, y, gate, shift, scale, w, b)]

    def f(x, y, gate, shift, scale, w, b):
        return OPS.gated_residual_adaln(x, y, gate, shift, scale, w, b, norm, 1e-6, "torch")

    assert torch.autograd.gradcheck(f, leaves)  # both outputs: h and the modulated norm


def _chunked(emb, D, i):
    return emb[..., i * D : (i + 1) * D]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "dtype,mod_dtype,w_dtype",
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32, torch.float32),  # Wan: fp32 modulation and norm weights beside a bf16 stream
        (torch.float16, torch.float32, torch.float16),
    ],
    ids=str,
)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("mod", ["chunk", "per_token"])
def test_adaln_grads_every_input_and_dtype(backend, dtype, mod_dtype, w_dtype, norm, mod):
    """Forward through the fused kernel, backward through the registered formula, against float64 autograd of the
    reference; every gradient in its input's dtype and shape, within the STYLE.md rule of diffusers' eager chain."""
    B, S, D = 2, 5, 40
    x = torch.randn(B, S, D).to(dtype)
    y = torch.randn(B, S, D).to(dtype)
    emb = torch.randn(B, 6 * D) if mod == "chunk" else torch.randn(B, S, 6 * D)
    emb = (emb * 0.5).to(mod_dtype)
    w, b = (1 + 0.1 * torch.randn(D)).to(w_dtype), (0.1 * torch.randn(D)).to(w_dtype)
    cot = torch.randn(B, S, D), torch.randn(B, S, D)

    def fused(x, y, emb, w, b):
        return gated_residual_adaln(x, y, _chunked(emb, D, 2), _chunked(emb, D, 0), _chunked(emb, D, 1), norm=norm,
                                    weight=w, bias=b, backend=backend)  # fmt: skip

    def eager(x, y, emb, w, b):
        g, sh, sc = (_chunked(emb, D, i) for i in (2, 0, 1))
        return _eager_same_dtype(x, sh, sc, norm, w.to(dtype), b.to(dtype), 1e-6, y=y, gate=g)

    def ref(x, y, emb, w, b):
        return gated_residual_adaln_ref(x, y, _chunked(emb, D, 2), _chunked(emb, D, 0), _chunked(emb, D, 1),
                                        norm=norm, weight=w, bias=b)  # fmt: skip

    inputs = [_leaf(t) for t in (x, y, emb, w, b)]
    ours = _grads_of(fused, inputs, cot)
    theirs = _grads_of(eager, inputs, cot)
    ref64 = _grads_of(ref, [_leaf(t, torch.float64) for t in inputs], cot)
    _check_rule(ours, theirs, ref64, inputs, dtype, "gated_residual_adaln")

    def fused1(x, emb, w, b):
        return adaln_modulate(x, _chunked(emb, D, 0), _chunked(emb, D, 1), norm=norm, weight=w, bias=b,
                              backend=backend)  # fmt: skip

    def eager1(x, emb, w, b):
        return _eager_same_dtype(x, _chunked(emb, D, 0), _chunked(emb, D, 1), norm, w.to(dtype), b.to(dtype), 1e-6)

    def ref1(x, emb, w, b):
        return adaln_modulate_ref(x, _chunked(emb, D, 0), _chunked(emb, D, 1), norm=norm, weight=w, bias=b)

    inputs = [_leaf(t) for t in (x, emb, w, b)]
    ours = _grads_of(fused1, inputs, cot[:1])
    theirs = _grads_of(eager1, inputs, cot[:1])
    ref64 = _grads_of(ref1, [_leaf(t, torch.float64) for t in inputs], cot[:1])
    _check_rule(ours, theirs, ref64, inputs, dtype, "adaln_modulate")


def test_adaln_only_the_inputs_that_require_grad_get_one():
    x = _leaf(torch.randn(2, 3, 16))
    emb = torch.randn(2, 6 * 16)  # no grad: the modulation is frozen
    out = adaln_modulate(x, emb[:, :16], emb[:, 16:32], backend="triton")
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():  # and no graph at all in inference
        assert not adaln_modulate(x, emb[:, :16], emb[:, 16:32], backend="triton").requires_grad


# ----------------------------------------------------------------------------------------------------------------------
# MoE ops
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_gradcheck_float64(score, renormalize):
    logits = _leaf(torch.randn(9, 5, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda lg: OPS.moe_route(lg, 2, renormalize, score, "torch")[1], [logits])


def _routing(T, E, K, block_m=16):
    ids, _ = moe_route_ref(torch.randn(T, E), K)
    sorted_ids, block_expert, _ = moe_align_ref(ids, E, block_m)
    return sorted_ids, block_expert


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "weights+biases"])
def test_grouped_mlp_gradcheck_float64(activation, extras):
    T, E, K, D, Fh = 7, 4, 2, 6, 5
    sorted_ids, block_expert = _routing(T, E, K)
    d = torch.float64
    x, w1, w2 = torch.randn(T, D, dtype=d), torch.randn(E, Fh, D, dtype=d), torch.randn(E, D, Fh, dtype=d)
    w3 = torch.randn(E, Fh, D, dtype=d) if activation == "swiglu" else None
    weights = torch.rand(T, K, dtype=d) if extras else None
    b1 = torch.randn(E, Fh, dtype=d) if extras else None
    b2 = torch.randn(E, D, dtype=d) if extras else None
    leaves = [_leaf(t) if t is not None else None for t in (x, w1, w3, w2, weights, b1, b2)]

    def f(x, w1, w3, w2, weights, b1, b2):
        return OPS.moe_grouped_mlp(x, sorted_ids, block_expert, w1, w3, w2, weights, b1, b2, K, activation, "torch")

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("shared,bias", [(False, False), (True, True)])
def test_combine_gradcheck_float64(shared, bias):
    y = _leaf(torch.randn(5, 3, 4, dtype=torch.float64))
    sh = _leaf(torch.randn(5, 4, dtype=torch.float64)) if shared else None
    bi = _leaf(torch.randn(4, dtype=torch.float64)) if bias else None
    assert torch.autograd.gradcheck(lambda y, sh, bi: OPS.moe_combine(y, sh, bi, "torch"), [y, sh, bi])


def _moe_pipeline(route, align, grouped, combine, backend):
    """route -> align -> grouped SwiGLU -> combine, by ops (``backend``) or by their references (backend None)."""

    def run(x, router, w1, w3, w2, shared, bias):
        kw = {} if backend is None else {"backend": backend}
        ids, weights = route(x @ router.t(), 2, **kw)
        sorted_ids, block_expert, _ = align(ids, router.shape[0], 16, **kw)
        if backend is None:
            y = grouped(x, sorted_ids, block_expert, w1, w3, w2, weights, top_k=2)
        else:
            y = grouped(x, sorted_ids, block_expert, w1, w2, weights, w3=w3, activation="swiglu", **kw)
        return combine(y, shared, bias, **kw)

    return run


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_moe_ops_grads_chain_against_float64_reference(backend):
    """The four ops chained as SparseMoE chains them, fp32, against float64 autograd of the references (ids are the
    same: well-separated random logits), with the reference chain in fp32 as "torch in the same dtype"."""
    T, E, D, Fh = 21, 4, 16, 24
    x = torch.randn(T, D)
    router = torch.randn(E, D)
    w1, w3 = torch.randn(E, Fh, D) * D**-0.5, torch.randn(E, Fh, D) * D**-0.5
    w2 = torch.randn(E, D, Fh) * Fh**-0.5
    shared, bias = torch.randn(T, D), torch.randn(D)
    cot = (torch.randn(T, D),)
    inputs = [_leaf(t) for t in (x, router, w1, w3, w2, shared, bias)]
    ours = _grads_of(_moe_pipeline(moe_route, moe_align, moe_grouped_mlp, moe_combine, backend), inputs, cot)
    refs = (moe_route_ref, moe_align_ref, moe_grouped_mlp_ref, moe_combine_ref)
    eager = _grads_of(_moe_pipeline(*refs, None), inputs, cot)
    ref64 = _grads_of(_moe_pipeline(*refs, None), [_leaf(t, torch.float64) for t in inputs], cot)
    _check_rule(ours, eager, ref64, inputs, torch.float32, "moe ops")
    assert all(g is not None and g.abs().max() > 0 for g in ours)  # the router too, through the routing weights


def test_moe_align_has_no_gradient_and_runs_under_grad():
    ids, _ = moe_route(_leaf(torch.randn(6, 4)), 2, backend="triton")
    assert not ids.requires_grad
    sorted_ids, block_expert, num_rows = moe_align(ids, 4, 16, backend="triton")
    assert not (sorted_ids.requires_grad or block_expert.requires_grad or num_rows.requires_grad)


def test_sparse_moe_gradients_and_compiled_training():
    """SparseMoE: gradients reach x, the router, the experts, the shared expert and the bias; the same under
    torch.compile(fullgraph=True) (the grouped MLP's backward is an opaque op with a fake)."""
    from ditkern.nn import SparseMoE

    moe = SparseMoE(16, 24, 4, 2, out_bias=True, shared_expert=torch.nn.Linear(16, 16), block_m=16, backend="triton")
    with torch.no_grad():
        moe.out_bias.normal_()
    x = torch.randn(3, 7, 16)
    cot = torch.randn(3, 7, 16)

    def grads(fn):
        moe.zero_grad(set_to_none=True)
        xi = _leaf(x)
        (fn(xi) * cot).sum().backward()
        return {"x": xi.grad, **{n: p.grad for n, p in moe.named_parameters()}}

    eager = grads(moe)
    assert all(g is not None and g.abs().max() > 0 for g in eager.values()), [n for n, g in eager.items() if g is None]
    torch._dynamo.reset()
    compiled = grads(torch.compile(moe, fullgraph=True, backend="aot_eager"))
    for n in eager:
        torch.testing.assert_close(compiled[n], eager[n], atol=1e-6, rtol=1e-5, msg=n)  # same kernels, same order

    moe.routed_grad = False  # diffusers' moe_infer: routed experts under no_grad
    frozen = grads(moe)
    assert frozen["w1"] is None and frozen["router.weight"] is None
    assert frozen["shared.weight"] is not None and frozen["x"] is not None


# ----------------------------------------------------------------------------------------------------------------------
# linear_attention (Sana's default patch)
# ----------------------------------------------------------------------------------------------------------------------
def test_linear_attention_gradcheck_float64():
    q = _leaf(torch.randn(1, 4, 2, 6, dtype=torch.float64).transpose(1, 2))  # [B, H, S, Dh] strided, as Sana hands it
    k, v = (_leaf(torch.randn(1, 5, 2, 6, dtype=torch.float64).transpose(1, 2)) for _ in range(2))  # S_kv != S
    assert torch.autograd.gradcheck(lambda q, k, v: OPS.linear_attention(q, k, v, "relu", 1e-15, "torch"), [q, k, v])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_attention_grads_against_float64_reference(backend, dtype):
    q, k, v = (torch.randn(2, 33, 3, 16).to(dtype).transpose(1, 2) for _ in range(3))
    cot = (torch.randn(2, 3, 33, 16),)
    inputs = [_leaf(t) for t in (q, k, v)]
    ours = _grads_of(lambda q, k, v: linear_attention(q, k, v, backend=backend), inputs, cot)
    # torch in the same dtype: Sana's processor arithmetic (relu, fp32 matmuls) = the reference's autograd
    eager = _grads_of(linear_attention_ref, inputs, cot)
    ref64 = _grads_of(linear_attention_ref, [_leaf(t, torch.float64) for t in inputs], cot)
    _check_rule(ours, eager, ref64, inputs, dtype, "linear_attention")


# ----------------------------------------------------------------------------------------------------------------------
# loss.backward() through every patched family
# ----------------------------------------------------------------------------------------------------------------------
FAMILIES = {**tiny.FAMILIES, "sana": tiny_sana, "hidream": hidream}


def _to(inputs, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def _model_grads(model, inputs, cotangent):
    """{parameter name: grad} plus the input's gradient, for ``loss = sum(out * cotangent)``."""
    inputs = dict(inputs)
    x = _leaf(inputs["hidden_states"])
    inputs["hidden_states"] = x
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    (out * cotangent.to(out.dtype)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["<input hidden_states>"] = x.grad
    return grads


def _family_errors(family, dtype=torch.float32, train=False):
    """(per-gradient (name, err_patched, err_unpatched, scale), the report) of one family, both against float64."""
    model, inputs = FAMILIES[family]()
    model.train(train)
    ref = copy.deepcopy(model).double()
    model, inputs = model.to(dtype), _to(inputs, dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, p in model.named_parameters():  # as from_pretrained(torch_dtype=...) loads it (Wan: fp32 modulation)
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    with torch.no_grad():
        cot = torch.randn_like(model(**inputs, return_dict=False)[0], dtype=torch.float64)
    g64 = _model_grads(ref, _to(inputs, torch.float64), cot)
    unpatched = _model_grads(model, inputs, cot)
    with ditkern.patched(model, backend="triton") as report:
        patched = _model_grads(model, inputs, cot)
    rows = []
    for name, r in g64.items():
        if r is None:  # no gradient in the model (HiDream's routed experts in inference mode): none when patched
            assert unpatched[name] is None and patched[name] is None, name
            continue
        assert patched[name] is not None and patched[name].dtype == unpatched[name].dtype, name
        rows.append((name, _err(patched[name], r), _err(unpatched[name], r), r.abs().max().item()))
    return rows, report


def _assert_rule(rows, dtype):
    scale = max(s for *_, s in rows)  # the floor: relative to the largest gradient of the model (see FLOOR)
    bad = [(n, ep, eu) for n, ep, eu, _ in rows if ep > 2 * eu + FLOOR[dtype] * scale]
    assert not bad, (bad, scale)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_backward_through_patched_family_matches_unpatched(family):
    rows, report = _family_errors(family)
    assert report.patched and not report.skipped, str(report)
    assert len(rows) > 10  # every parameter of the model took part
    _assert_rule(rows, torch.float32)


def test_backward_through_patched_hidream_in_training_mode():
    """Training mode runs HiDream's own MoE forward (routed experts with gradients) beside the fused blocks."""
    rows, _ = _family_errors("hidream", train=True)
    assert any("experts.0.w1" in n for n, *_ in rows)
    _assert_rule(rows, torch.float32)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_backward_through_patched_family_bf16(family):
    rows, _ = _family_errors(family, dtype=torch.bfloat16)
    _assert_rule(rows, torch.bfloat16)


def test_compiled_training_step_of_patched_block():
    """torch.compile(fullgraph=True) of a patched block with a backward: the formulas trace (plain torch ops)."""
    model, _ = tiny.flux(batch=1)
    block = model.transformer_blocks[0]
    args = (torch.randn(1, 9, 32), torch.randn(1, 4, 32), torch.randn(1, 32))
    cot = torch.randn(1, 9, 32)

    def step(fn):
        block.zero_grad(set_to_none=True)
        x = _leaf(args[0])
        (fn(x, *args[1:])[1] * cot).sum().backward()
        # aot_eager returns zeros where eager leaves None (the text stream's last projections do not reach the loss)
        return [x.grad] + [torch.zeros_like(p) if p.grad is None else p.grad for p in block.parameters()]

    with ditkern.patched(model, backend="triton"):
        eager = step(block)
        torch._dynamo.reset()
        compiled = step(torch.compile(block, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# lossy features under grad
# ----------------------------------------------------------------------------------------------------------------------
def _forward_backward(model, inputs):
    inputs = dict(inputs)
    x = _leaf(inputs["hidden_states"])
    inputs["hidden_states"] = x
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    out.square().sum().backward()
    return out.detach(), x.grad


def test_taylor_cache_steps_aside_under_grad():
    model, inputs = tiny.flux()
    model.eval()
    steps = [dict(inputs, timestep=torch.full((2,), t)) for t in (0.9, 0.8, 0.7, 0.6)]
    with ditkern.patched(model, backend="torch"):  # the exact (lossless) patch: what every step must give under grad
        exact = [_forward_backward(model, step) for step in steps]
    cache = ditkern.TaylorCache(order=1, interval=3, warmup=0)
    with ditkern.patched(model, cache=cache, backend="torch") as report:
        assert "inference-only: under grad it steps aside" in str(report)
        for step, (want, want_grad) in zip(steps, exact):  # steps 2 and 3 would be forecasts
            out, grad = _forward_backward(model, step)
            torch.testing.assert_close(out, want, atol=0, rtol=0)
            torch.testing.assert_close(grad, want_grad, atol=0, rtol=0)
        assert ditkern.cache.stats(model)["calls"] == 0  # the state was never touched
        with torch.no_grad():  # and in inference it forecasts as before
            for step in steps:
                model(**step, return_dict=False)
        assert ditkern.cache.stats(model)["forecast_calls"] > 0


def test_window_attention_steps_aside_under_grad():
    model, inputs = tiny.flux()
    model.eval()
    with ditkern.patched(model, backend="torch"):
        with torch.no_grad():
            dense = model(**inputs, return_dict=False)[0]
        exact_out, exact_grad = _forward_backward(model, inputs)
    with ditkern.patched(model, attention=ditkern.WindowAttention(window=3), backend="torch") as report:
        assert any("inference-only" in n and "exact" in n for n in report.notes), str(report)
        with torch.no_grad():
            windowed = model(**inputs, return_dict=False)[0]
        out, grad = _forward_backward(model, inputs)
    assert not torch.allclose(windowed, dense, atol=1e-4)  # the window is real in inference
    torch.testing.assert_close(out, exact_out, atol=0, rtol=0)  # and steps aside under grad
    torch.testing.assert_close(grad, exact_grad, atol=0, rtol=0)


def test_quantized_linears_refuse_under_grad():
    model, inputs = tiny.dit()
    model.eval()
    with ditkern.patched(model, quant="int4", backend="torch") as report:
        assert all("inference-only" in r.detail for r in report.patched if r.what.startswith("quantized linear"))
        with torch.no_grad():
            ref = model(**inputs, return_dict=False)[0]  # inference works
        out = model(**inputs, return_dict=False)[0]  # so does a forward without no_grad (parameters require grad)
        assert out.requires_grad and torch.equal(out.detach(), ref)
        with pytest.raises(RuntimeError, match=r"quantization .*is inference-only.*torch.no_grad"):
            out.sum().backward()  # a backward refuses, with the reason
        with pytest.raises(RuntimeError, match=r"quantization .*is inference-only.*torch.no_grad"):
            _forward_backward(model, inputs)
        model.requires_grad_(False)  # frozen weights and an input without grad: nothing to differentiate, it runs
        model(**inputs, return_dict=False)
