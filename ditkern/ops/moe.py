"""Sparse mixture-of-experts dispatch: route, align, grouped expert MLP, combine.

``moe_route(logits, top_k)``                 -> (ids [T, K] int32, weights [T, K] fp32)
``moe_align(ids, num_experts, block_m)``     -> (sorted_ids [R] int32, block_expert [R // block_m] int32, num_rows [1])
``moe_grouped_swiglu(x, sorted_ids, block_expert, w1, w3, w2, weights)`` -> y [T, K, D]
``moe_grouped_mlp(x, sorted_ids, block_expert, w1, w2, weights, b1=None, b2=None, activation=...)`` -> y [T, K, D]
``moe_combine(y, shared=None, bias=None)``   -> out [T, D] = sum_j y[:, j] (+ shared) (+ bias)

Semantics are those of HiDream-I1's ``MoEGate`` + ``MOEFeedForwardSwiGLU.moe_infer`` in diffusers (DeepSeek-style
top-k routing): scores = softmax(logits) (or sigmoid), held in the logits' dtype as the gate holds them; the top_k
highest scores (ties -> the lower expert id) are the experts, their scores the routing weights (divided by their sum
+ 1e-20 with ``renormalize``); each selected expert's MLP output is multiplied by its weight and summed per token.

Rows: routed row ``r = t * K + j`` is token t's j-th choice. ``moe_align`` sorts the rows by expert (stable) and pads
each expert's segment to a multiple of ``block_m`` with the sentinel ``T * K``; ``block_expert[b]`` is the expert of
rows ``[b * block_m, (b + 1) * block_m)``, -1 past the padded total ``num_rows``. Its outputs have the static size
``R = max_blocks * block_m`` with ``max_blocks = (N + min(E, N) * (block_m - 1)) // block_m`` (N = T * K rows), so no
size depends on the routing: nothing synchronises with the host and ``torch.compile(fullgraph=True)`` traces it.

Weights are indexed per expert: w1, w3 ``[E, F, D]``, w2 ``[E, D, F]`` (each nn.Linear's ``[out, in]``), b1 ``[E, F]``,
b2 ``[E, D]``; any strides (the GEMMs read through them). The GEMM tiles follow ``block_m`` (the tile height) and D / F,
from a table fitted to the device's shared memory (``ditkern.kernels.moe.gemm_configs``; the Triton backend refuses
where nothing fits); :func:`auto_block_m` picks ``block_m`` from the rows per expert.
Arithmetic is fp32 (the grouped GEMM keeps its hidden activation in x's dtype between its two GEMMs, as the model
does); outputs have x's dtype. Ids and weights are validated on CPU; on CUDA their values are not read (that would be
a host synchronisation): ids outside ``[0, E)`` then select no expert and leave their rows of y unwritten.

Gradients (``torch.library.register_autograd``; the forward stays the fused kernel, whichever backend ran it):

* ``moe_route``: d weights / d logits, recomputed through the reference's scores under ``torch.enable_grad()`` at the
  forward's own ids (a tie broken differently cannot move the gradient to another expert). Ids have none.
* ``moe_align``: no differentiable input (integer ids in, integer layout out): nothing to register.
* ``moe_grouped_mlp``: an analytic fp32 backward over the reference's rows (:func:`moe_grouped_mlp_backward_ref`) for
  x, w1, w3, w2, weights, b1, b2. It loops over experts with data-dependent row counts, like the reference, so it runs
  inside an opaque custom op (``ditkern::moe_grouped_mlp_backward``, with a fake): ``torch.compile`` traces a model
  with this backward without a graph break, and analytic because autograd is off inside a custom op. Not a reference
  path under grad: that would give up the fused, host-sync-free forward exactly when memory and time matter most;
  the backward pays the reference's per-expert loop (one host sync per expert) instead.
* ``moe_combine``: analytic (a sum): ``dy[:, j] = dout``, ``dshared = dout``, ``dbias = sum_t dout`` (fp32 sum).

Every gradient comes back in its input's dtype and shape. The references compute in fp32, and in float64 for float64
inputs (reachable through the raw custom ops with ``backend="torch"``: what the float64 gradcheck calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ditkern._backend import choose, max_shared_memory, requested_backend, triton_can_run_on, triton_interpreted
from ditkern._ext import cuda_can_run_on, ext, stream_of
from ditkern.ops.adaln_modulate import ref_vjp
from ditkern.ops.adaln_modulate import to_compute as _acc

SCORES = ("softmax", "sigmoid")
ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh")
_ACT_CODE = {"swiglu": 0, "gelu": 1, "gelu_tanh": 2}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)
DEFAULT_BLOCK_M = 64  # moe_align's default; SparseMoE / ExpertChoiceMoE pick theirs per shape (auto_block_m)


def auto_block_m(num_rows: int, num_experts: int) -> int:
    """moe_align's block (the grouped GEMMs' tile height) for ``num_rows = T * K`` routed rows over ``num_experts``:
    128-row tiles (8 warps, >= 128 x 128 outputs: ~85 FLOP per byte of shared-memory traffic, twice a 64-row tile's)
    once an expert averages >= 256 rows, so that padding each expert to a multiple of the block (half a block on
    average) wastes at most ~25% of its rows and usually far less (HiDream-I1 at 1024^2: 2240 rows per expert, 3%).
    Fewer rows per expert: 64 / 32 / 16-row tiles (4 warps), where the experts' weight reads dominate anyway.
    Depends on sizes only (static under ``torch.compile``)."""
    per_expert = num_rows / max(num_experts, 1)
    for block_m in (128, 64, 32):
        if per_expert >= 2 * block_m:
            return block_m
    return 16


def align_sizes(num_rows: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """(max_rows, max_blocks): the static output sizes of ``moe_align`` for ``num_rows = T * K`` routed rows.

    Each non-empty expert adds fewer than ``block_m`` padding rows, and at most ``min(E, N)`` experts are non-empty.
    """
    max_blocks = (num_rows + min(num_experts, num_rows) * (block_m - 1)) // block_m
    return max_blocks * block_m, max_blocks


# ----------------------------------------------------------------------------------------------------------------------
# references (fp32 internally): the semantics, the CPU path and the oracle of the tests
# ----------------------------------------------------------------------------------------------------------------------
def _scores_acc(logits: torch.Tensor, score: str, straight_through: bool = False) -> torch.Tensor:
    """softmax / sigmoid scores in the compute dtype, rounded to the logits' dtype as the gate holds them. With
    ``straight_through`` the rounding is the identity for the gradient (as autograd takes the model's own cast)."""
    lf = _acc(logits)
    s = lf.softmax(-1) if score == "softmax" else torch.sigmoid(lf)
    r = s.to(logits.dtype).to(s.dtype)
    return s + (r - s).detach() if straight_through else r


def moe_route_ref(logits: torch.Tensor, top_k: int, *, renormalize: bool = False, score: str = "softmax"):
    """Top-k experts and weights of each row of ``logits`` [T, E]; see the module docstring."""
    s = _scores_acc(logits, score)  # the gate's scores live in the logits' dtype
    # a stable descending sort keeps the lower expert id first among equal scores (torch.topk leaves ties unspecified)
    vals, idx = torch.sort(s, dim=-1, descending=True, stable=True)
    w, ids = vals[:, :top_k], idx[:, :top_k]
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids.to(torch.int32), w.contiguous()


def moe_align_ref(expert_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sorted rows, block experts and padded row count with static shapes only (it compiles with fullgraph=True)."""
    ids = expert_ids.reshape(-1).long()
    N = ids.numel()
    max_rows, max_blocks = align_sizes(N, num_experts, block_m)
    dev = ids.device
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev)
    valid = (ids >= 0) & (ids < num_experts)
    key = torch.where(valid, ids, num_experts)  # out-of-range ids: a bin of their own, never placed
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    seg_end = padded.cumsum(0)
    seg_start = seg_end - padded
    order = torch.sort(key, stable=True).indices  # rows grouped by expert, in input order within one
    sorted_key = key[order]
    first = torch.cumsum(torch.cat([counts.new_zeros(1), counts]), 0)  # start of each expert in `order`
    kk = sorted_key.clamp(max=num_experts - 1) if num_experts > 0 else sorted_key
    rank = torch.arange(N, device=dev) - first[kk]
    pos = torch.where(sorted_key < num_experts, seg_start[kk] + rank, max_rows)  # invalid rows -> dropped slot
    sorted_ids = torch.full((max_rows + 1,), N, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, pos, order.to(torch.int32))
    total = padded.sum()
    blk = torch.arange(max_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(seg_end, blk, right=True).to(torch.int32)
    block_expert = torch.where(blk < total, block_expert, -1).to(torch.int32)
    return sorted_ids[:max_rows], block_expert, total.reshape(1).to(torch.int32)


def _row_experts(sorted_ids, block_expert, n_rows: int) -> torch.Tensor:
    """Expert of every routed row ``[N]`` (-1 where a row was dropped), from the aligned layout."""
    block_m = sorted_ids.numel() // max(block_expert.numel(), 1)
    pos_expert = block_expert.long().repeat_interleave(block_m) if block_m else block_expert.long()
    row_expert = torch.full((n_rows + 1,), -1, dtype=torch.long, device=sorted_ids.device)
    row_expert.scatter_(0, sorted_ids.long().clamp(max=n_rows), pos_expert)
    row_expert[n_rows] = -1
    return row_expert[:n_rows]


def _act_ref(a, b, activation):
    if activation == "swiglu":
        return F.silu(a) * b
    if activation == "gelu":
        return F.gelu(a)
    return F.gelu(a, approximate="tanh")


def _grouped_mlp_acc(x, sorted_ids, block_expert, w1, w3, w2, weights, top_k, b1, activation, b2) -> torch.Tensor:
    """The routed rows' outputs [T * K, D] in the compute dtype, not rounded (the forward and the backward share it)."""
    T, D = x.shape
    N = T * top_k
    row_expert = _row_experts(sorted_ids, block_expert, N)
    xf = _acc(x)
    y = torch.zeros(N, D, dtype=xf.dtype, device=x.device)
    for e in range(w1.shape[0]):
        rows = (row_expert == e).nonzero().flatten()
        if rows.numel() == 0:
            continue
        xe = xf[rows // top_k]
        a = xe @ _acc(w1[e]).t()
        if b1 is not None:
            a = a + _acc(b1[e])
        h = _act_ref(a, xe @ _acc(w3[e]).t() if w3 is not None else None, activation)
        out = h @ _acc(w2[e]).t()
        if b2 is not None:
            out = out + _acc(b2[e])
        if weights is not None:
            out = out * _acc(weights.reshape(-1)[rows])[:, None]
        y[rows] = out
    return y


def moe_grouped_mlp_ref(
    x, sorted_ids, block_expert, w1, w3, w2, weights, *, top_k, b1=None, activation="swiglu", b2=None
):
    """y [T, K, D]: ``weights[t, j] * (w2[e] @ act(w1[e] @ x_t + b1[e], w3[e] @ x_t) + b2[e])``, e = the row's
    expert."""
    T, D = x.shape
    y = _grouped_mlp_acc(x, sorted_ids, block_expert, w1, w3, w2, weights, top_k, b1, activation, b2)
    return y.to(x.dtype).reshape(T, top_k, D)


def moe_grouped_mlp_backward_ref(
    grad_y, x, sorted_ids, block_expert, w1, w3, w2, weights, b1, b2, *, top_k, activation, needs
) -> list[torch.Tensor | None]:
    """Analytic gradients of :func:`moe_grouped_mlp_ref` for ``(x, w1, w3, w2, weights, b1, b2)``, in fp32 over the
    same rows the reference visits, each returned in its input's dtype and shape (None where ``needs`` is False).

    Per expert: ``a = x W1^T + b1``, ``h = act(a, x W3^T)``, ``o = h W2^T + b2``, ``y = w o``; so ``dw = <dy, o>``,
    ``do = w dy``, ``dW2 = do^T h``, ``db2 = sum do``, ``dh = do W2``, then through the activation (aten's silu/gelu
    backward) to ``da``/``du``, ``dW1 = da^T x``, ``db1 = sum da``, ``dW3 = du^T x``, ``dx += da W1 + du W3``.
    Not autograd through the reference: it runs inside a custom op, where autograd is off.
    """
    T, D = x.shape
    N = T * top_k
    row_expert = _row_experts(sorted_ids, block_expert, N)
    xf = _acc(x)
    gy = _acc(grad_y).reshape(N, D)
    need_x, need_w1, need_w3, need_w2, need_wt, need_b1, need_b2 = (bool(n) for n in needs)

    def zeros(t, need, shape=None):
        return torch.zeros(t.shape if shape is None else shape, dtype=xf.dtype, device=x.device) if need else None

    gx, gw1, gw3, gw2, gb1, gb2 = (zeros(t, n) for t, n in ((x, need_x), (w1, need_w1), (w3, need_w3),
                                                            (w2, need_w2), (b1, need_b1), (b2, need_b2)))  # fmt: skip
    gwt = zeros(weights, need_wt, (N,))
    w_rows = None if weights is None else weights.reshape(-1)
    for e in range(w1.shape[0]):
        rows = (row_expert == e).nonzero().flatten()
        if rows.numel() == 0:
            continue
        tok = rows // top_k
        xe = xf[tok]
        a = xe @ _acc(w1[e]).t()
        if b1 is not None:
            a = a + _acc(b1[e])
        u = xe @ _acc(w3[e]).t() if w3 is not None else None
        h = _act_ref(a, u, activation)
        go = gy[rows]
        if w_rows is not None:
            if need_wt:
                o = h @ _acc(w2[e]).t()
                o = o + _acc(b2[e]) if b2 is not None else o
                gwt[rows] = (go * o).sum(-1)
            go = go * _acc(w_rows[rows])[:, None]
        if need_w2:
            gw2[e] = go.t() @ h
        if need_b2:
            gb2[e] = go.sum(0)
        if not (need_x or need_w1 or need_w3 or need_b1):
            continue
        gh = go @ _acc(w2[e])  # [n, F]
        if activation == "swiglu":
            ga, gu = torch.ops.aten.silu_backward(gh * u, a), gh * F.silu(a)
        else:
            ga, gu = torch.ops.aten.gelu_backward(gh, a, approximate="none" if activation == "gelu" else "tanh"), None
        if need_w1:
            gw1[e] = ga.t() @ xe
        if need_b1:
            gb1[e] = ga.sum(0)
        if need_w3:
            gw3[e] = gu.t() @ xe
        if need_x:
            gxe = ga @ _acc(w1[e])
            gx.index_add_(0, tok, gxe if gu is None else gxe + gu @ _acc(w3[e]))
    if gwt is not None:
        gwt = gwt.reshape(weights.shape)
    inputs = (x, w1, w3, w2, weights, b1, b2)
    return [None if g is None else g.to(t.dtype) for g, t in zip((gx, gw1, gw3, gw2, gwt, gb1, gb2), inputs)]


def moe_combine_ref(y, shared=None, bias=None):
    """out [T, D] = sum_j y[:, j] (+ shared) (+ bias) in fp32, in y's dtype."""
    out = _acc(y).sum(1)
    if shared is not None:
        out = out + _acc(shared)
    if bias is not None:
        out = out + _acc(bias)
    return out.to(y.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# validation: errors naming the argument
# ----------------------------------------------------------------------------------------------------------------------
def _tensor(name, t, dims=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {', '.join(str(d) for d in dtypes)}, got {t.dtype}")


def _same_device(ref_name, ref, **others):
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_route(logits, top_k, renormalize, score):
    _tensor("logits", logits, (2,), _FLOATS)
    _positive_int("top_k", top_k)
    E = logits.shape[1]
    if top_k > E:
        raise ValueError(f"top_k={top_k} exceeds the number of experts E={E} (logits.shape[1])")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be True or False, got {renormalize!r}")


def _check_align(expert_ids, num_experts, block_m):
    _tensor("expert_ids", expert_ids, None, _INTS)
    _positive_int("num_experts", num_experts)
    _positive_int("block_m", block_m)
    if block_m & (block_m - 1) or block_m < 16:
        raise ValueError(f"block_m must be a power of two >= 16 (a GEMM tile height), got {block_m}")
    if expert_ids.numel() >= 2**31 - 1:
        raise ValueError(f"expert_ids has {expert_ids.numel()} entries; int32 row indices allow at most 2^31 - 2")
    if expert_ids.device.type == "cpu" and expert_ids.numel() and not _compiling():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_ids must lie in [0, num_experts={num_experts}), got values in [{lo}, {hi}]")


def _check_grouped(x, sorted_ids, block_expert, w1, w3, w2, weights, top_k, b1, activation, b2=None):
    _tensor("x", x, (2,), _FLOATS)
    _tensor("sorted_ids", sorted_ids, (1,), (torch.int32,))
    _tensor("block_expert", block_expert, (1,), (torch.int32,))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    T, D = x.shape
    _tensor("w1", w1, (3,), (x.dtype,))
    E, Fh, D1 = w1.shape
    if D1 != D:
        raise ValueError(f"w1 must be [E, F, D] with D={D} (x.shape[1]), got {tuple(w1.shape)}")
    if activation == "swiglu":
        if w3 is None:
            raise ValueError("w3 must be given for activation='swiglu' (the up projection)")
        _tensor("w3", w3, (3,), (x.dtype,))
        if w3.shape != w1.shape:
            raise ValueError(f"w3 must have w1's shape {tuple(w1.shape)} [E, F, D], got {tuple(w3.shape)}")
    elif w3 is not None:
        raise ValueError(f"w3 must be None for activation={activation!r}")
    _tensor("w2", w2, (3,), (x.dtype,))
    if tuple(w2.shape) != (E, D, Fh):
        raise ValueError(f"w2 must be [E, D, F] = {(E, D, Fh)} (from w1 and x), got {tuple(w2.shape)}")
    if b1 is not None:
        _tensor("b1", b1, (2,), _FLOATS)
        if tuple(b1.shape) != (E, Fh):
            raise ValueError(f"b1 must be [E, F] = {(E, Fh)}, got {tuple(b1.shape)}")
    if b2 is not None:
        _tensor("b2", b2, (2,), _FLOATS)
        if tuple(b2.shape) != (E, D):
            raise ValueError(f"b2 must be [E, D] = {(E, D)}, got {tuple(b2.shape)}")
    if weights is not None:
        _tensor("weights", weights, (2,), _FLOATS)
        if tuple(weights.shape) != (T, top_k):
            raise ValueError(f"weights must be [T, top_k] = {(T, top_k)}, got {tuple(weights.shape)}")
    n_blocks = block_expert.numel()
    if n_blocks == 0 and sorted_ids.numel() == 0:
        return
    if n_blocks == 0 or sorted_ids.numel() % n_blocks:
        raise ValueError(
            f"sorted_ids ({sorted_ids.numel()}) must be block_expert ({n_blocks}) blocks of block_m rows: "
            "pass moe_align's outputs"
        )
    block_m = sorted_ids.numel() // n_blocks
    if block_m & (block_m - 1) or block_m < 16:
        raise ValueError(f"sorted_ids / block_expert imply block_m={block_m}, not a power of two >= 16")
    _same_device(
        "x", x, sorted_ids=sorted_ids, block_expert=block_expert, w1=w1, w3=w3, w2=w2, weights=weights, b1=b1, b2=b2
    )
    if x.device.type == "cpu" and not _compiling() and block_expert.numel():
        if int(block_expert.max()) >= E or int(block_expert.min()) < -1:
            raise ValueError(f"block_expert holds expert ids outside [-1, E={E}) (E from w1.shape[0])")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------------------------------
def _cuda_align_can_run(ids, *others) -> str | None:
    reason = cuda_can_run_on(ids)
    if reason:
        return reason
    if not hasattr(ext(), "moe_align"):
        return "ditkern._C was built without moe_align (rebuild the extension)"
    return None


def _no_cuda(*tensors) -> str | None:
    return "no CUDA kernel for this op: the Triton kernel is the fast path"


def _triton_can_run(t, *others) -> str | None:
    return triton_can_run_on(t)


def _triton_grouped_can_run(x, w1=None, block_m=None, swiglu=True) -> str | None:
    """The device check, then (with the GEMM's sizes) whether a tile config fits this device's shared memory."""
    reason = triton_can_run_on(x)
    if reason or w1 is None:
        return reason
    from ditkern.kernels.moe import gemm_configs  # noqa: PLC0415

    cfg = gemm_configs(block_m, x.shape[1], w1.shape[1], x.element_size(), swiglu, max_shared_memory(x.device),
                       triton_interpreted())  # fmt: skip
    return cfg if isinstance(cfg, str) else None


def _torch_can_run(*tensors) -> str | None:
    return None


ALIGN_BACKENDS = {"cuda": _cuda_align_can_run, "triton": _triton_can_run, "torch": _torch_can_run}
BACKENDS = {"cuda": _no_cuda, "triton": _triton_can_run, "torch": _torch_can_run}
GROUPED_BACKENDS = {"cuda": _no_cuda, "triton": _triton_grouped_can_run, "torch": _torch_can_run}
OP_NAMES = "moe_route / moe_grouped_swiglu / moe_combine"


def info_sample(device, dtype):
    """Sample inputs for ``python -m ditkern info`` (HiDream-Full width, 4 experts)."""
    return (torch.empty(16, 2560, device=device, dtype=dtype),)


# ----------------------------------------------------------------------------------------------------------------------
# custom ops (torch.compile traces through them; the backend choice happens inside, out of the graph)
# ----------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("ditkern::moe_route", mutates_args=())
def _moe_route_op(
    logits: torch.Tensor, top_k: int, renormalize: bool, score: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    name = choose("moe_route", BACKENDS, logits, backend=backend)
    if name == "torch" or logits.shape[0] == 0:
        return moe_route_ref(logits, top_k, renormalize=renormalize, score=score)
    from ditkern.kernels.moe import moe_route_triton  # noqa: PLC0415

    T = logits.shape[0]
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    moe_route_triton(logits, ids, weights, top_k, score == "sigmoid", renormalize)
    return ids, weights


@_moe_route_op.register_fake
def _(logits, top_k, renormalize, score, backend):
    T = logits.shape[0]
    return (
        logits.new_empty((T, top_k), dtype=torch.int32),
        logits.new_empty((T, top_k), dtype=torch.promote_types(logits.dtype, torch.float32)),
    )


@torch.library.custom_op("ditkern::moe_align", mutates_args=())
def _moe_align_op(
    expert_ids: torch.Tensor, num_experts: int, block_m: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = expert_ids.reshape(-1)
    N = ids.numel()
    name = choose("moe_align", ALIGN_BACKENDS, ids, backend=backend)
    if name == "torch" or N == 0:
        return moe_align_ref(ids, num_experts, block_m)
    max_rows, max_blocks = align_sizes(N, num_experts, block_m)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=ids.device)
    num_rows = torch.empty(1, dtype=torch.int32, device=ids.device)
    ids = ids.contiguous()
    if name == "triton":
        from ditkern.kernels.moe import moe_align_triton  # noqa: PLC0415

        moe_align_triton(ids, sorted_ids, block_expert, num_rows, num_experts, block_m)
    else:
        dev = ids.device.index if ids.device.index is not None else torch.cuda.current_device()
        ext().moe_align(
            ids.data_ptr(), int(ids.dtype == torch.int64), N, num_experts, block_m, sorted_ids.data_ptr(),
            block_expert.data_ptr(), num_rows.data_ptr(), max_rows, max_blocks, stream_of(ids), dev,
        )  # fmt: skip
    return sorted_ids, block_expert, num_rows


@_moe_align_op.register_fake
def _(expert_ids, num_experts, block_m, backend):
    max_rows, max_blocks = align_sizes(expert_ids.numel(), num_experts, block_m)
    return (
        expert_ids.new_empty((max_rows,), dtype=torch.int32),
        expert_ids.new_empty((max_blocks,), dtype=torch.int32),
        expert_ids.new_empty((1,), dtype=torch.int32),
    )


@torch.library.custom_op("ditkern::moe_grouped_mlp", mutates_args=())
def _moe_grouped_mlp_op(
    x: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    weights: torch.Tensor | None,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    top_k: int,
    activation: str,
    backend: str,
) -> torch.Tensor:
    T, D = x.shape
    block_m = sorted_ids.numel() // max(block_expert.numel(), 1)  # the GEMM tile height follows moe_align's block
    name = choose("moe_grouped_swiglu", GROUPED_BACKENDS, x, w1, block_m, w3 is not None, backend=backend)
    if name == "torch" or T == 0 or block_expert.numel() == 0:
        return moe_grouped_mlp_ref(
            x, sorted_ids, block_expert, w1, w3, w2, weights, top_k=top_k, b1=b1, activation=activation, b2=b2
        )
    from ditkern.kernels.moe import moe_grouped_mlp_triton  # noqa: PLC0415

    h = torch.empty(sorted_ids.numel(), w1.shape[1], dtype=x.dtype, device=x.device)
    y = torch.empty(T, top_k, D, dtype=x.dtype, device=x.device)
    moe_grouped_mlp_triton(
        x, sorted_ids, block_expert, w1, w3, b1, w2, weights, h, y.view(T * top_k, D),
        top_k=top_k, act=_ACT_CODE[activation], block_m=block_m, interpret=triton_interpreted(), b2=b2,
        smem_limit=max_shared_memory(x.device),
    )  # fmt: skip
    return y


@_moe_grouped_mlp_op.register_fake
def _(x, sorted_ids, block_expert, w1, w3, w2, weights, b1, b2, top_k, activation, backend):
    return x.new_empty((x.shape[0], top_k, x.shape[1]))


@torch.library.custom_op("ditkern::moe_combine", mutates_args=())
def _moe_combine_op(
    y: torch.Tensor, shared: torch.Tensor | None, bias: torch.Tensor | None, backend: str
) -> torch.Tensor:
    name = choose("moe_combine", BACKENDS, y, backend=backend)
    if name == "torch" or y.shape[0] == 0 or y.shape[2] == 0:
        return moe_combine_ref(y, shared, bias)
    from ditkern.kernels.moe import moe_combine_triton  # noqa: PLC0415

    T, K, D = y.shape
    out = torch.empty(T, D, dtype=y.dtype, device=y.device)
    y = y if y.stride(2) == 1 else y.contiguous()
    shared = shared if shared is None or shared.stride(1) == 1 else shared.contiguous()
    moe_combine_triton(y, shared, bias.contiguous() if bias is not None else None, out)
    return out


@_moe_combine_op.register_fake
def _(y, shared, bias, backend):
    return y.new_empty((y.shape[0], y.shape[2]))


# ----------------------------------------------------------------------------------------------------------------------
# gradients (see the module docstring for the choice per op)
# ----------------------------------------------------------------------------------------------------------------------
def _route_setup(ctx, inputs, output):
    logits, _top_k, renormalize, score, _backend = inputs
    ctx.save_for_backward(logits, output[0])
    ctx.renormalize, ctx.score = renormalize, score


def _route_backward(ctx, grad_ids, grad_weights):
    logits, ids = ctx.saved_tensors

    def fn(logits):
        w = _scores_acc(logits, ctx.score, straight_through=True).gather(-1, ids.long())
        return [w / (w.sum(-1, keepdim=True) + 1e-20) if ctx.renormalize else w]

    (grad_logits,) = ref_vjp(fn, (logits,), ctx.needs_input_grad[:1], [grad_weights])
    return grad_logits, None, None, None, None


torch.library.register_autograd("ditkern::moe_route", _route_backward, setup_context=_route_setup)

# differentiable inputs of ditkern::moe_grouped_mlp, by position in its schema
_GROUPED_DIFF = {"x": 0, "w1": 3, "w3": 4, "w2": 5, "weights": 6, "b1": 7, "b2": 8}


@torch.library.custom_op("ditkern::moe_grouped_mlp_backward", mutates_args=())
def _moe_grouped_mlp_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    weights: torch.Tensor | None,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    top_k: int,
    activation: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Gradients for (x, w1, w3, w2, weights, b1, b2) (:func:`moe_grouped_mlp_backward_ref`); an empty tensor where
    ``needs`` is False or the input is None."""
    grads = moe_grouped_mlp_backward_ref(
        grad_y, x, sorted_ids, block_expert, w1, w3, w2, weights, b1, b2, top_k=top_k, activation=activation,
        needs=needs,
    )  # fmt: skip
    return [x.new_empty(0) if g is None else g for g in grads]


@_moe_grouped_mlp_backward_op.register_fake
def _(grad_y, x, sorted_ids, block_expert, w1, w3, w2, weights, b1, b2, top_k, activation, needs):
    inputs = (x, w1, w3, w2, weights, b1, b2)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else x.new_empty(0)
            for t, need in zip(inputs, needs)]  # fmt: skip


def _grouped_setup(ctx, inputs, output):
    x, sorted_ids, block_expert, w1, w3, w2, weights, b1, b2, top_k, activation, _backend = inputs
    ctx.save_for_backward(x, sorted_ids, block_expert, w1, w3, w2, weights, b1, b2)
    ctx.top_k, ctx.activation = top_k, activation


def _grouped_backward(ctx, grad_y):
    x, sorted_ids, block_expert, w1, w3, w2, weights, b1, b2 = ctx.saved_tensors
    inputs = (x, w1, w3, w2, weights, b1, b2)
    needs = [bool(ctx.needs_input_grad[i]) and t is not None for i, t in zip(_GROUPED_DIFF.values(), inputs)]
    grads = [None] * 12
    if not any(needs):
        return tuple(grads)
    got = _moe_grouped_mlp_backward_op(
        grad_y, x, sorted_ids, block_expert, w1, w3, w2, weights, b1, b2, ctx.top_k, ctx.activation, needs
    )
    for i, need, g in zip(_GROUPED_DIFF.values(), needs, got):
        grads[i] = g if need else None
    return tuple(grads)


torch.library.register_autograd("ditkern::moe_grouped_mlp", _grouped_backward, setup_context=_grouped_setup)


def _combine_setup(ctx, inputs, output):
    y, shared, bias, _backend = inputs
    ctx.y_shape, ctx.y_dtype = y.shape, y.dtype
    ctx.shared_dtype = None if shared is None else shared.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _combine_backward(ctx, grad_out):
    need_y, need_shared, need_bias = ctx.needs_input_grad[:3]
    grad_y = grad_out.to(ctx.y_dtype)[:, None, :].expand(ctx.y_shape) if need_y else None
    grad_shared = grad_out.to(ctx.shared_dtype) if need_shared else None
    grad_bias = _acc(grad_out).sum(0).to(ctx.bias_dtype) if need_bias else None
    return grad_y, grad_shared, grad_bias, None


torch.library.register_autograd("ditkern::moe_combine", _combine_backward, setup_context=_combine_setup)


# ----------------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------------
def moe_route(
    logits: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = False,
    score: str = "softmax",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of ``logits`` [T, E] -> (ids [T, top_k] int32, weights [T, top_k] fp32), in descending score.

    ``score``: "softmax" (HiDream, DeepSeek-V2) or "sigmoid" (DeepSeek-V3); ``renormalize`` divides the selected
    weights by their sum (+ 1e-20), HiDream's ``norm_topk_prob`` (off in HiDream-I1).
    """
    _check_route(logits, top_k, renormalize, score)
    return _moe_route_op(logits, top_k, renormalize, score, requested_backend(backend))


def moe_align(
    expert_ids: torch.Tensor, num_experts: int, block_m: int = DEFAULT_BLOCK_M, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sorted by expert and padded per expert to ``block_m`` -> (sorted_ids, block_expert, num_rows).

    ``expert_ids``: [T, K] (or flat) int32/int64 from :func:`moe_route`. Output sizes depend only on
    ``(T * K, num_experts, block_m)`` (see :func:`align_sizes`); computed on the device without host synchronisation.
    """
    _check_align(expert_ids, num_experts, block_m)
    return _moe_align_op(expert_ids, num_experts, block_m, requested_backend(backend))


def moe_grouped_swiglu(
    x: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    top_k: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``y[t, j] = weights[t, j] * w2[e] @ (silu(w1[e] @ x_t) * (w3[e] @ x_t))`` for each routed row -> [T, K, D].

    x [T, D] is gathered by ``sorted_ids // K`` inside the GEMM (no permuted copy). ``weights`` [T, K] (None: 1, then
    pass ``top_k``). w1, w3 [E, F, D], w2 [E, D, F] in x's dtype.
    """
    return moe_grouped_mlp(x, sorted_ids, block_expert, w1, w2, weights, w3=w3, top_k=top_k, activation="swiglu",
                           backend=backend)  # fmt: skip


def moe_grouped_mlp(
    x: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    w3: torch.Tensor | None = None,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    top_k: int | None = None,
    activation: str = "gelu_tanh",
    backend: str | None = None,
) -> torch.Tensor:
    """Grouped expert MLP: ``weights * (w2[e] @ act(w1[e] @ x + b1[e] [, w3[e] @ x]) + b2[e])`` -> [T, K, D].

    ``activation``: "swiglu" (needs w3), "gelu" or "gelu_tanh" (diffusers' FeedForward GELU MLPs).
    """
    if weights is not None and isinstance(weights, torch.Tensor) and weights.dim() == 2:
        top_k = weights.shape[1] if top_k is None else top_k
    if top_k is None:
        raise ValueError("top_k must be given when weights is None")
    _positive_int("top_k", top_k)
    _check_grouped(x, sorted_ids, block_expert, w1, w3, w2, weights, top_k, b1, activation, b2)
    return _moe_grouped_mlp_op(
        x, sorted_ids, block_expert, w1, w3, w2, weights, b1, b2, top_k, activation, requested_backend(backend)
    )


def moe_combine(
    y: torch.Tensor,
    shared: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j y[t, j] (+ shared[t]) (+ bias)`` -> [T, D] in y's dtype; fp32 sum in a fixed order.

    y [T, K, D] from :func:`moe_grouped_swiglu` (weights already applied); shared [T, D] (the shared expert's
    output); bias [D].
    """
    _tensor("y", y, (3,), _FLOATS)
    T, K, D = y.shape
    if shared is not None:
        _tensor("shared", shared, (2,), _FLOATS)
        if tuple(shared.shape) != (T, D):
            raise ValueError(f"shared must be [T, D] = {(T, D)} (from y), got {tuple(shared.shape)}")
    if bias is not None:
        _tensor("bias", bias, (1,), _FLOATS)
        if bias.shape[0] != D:
            raise ValueError(f"bias must be [D] with D={D}, got {tuple(bias.shape)}")
    _same_device("y", y, shared=shared, bias=bias)
    return _moe_combine_op(y, shared, bias, requested_backend(backend))


def expert_choice_align(num_experts: int, rows_per_expert: int, block_m: int = DEFAULT_BLOCK_M, device=None):
    """``(sorted_ids [R], block_expert [R // block_m])`` for expert-choice routing, where every expert takes exactly
    ``rows_per_expert`` rows and routed row ``r = e * rows_per_expert + i`` belongs to expert ``e``: each expert's
    segment padded to a multiple of ``block_m`` with the sentinel ``N = num_experts * rows_per_expert``, the layout
    :func:`moe_grouped_mlp` takes with ``top_k=1``. It depends on sizes only (no routing values): built from
    ``arange`` on the device, no host synchronisation, traceable by ``torch.compile(fullgraph=True)``."""
    _positive_int("num_experts", num_experts)
    _positive_int("rows_per_expert", rows_per_expert)
    _positive_int("block_m", block_m)
    blocks = -(-rows_per_expert // block_m)  # per expert
    padded = blocks * block_m
    i = torch.arange(num_experts * padded, device=device)
    e, k = i // padded, i % padded
    sentinel = num_experts * rows_per_expert
    sorted_ids = torch.where(k < rows_per_expert, e * rows_per_expert + k, sentinel).to(torch.int32)
    block_expert = (torch.arange(num_experts * blocks, device=device) // blocks).to(torch.int32)
    return sorted_ids, block_expert


def flops_per_token(dim: int, hidden: int, top_k: int, activation: str = "swiglu") -> int:
    """Multiply-add FLOPs (x2) of the routed experts for one token (for the benchmarks)."""
    mats = 3 if activation == "swiglu" else 2
    return 2 * mats * dim * hidden * top_k

