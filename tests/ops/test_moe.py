"""ditkern.ops.moe: route / align / grouped expert MLP / combine, Triton (interpreter on CPU) and CUDA (GPU only)
against the fp32 references, HiDream's MoEGate, and the no-host-sync contract."""

import pytest
import torch
import torch.nn.functional as F

from ditkern.ops.moe import (
    align_sizes,
    moe_align,
    moe_align_ref,
    moe_combine,
    moe_combine_ref,
    moe_grouped_mlp,
    moe_grouped_mlp_ref,
    moe_grouped_swiglu,
    moe_route,
    moe_route_ref,
)

HAS_GPU = torch.cuda.is_available()
# STYLE.md rule: err(kernel) <= 2 * err(torch in the same dtype) + FLOOR (the floor covers one output rounding)
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _err(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _align_backends():
    return ["triton", "torch"] + (["cuda"] if HAS_GPU else [])


# ----------------------------------------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("T,E,K", [(37, 4, 2), (19, 8, 1), (70, 64, 8), (5, 8, 8)], ids=str)
def test_route_matches_reference(dtype, score, renormalize, T, E, K, device):
    logits = (torch.randn(T, E, device=device) * 2).to(dtype)
    ids, w = moe_route(logits, K, renormalize=renormalize, score=score, backend="triton")
    ids_r, w_r = moe_route_ref(logits, K, renormalize=renormalize, score=score)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == (T, K)
    # the selection is a valid top-k of the reference scores: the scores it picked are the K largest, in order
    lf = logits.float()
    scores = (lf.softmax(-1) if score == "softmax" else lf.sigmoid()).to(dtype).float()
    tol = 1e-6 if dtype == torch.float32 else 1e-3  # one fp16 step of a score in [0, 1] where fp32 exps differ
    assert _err(scores.gather(1, ids.long()), scores.sort(1, descending=True).values[:, :K]) <= tol
    same = (ids == ids_r).all(1).float().mean().item()
    assert same == 1.0 if dtype == torch.float32 else same >= 0.95, same  # fp16: exact score ties may flip
    rows = (ids == ids_r).all(1)
    assert _err(w[rows], w_r[rows]) <= (1e-6 if dtype == torch.float32 else 1e-3)
    assert all(len(set(r)) == K for r in ids.tolist())  # no expert twice


def test_route_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    for backend in ("triton", "torch"):
        ids, w = moe_route(logits, 2, backend=backend)
        assert ids.tolist() == [[1, 2], [0, 1]], backend


def test_route_matches_hidream_moegate():
    """Same experts and weights as diffusers' MoEGate (softmax, no renormalisation, topk sorted=False)."""
    from diffusers.models.transformers.transformer_hidream_image import MoEGate

    gate = MoEGate(embed_dim=24, num_routed_experts=4, num_activated_experts=2).eval()
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        idx, weight, aux = gate(x)
        ids, w = moe_route(F.linear(x.reshape(-1, 24), gate.weight), 2, backend="triton")
    order = idx.argsort(1)
    assert torch.equal(ids.long().sort(1).values, idx.gather(1, order))
    assert _err(w.gather(1, ids.long().argsort(1)), weight.gather(1, order)) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# align
# ----------------------------------------------------------------------------------------------------------------------
def _check_layout(ids, E, block_m, sorted_ids, block_expert, num_rows):
    """Independent invariants: every row once, in its expert's segment, stable, padded per expert, static sizes."""
    flat = ids.reshape(-1).long().cpu()
    N = flat.numel()
    sorted_ids, block_expert = sorted_ids.cpu().long(), block_expert.cpu().long()
    assert (sorted_ids.numel(), block_expert.numel()) == align_sizes(N, E, block_m)
    valid = sorted_ids < N
    assert torch.equal(sorted_ids[valid].sort().values, torch.arange(N))  # a permutation of the rows + sentinels
    assert (sorted_ids[~valid] == N).all()
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    assert int(num_rows.cpu()) == int(padded.sum())
    start = 0
    for e in range(E):
        seg = sorted_ids[start : start + padded[e]]
        rows = seg[seg < N]
        assert rows.numel() == counts[e] and (flat[rows] == e).all()
        assert torch.equal(rows, rows.sort().values)  # stable: input order within an expert
        assert (block_expert[start // block_m : (start + padded[e]) // block_m] == e).all()
        start += int(padded[e])
    assert (block_expert[start // block_m :] == -1).all()


ALIGN_CASES = {
    "odd": (lambda: torch.randint(0, 5, (37, 2)), 5, 16),  # counts not multiples of block_m
    "empty_experts": (lambda: torch.tensor([[0, 3], [3, 0], [0, 3]] * 7), 8, 16),
    "one_expert": (lambda: torch.full((41, 1), 2), 4, 32),
    "top8_of_64": (lambda: torch.stack([torch.randperm(64)[:8] for _ in range(50)]), 64, 16),
    "more_experts_than_rows": (lambda: torch.tensor([[7], [1], [7]]), 16, 16),
    "int64_top1": (lambda: torch.randint(0, 3, (100,)), 3, 64),
}


@pytest.mark.parametrize("backend", _align_backends())
@pytest.mark.parametrize("case", sorted(ALIGN_CASES))
def test_align_layout(backend, case, device):
    make, E, block_m = ALIGN_CASES[case]
    ids = make().to(device)
    ids = ids if case == "int64_top1" else ids.to(torch.int32)
    out = moe_align(ids, E, block_m, backend=backend)
    _check_layout(ids, E, block_m, *out)
    ref = moe_align_ref(ids, E, block_m)
    for a, b in zip(out, ref):
        assert torch.equal(a.cpu(), b.cpu())


def test_align_empty_input():
    s, b, n = moe_align(torch.empty(0, 2, dtype=torch.int32), 4, 16, backend="triton")
    assert s.numel() == 0 and b.numel() == 0 and int(n) == 0


def test_align_compiles_fullgraph_with_static_sizes():
    """No size depends on the routing: the op and even its pure-torch reference trace with fullgraph=True."""
    ids = torch.randint(0, 6, (29, 2), dtype=torch.int32)
    op = torch.compile(lambda i: moe_align(i, 6, 16, backend="triton"), fullgraph=True, backend="aot_eager")
    ref = torch.compile(lambda i: moe_align_ref(i, 6, 16), fullgraph=True, backend="aot_eager")
    for got in (op(ids), ref(ids)):
        _check_layout(ids, 6, 16, *got)
    other = torch.randint(0, 6, (29, 2), dtype=torch.int32)  # new routing, same shapes: no recompile needed
    _check_layout(other, 6, 16, *ref(other))


# ----------------------------------------------------------------------------------------------------------------------
# grouped expert MLP
# ----------------------------------------------------------------------------------------------------------------------
def _loop_same_dtype(x, ids, w, w1, w3, w2, b1, activation, b2=None):
    """HiDream's moe_infer arithmetic in the input dtype: one GEMM chain per expert, product with the weight."""
    T, K = ids.shape
    y = torch.zeros(T, K, x.shape[1], dtype=x.dtype, device=x.device)
    for e in range(w1.shape[0]):
        t, j = (ids == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        a = x[t] @ w1[e].t()
        if b1 is not None:
            a = a + b1[e]
        if activation == "swiglu":
            h = F.silu(a) * (x[t] @ w3[e].t())
        else:
            h = F.gelu(a, approximate="tanh" if activation == "gelu_tanh" else "none")
        out = h @ w2[e].t() + (b2[e] if b2 is not None else 0)
        y[t, j] = out * w[t, j, None].to(x.dtype) if w is not None else out
    return y


def _experts(E, D, Fh, dtype, device, activation="swiglu", bias=False):
    w1 = (torch.randn(E, Fh, D, device=device) / D**0.5).to(dtype)
    w3 = (torch.randn(E, Fh, D, device=device) / D**0.5).to(dtype) if activation == "swiglu" else None
    w2 = (torch.randn(E, D, Fh, device=device) / Fh**0.5).to(dtype)
    b1 = (torch.randn(E, Fh, device=device) * 0.1).to(dtype) if bias else None
    return w1, w3, w2, b1


GEMM_CASES = [
    # (T, E, K, D, F, block_m, routing)
    (37, 4, 2, 48, 80, 16, "random"),
    (23, 8, 8, 32, 64, 16, "random"),
    (30, 4, 1, 40, 72, 32, "one_expert"),
    (26, 6, 2, 32, 48, 16, "empty_experts"),
]


def _routing(T, E, K, kind, device):
    if kind == "one_expert":
        return torch.full((T, K), 1, dtype=torch.int32, device=device)
    if kind == "empty_experts":
        return torch.stack([torch.randperm(2)[:K] * 3 for _ in range(T)]).to(device=device, dtype=torch.int32)
    return torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(device=device, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", GEMM_CASES, ids=str)
def test_grouped_swiglu_matches_reference(dtype, case, device):
    T, E, K, D, Fh, block_m, kind = case
    x = torch.randn(T, D, device=device).to(dtype)
    ids = _routing(T, E, K, kind, device)
    w = torch.rand(T, K, device=device)
    w1, w3, w2, _ = _experts(E, D, Fh, dtype, device)
    s, b, _ = moe_align_ref(ids, E, block_m)  # layout tested above; the GEMM is under test
    y = moe_grouped_swiglu(x, s, b, w1, w3, w2, w, backend="triton")
    ref = moe_grouped_mlp_ref(x.float(), s, b, w1.float(), w3.float(), w2.float(), w, top_k=K)
    eager = _loop_same_dtype(x, ids, w, w1, w3, w2, None, "swiglu")
    assert y.shape == (T, K, D) and y.dtype == dtype
    assert _err(y, ref) <= 2 * _err(eager, ref) + FLOOR[dtype], (_err(y, ref), _err(eager, ref))


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_grouped_gelu_mlp_with_bias_and_unit_weights(activation, device):
    T, E, K, D, Fh = 21, 4, 4, 32, 56
    x = torch.randn(T, D, device=device)
    ids = _routing(T, E, K, "random", device)
    w1, _, w2, b1 = _experts(E, D, Fh, torch.float32, device, activation, bias=True)
    s, b, _ = moe_align_ref(ids, E, 16)
    b2 = torch.randn(E, D, device=device) * 0.1
    w = torch.rand(T, K, device=device)
    y = moe_grouped_mlp(x, s, b, w1, w2, None, b1=b1, top_k=K, activation=activation, backend="triton")
    eager = _loop_same_dtype(x.double(), ids, None, w1.double(), None, w2.double(), b1.double(), activation)
    assert _err(y, eager) <= 1e-5
    y = moe_grouped_mlp(x, s, b, w1, w2, w, b1=b1, b2=b2, top_k=K, activation=activation, backend="triton")
    eager = _loop_same_dtype(x.double(), ids, w.double(), w1.double(), None, w2.double(), b1.double(), activation,
                             b2.double())  # fmt: skip
    assert _err(y, eager) <= 1e-5
    with pytest.raises(ValueError, match=r"b2 must be \[E, D\]"):
        moe_grouped_mlp(x, s, b, w1, w2, w, b1=b1, b2=b2[:, :5], activation=activation)


def test_grouped_gathers_noncontiguous_x():
    T, E, K, D, Fh = 17, 3, 2, 32, 48
    base = torch.randn(D + 5, T).t()  # [T, D] view with row stride 1 and column stride T: gathered through strides
    x = base[:, 3 : 3 + D]
    ids = _routing(T, E, K, "random", "cpu")
    w = torch.rand(T, K)
    w1, w3, w2, _ = _experts(E, D, Fh, torch.float32, "cpu")
    s, b, _ = moe_align_ref(ids, E, 16)
    y = moe_grouped_swiglu(x, s, b, w1, w3, w2, w, backend="triton")
    ref = moe_grouped_mlp_ref(x.contiguous(), s, b, w1, w3, w2, w, top_k=K)
    assert _err(y, ref) <= 1e-5


def _table_configs():
    """Every (gate_up, down) tile pair the GPU table can pick: each tile height, each architecture's shared memory
    (sm_89 99 KB, sm_80 163 KB, sm_90a / sm_100a 227 KB), keyed by tile shape (warps and stages mean nothing to the
    interpreter), at D = 136, F = 72, where no tile is clipped (tiles shrink only below the next power of two)."""
    from ditkern.kernels.moe import gemm_configs

    got = {}
    for block_m in (16, 32, 64, 128):
        for kb in (99, 163, 227):
            gu, dn = gemm_configs(block_m, 136, 72, 2, True, kb * 1024)
            got.setdefault((gu.block_m, gu.block_n, gu.block_k, dn.block_n, dn.block_k), (block_m, kb, gu, dn))
    return sorted(got.values(), key=lambda v: (v[0], v[1]))


def test_gpu_tile_configs_in_the_interpreter():
    """The GPU configs' tiles (128 x 128 gate_up, 128 x 256 down, ...), run by the interpreter at odd sizes
    (masked K / N tails) and, for the 128-row sm_90a pair, at exact multiples (the unmasked EVEN_K / EVEN_N path), with
    a 256-row moe_align block split into two 128-row tiles; against a float64 reference. fp32 operands: the
    interpreter's fp16 dot is elementwise numpy (~50x slower at these tiles), and the tiles, masks and row mapping
    under test do not depend on the dtype."""
    from ditkern.kernels.moe import gemm_configs, moe_grouped_mlp_triton

    def run(T, E, K, D, Fh, block_m, configs):
        x = torch.randn(T, D)
        ids = _routing(T, E, K, "random", "cpu")
        w = torch.rand(T, K)
        w1, w3, w2, _ = _experts(E, D, Fh, torch.float32, "cpu")
        s, b, _ = moe_align_ref(ids, E, block_m)  # the layout (tested above), without the interpreter's cost
        h = torch.full((s.numel(), Fh), float("nan"))
        y = torch.full((T * K, D), float("nan"))
        moe_grouped_mlp_triton(x, s, b, w1, w3, None, w2, w, h, y, top_k=K, act=0, block_m=block_m, interpret=True,
                               configs=configs)  # fmt: skip
        ref = _loop_same_dtype(x.double(), ids, w.double(), w1.double(), w3.double(), w2.double(), None, "swiglu")
        assert _err(y.view(T, K, D), ref) <= 1e-5, (configs, _err(y.view(T, K, D), ref))

    seen = _table_configs()
    assert any(gu.block_m == 128 and gu.block_n >= 128 and dn.block_n >= 128 for _, _, gu, dn in seen)
    for block_m, kb, gu, dn in seen:
        run(29, 2, 2, 136, 72, block_m, (gu, dn))
    gu, dn = gemm_configs(128, 256, 128, 2, True, 227 * 1024)
    assert (gu.block_m, gu.block_n, gu.num_warps, dn.block_n, dn.num_warps) == (128, 128, 8, 256, 8)
    run(150, 2, 1, 256, 128, 256, (gu, dn))


def test_tile_table_fits_each_architecture_or_refuses():
    from ditkern.kernels.moe import gemm_configs
    from ditkern.ops.moe import _triton_grouped_can_run, auto_block_m

    for kb in (99, 163, 227):
        for block_m in (16, 32, 64, 128, 256):
            for elt in (2, 4):
                cfgs = gemm_configs(block_m, 2560, 6912, elt, True, kb * 1024)
                assert not isinstance(cfgs, str), (kb, block_m, elt, cfgs)
                gu, dn = cfgs
                assert gu.smem(elt, 2) <= kb * 1024 and dn.smem(elt, 1) <= kb * 1024
                assert block_m % gu.block_m == 0 and gu.block_m == min(block_m, 128)
    reason = gemm_configs(128, 2560, 6912, 2, True, 8 * 1024)
    assert isinstance(reason, str) and "shared memory" in reason and "8 KB" in reason
    assert [auto_block_m(n, 4) for n in (8960, 1024, 300, 100, 20)] == [128, 128, 32, 16, 16]
    assert auto_block_m(4096 * 8, 64) == 128 and auto_block_m(64 * 8, 64) == 16
    assert _triton_grouped_can_run(torch.empty(4, 32), torch.empty(2, 48, 32), 64, True) is None  # interpreter


# ----------------------------------------------------------------------------------------------------------------------
# combine
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [1, 2, 8])
def test_combine_matches_reference(dtype, K, device):
    T, D = 13, 70
    y = torch.randn(T, K, D, device=device).to(dtype)
    shared = torch.randn(T, D + 6, device=device).to(dtype)[:, :D]  # a strided view
    bias = torch.randn(D, device=device).to(dtype)
    for sh, bi in ((None, None), (shared, None), (shared, bias)):
        out = moe_combine(y, sh, bi, backend="triton")
        ref = moe_combine_ref(y.double(), None if sh is None else sh.double(), None if bi is None else bi.double())
        eager = y.sum(1) + (sh if sh is not None else 0) + (bi if bi is not None else 0)
        assert _err(out, ref) <= 2 * _err(eager, ref) + FLOOR[dtype]
    assert torch.equal(moe_combine(y, shared, backend="triton"), moe_combine(y, shared, backend="triton"))


# ----------------------------------------------------------------------------------------------------------------------
# the whole chain, and errors naming the argument
# ----------------------------------------------------------------------------------------------------------------------
def test_chain_equals_hidream_moe_infer():
    """route -> align -> grouped SwiGLU -> combine == MOEFeedForwardSwiGLU in eval mode (fp32)."""
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    layer = MOEFeedForwardSwiGLU(dim=32, hidden_dim=64, num_routed_experts=4, num_activated_experts=2).eval()
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        expected = layer(x)
        xf = x.reshape(-1, 32)
        ids, w = moe_route(F.linear(xf, layer.gate.weight), 2, backend="triton")
        s, b, _ = moe_align(ids, 4, 16, backend="triton")
        stack = lambda name: torch.stack([getattr(e, name).weight for e in layer.experts])  # noqa: E731
        y = moe_grouped_swiglu(xf, s, b, stack("w1"), stack("w3"), stack("w2"), w, backend="triton")
        out = moe_combine(y, layer.shared_experts(xf), backend="triton").reshape(x.shape)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_errors_name_the_argument():
    logits = torch.randn(5, 4)
    with pytest.raises(ValueError, match="top_k=5 exceeds the number of experts E=4"):
        moe_route(logits, 5)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        moe_route(logits, 0)
    with pytest.raises(ValueError, match="score must be one of"):
        moe_route(logits, 2, score="relu")
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, num_experts=4\), got values in \[0, 4\]"):
        moe_align(torch.tensor([[0, 4]]), 4, 16)
    with pytest.raises(ValueError, match="expert_ids must lie in"):
        moe_align(torch.tensor([[-1, 2]]), 4, 16)
    with pytest.raises(TypeError, match="expert_ids must be one of"):
        moe_align(torch.tensor([[0.0, 1.0]]), 4, 16)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        moe_align(torch.tensor([[0, 1]]), 4, 24)
    x = torch.randn(5, 32)
    ids = torch.randint(0, 4, (5, 2), dtype=torch.int32)
    s, b, _ = moe_align(ids, 4, 16)
    w1, w3, w2, _ = _experts(4, 32, 48, torch.float32, "cpu")
    w = torch.rand(5, 2)
    with pytest.raises(ValueError, match=r"w2 must be \[E, D, F\] = \(4, 32, 48\)"):
        moe_grouped_swiglu(x, s, b, w1, w3, w2.transpose(1, 2), w)
    with pytest.raises(ValueError, match="w3 must have w1's shape"):
        moe_grouped_swiglu(x, s, b, w1, w3[:, :40], w2, w)
    with pytest.raises(ValueError, match=r"w1 must be \[E, F, D\] with D=30 \(x.shape\[1\]\)"):
        moe_grouped_swiglu(x[:, :30], s, b, w1, w3, w2, w)
    with pytest.raises(TypeError, match="w1 must be one of torch.float16"):
        moe_grouped_swiglu(x.half(), s, b, w1, w3, w2, w)
    with pytest.raises(ValueError, match=r"weights must be \[T, top_k\] = \(5, 2\)"):
        moe_grouped_swiglu(x, s, b, w1, w3, w2, w[:4])
    with pytest.raises(ValueError, match="block_expert holds expert ids outside"):
        moe_grouped_swiglu(x, s, b, w1[:1], w3[:1], w2[:1], w)
    with pytest.raises(ValueError, match=r"shared must be \[T, D\]"):
        moe_combine(torch.randn(5, 2, 8), torch.randn(4, 8))


# ----------------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_align_does_not_synchronise(backend):
    ids = torch.randint(0, 64, (4096, 8), device="cuda", dtype=torch.int32)
    moe_align(ids, 64, 64, backend=backend)  # warm up (compile, autotune)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = moe_align(ids, 64, 64, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check_layout(ids, 64, 64, *out)


@pytest.mark.gpu
def test_gpu_full_layer_does_not_synchronise():
    T, E, K, D, Fh = 300, 8, 2, 256, 512
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    router = torch.randn(E, D, device="cuda", dtype=torch.bfloat16) / 16
    w1, w3, w2, _ = _experts(E, D, Fh, torch.bfloat16, "cuda")

    def layer():
        ids, w = moe_route(F.linear(x, router), K)
        s, b, _ = moe_align(ids, E, 64)
        return moe_combine(moe_grouped_swiglu(x, s, b, w1, w3, w2, w))

    layer()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ids, w = moe_route_ref(F.linear(x, router), K)
    s, b, _ = moe_align_ref(ids, E, 64)
    ref = moe_combine_ref(moe_grouped_mlp_ref(x.float(), s, b, w1.float(), w3.float(), w2.float(), w, top_k=K))
    eager = _loop_same_dtype(x, ids, w, w1, w3, w2, None, "swiglu").sum(1)
    assert _err(out, ref) <= 2 * _err(eager, ref) + FLOOR[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_grouped_swiglu_hidream_width(dtype):
    T, E, K, D, Fh = 513, 4, 2, 2560, 1024  # HiDream width, a narrower expert to keep the test short
    x = torch.randn(T, D, device="cuda").to(dtype)
    ids = _routing(T, E, K, "random", "cuda")
    w = torch.rand(T, K, device="cuda")
    w1, w3, w2, _ = _experts(E, D, Fh, dtype, "cuda")
    s, b, _ = moe_align(ids, E, 64)
    y = moe_grouped_swiglu(x, s, b, w1, w3, w2, w)
    ref = moe_grouped_mlp_ref(x.float(), s, b, w1.float(), w3.float(), w2.float(), w, top_k=K)
    eager = _loop_same_dtype(x, ids, w, w1, w3, w2, None, "swiglu")
    assert _err(y, ref) <= 2 * _err(eager, ref) + FLOOR[dtype]


# ----------------------------------------------------------------------------------------------------------------------
# the CUDA moe_align: compiled here, error paths testable without a GPU
# ----------------------------------------------------------------------------------------------------------------------
def _nvcc():
    import shutil

    return shutil.which("nvcc") is not None


@pytest.mark.skipif(not _nvcc(), reason="nvcc not on PATH: the package installs without the extension")
def test_cuda_align_binding_validates_and_reports_cuda_errors():
    from ditkern._ext import ext

    assert hasattr(ext(), "moe_align")
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        ext().moe_align(0, 0, 10, 4, 24, 0, 0, 0, 96, 4, 0, 0)
    with pytest.raises(ValueError, match="num_experts must be positive"):
        ext().moe_align(0, 0, 10, 0, 16, 0, 0, 0, 64, 4, 0, 0)
    with pytest.raises(ValueError, match="max_rows must equal max_blocks"):
        ext().moe_align(0, 0, 10, 4, 16, 0, 0, 0, 63, 4, 0, 0)
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match=r"ditkern\._C\.moe_align: CUDA error \d+"):
            ext().moe_align(0, 0, 10, 4, 16, 0, 0, 0, 64, 4, 0, 0)


def test_cuda_backend_says_why_it_cannot_run_on_cpu():
    from ditkern._backend import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="backend 'cuda' was requested but cannot run"):
        moe_align(torch.tensor([[0, 1]], dtype=torch.int32), 4, 16, backend="cuda")
    with pytest.raises(BackendUnavailable, match="no CUDA kernel for this op"):
        moe_combine(torch.randn(2, 2, 8), backend="cuda")
