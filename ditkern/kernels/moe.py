"""Triton kernels for sparse mixture-of-experts dispatch: route, align, grouped expert MLP, combine.

The layer (HiDream-I1's MOEFeedForwardSwiGLU, DeepSeek-style top-k routing; Switch-DiT arXiv 2403.09176) computes
for each token t with experts E_j = top_k(score(router(x_t))) and routing weights g_j:

    out_t = sum_j g_j * w2[E_j] @ act(w1[E_j] @ x_t, w3[E_j] @ x_t) + shared(x_t)

Kernels, all launched on static grids (sizes known from shapes alone, never from expert counts, so there is no host
synchronisation and the whole layer traces under ``torch.compile(fullgraph=True)``):

* ``_moe_route_fwd_kernel``      logits [T, E] -> top-k ids [T, K] int32, weights [T, K] fp32 (softmax or sigmoid
                                 scores, rounded to the logits' dtype as the model's own gate does; ties -> lower id).
* ``_moe_align_fwd_kernel``      ids [T*K] -> rows sorted by expert (stable), each expert's segment padded to a
                                 multiple of BLOCK_M with the sentinel T*K, and the expert of every BLOCK_M row block
                                 (-1 past the end). Grid (E,): program e counts every expert (to know where its
                                 segment starts) and compacts its own rows in order with a cumulative sum.
* ``_moe_gate_up_fwd_kernel``    H[r] = act(x[tok(r)] @ w1[e]^T (+ b1[e]), x[tok(r)] @ w3[e]^T) for every sorted row r
                                 of a block of expert e, gathering x rows by ``sorted_ids // K`` inside the GEMM (no
                                 permuted copy of x). act = silu(a) * b (SwiGLU) or gelu(a) (GELU MLP experts).
* ``_moe_down_fwd_kernel``       Y[row] = g[row] * (H[r] @ w2[e]^T (+ b2[e])), stored at the row's own (token, slot)
                                 position, so the combine needs no scatter.
* ``_moe_combine_fwd_kernel``    out[t] = sum_j Y[t, j] (+ shared[t]) (+ bias): deterministic, fp32 accumulation.

Layouts: x [T, D]; w1, w3 [E, F, D] and w2 [E, D, F] (nn.Linear's [out, in] per expert, stacked); H [R_pad, F] in
sorted (padded) order; Y [T, K, D]. Any strides (the GEMMs read through strides).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _moe_route_fwd_kernel(
    LOGITS,
    IDS,
    WEIGHTS,
    T,
    E,
    stride_lt,
    stride_le,
    TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_t = tl.program_id(0)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_e = tl.arange(0, BLOCK_E)
    o_k = tl.arange(0, BLOCK_K)
    m_t = o_t < T
    m_e = o_e < E
    p_l = LOGITS + o_t[:, None].to(tl.int64) * stride_lt + o_e[None, :] * stride_le
    b_l = tl.load(p_l, mask=m_t[:, None] & m_e[None, :], other=float("-inf")).to(tl.float32)  # [BLOCK_T, BLOCK_E]
    b_l = tl.where(m_t[:, None], b_l, 0.0)  # rows past T: finite garbage instead of NaN (never stored)
    if SIGMOID:
        b_s = 1.0 / (1.0 + tl.exp(-b_l))
    else:
        b_max = tl.max(b_l, axis=1)
        b_p = tl.exp(b_l - b_max[:, None])
        b_s = b_p / tl.sum(b_p, axis=1)[:, None]
    # the model's gate holds its scores in the logits' dtype: select and weight with those rounded values
    b_s = b_s.to(LOGITS.dtype.element_ty).to(tl.float32)
    b_s = tl.where(m_e[None, :], b_s, -1.0)  # padding experts can never be selected (scores are >= 0)

    b_ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    b_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        # ties go to the lower expert id, as the reference's stable sort does (two plain reductions: cheaper than an
        # index-carrying max, which also compiled to a ~1 MB cubin at 64 experts)
        b_v = tl.max(b_s, axis=1)
        b_i = tl.min(tl.where(b_s == b_v[:, None], o_e[None, :], BLOCK_E), axis=1)
        b_ids = tl.where(o_k[None, :] == j, b_i[:, None], b_ids)
        b_w = tl.where(o_k[None, :] == j, b_v[:, None], b_w)
        b_s = tl.where(o_e[None, :] == b_i[:, None], -2.0, b_s)
    if RENORMALIZE:
        b_w = b_w / (tl.sum(b_w, axis=1)[:, None] + 1e-20)
    m_out = m_t[:, None] & (o_k[None, :] < TOP_K)
    o_out = o_t[:, None].to(tl.int64) * TOP_K + o_k[None, :]
    tl.store(IDS + o_out, b_ids, mask=m_out)
    tl.store(WEIGHTS + o_out, b_w, mask=m_out)


def moe_route_triton(logits, ids, weights, top_k: int, sigmoid: bool, renormalize: bool) -> None:
    T, E = logits.shape
    block_e = max(triton.next_power_of_2(E), 2)
    # ~1k scores per program (8 per thread at 4 warps): the K selection passes unroll over each thread's scores, so
    # larger tiles grow the code (64 x 64 compiled to 0.6 MB of cubin) without adding parallelism that T lacks
    block_t = max(1, min(64, 1024 // block_e, triton.next_power_of_2(max(T, 1))))
    grid = (triton.cdiv(T, block_t),)
    _moe_route_fwd_kernel[grid](
        logits, ids, weights, T, E, logits.stride(0), logits.stride(1),
        TOP_K=top_k, SIGMOID=sigmoid, RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=max(triton.next_power_of_2(top_k), 2),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# align
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _moe_align_fwd_kernel(
    IDS,
    SORTED,
    BLOCK_EXPERT,
    NUM_POST_PAD,
    N,
    E,
    MAX_ROWS,
    MAX_BLOCKS,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_e = tl.program_id(0)
    o_e = tl.arange(0, BLOCK_E)
    o_n = tl.arange(0, BLOCK_N)

    # 1. rows per expert (every program counts all experts: it needs the padded sizes of those before it)
    b_cnt = tl.zeros([BLOCK_E], dtype=tl.int32)
    for i_n in range(0, tl.cdiv(N, BLOCK_N)):
        o = i_n * BLOCK_N + o_n
        b_id = tl.load(IDS + o, mask=o < N, other=-1).to(tl.int32)
        b_cnt += tl.sum((b_id[:, None] == o_e[None, :]).to(tl.int32), axis=0)
    b_pad = (b_cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    b_end = tl.cumsum(b_pad, axis=0)  # [BLOCK_E] inclusive prefix: end row of each padded segment
    seg_end = tl.sum(tl.where(o_e == i_e, b_end, 0), axis=0)
    seg_len = tl.sum(tl.where(o_e == i_e, b_pad, 0), axis=0)
    seg_cnt = tl.sum(tl.where(o_e == i_e, b_cnt, 0), axis=0)
    seg_start = seg_end - seg_len
    total = tl.sum(b_pad, axis=0)

    # 2. this expert's rows, in input order (stable): position = start + running count + rank in the chunk
    run = seg_start
    for i_n in range(0, tl.cdiv(N, BLOCK_N)):
        o = i_n * BLOCK_N + o_n
        b_id = tl.load(IDS + o, mask=o < N, other=-1).to(tl.int32)
        b_hit = (b_id == i_e).to(tl.int32)
        b_rank = tl.cumsum(b_hit, axis=0) - 1
        tl.store(SORTED + run + b_rank, o, mask=b_hit > 0)
        run += tl.sum(b_hit, axis=0)
    # padding rows of the segment -> sentinel N (the GEMMs mask them)
    o_p = seg_start + seg_cnt + tl.arange(0, BLOCK_M)
    tl.store(SORTED + o_p, N + tl.zeros([BLOCK_M], dtype=tl.int32), mask=o_p < seg_end)
    # expert id of this segment's row blocks
    for i_b in range(seg_start // BLOCK_M, seg_end // BLOCK_M):
        tl.store(BLOCK_EXPERT + i_b, i_e)

    # 3. program 0: everything past the last segment (sentinels, block expert -1) and the padded total
    if i_e == 0:
        for r in range(total, MAX_ROWS, BLOCK_N):
            o = r + o_n
            tl.store(SORTED + o, N + tl.zeros([BLOCK_N], dtype=tl.int32), mask=o < MAX_ROWS)
        for b in range(total // BLOCK_M, MAX_BLOCKS, BLOCK_N):
            o = b + o_n
            tl.store(BLOCK_EXPERT + o, tl.full([BLOCK_N], -1, tl.int32), mask=o < MAX_BLOCKS)
        tl.store(NUM_POST_PAD, total)


def moe_align_triton(ids_flat, sorted_ids, block_expert, num_post_pad, num_experts: int, block_m: int) -> None:
    N = ids_flat.numel()
    block_e = max(triton.next_power_of_2(num_experts), 2)
    block_n = max(16, min(1024, 16384 // block_e))  # the [BLOCK_N, BLOCK_E] one-hot count stays ~16k elements
    _moe_align_fwd_kernel[(num_experts,)](
        ids_flat, sorted_ids, block_expert, num_post_pad, N, num_experts, sorted_ids.numel(), block_expert.numel(),
        BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_N=block_n,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# grouped GEMMs
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh via exp (tl has no tanh on every Triton we support)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0
    return 0.5 * x * (1.0 + t)


@triton.jit
def _grouped_tile(M_BLOCKS, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column tile) of this program, GROUP_M row blocks at a time across all column tiles, so the
    gathered x rows and an expert's weight tiles are reused from L2 (the grouped ordering of Triton's matmul
    tutorial)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_tiles
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(M_BLOCKS - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _load_kn(p, m_k, m_n, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] weight tile; the masks only where the shape is not a multiple of the tile (unmasked
    loads let the pipeline issue plain 16-byte async copies)."""
    if EVEN_K and EVEN_N:
        b = tl.load(p)
    elif EVEN_K:
        b = tl.load(p, mask=m_n[None, :], other=0.0)
    elif EVEN_N:
        b = tl.load(p, mask=m_k[:, None], other=0.0)
    else:
        b = tl.load(p, mask=m_k[:, None] & m_n[None, :], other=0.0)
    return b


@triton.jit
def _load_mk(p, m_k, EVEN_K: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] activation tile. Rows need no mask: padding rows read a valid row (token 0 / their own
    scratch row of H) and are never stored (each output row depends on its own input row only)."""
    if EVEN_K:
        b = tl.load(p)
    else:
        b = tl.load(p, mask=m_k[None, :], other=0.0)
    return b


@triton.jit
def _moe_gate_up_fwd_kernel(
    X,
    W1,
    W3,
    B1,
    H,
    SORTED,
    BLOCK_EXPERT,
    M_BLOCKS,
    N_ROWS,
    D,
    F,
    stride_xt,
    stride_xd,
    stride_w1e,
    stride_w1f,
    stride_w1d,
    stride_w3e,
    stride_w3f,
    stride_w3d,
    stride_b1e,
    stride_hr,
    TOP_K: tl.constexpr,
    ACT: tl.constexpr,  # 0 swiglu: silu(w1 x) * (w3 x); 1 gelu (erf); 2 gelu tanh
    HAS_B1: tl.constexpr,
    IEEE: tl.constexpr,
    SUB_M: tl.constexpr,  # row tiles per moe_align block (its block_m = SUB_M * BLOCK_M)
    EVEN_K: tl.constexpr,  # D % BLOCK_K == 0
    EVEN_N: tl.constexpr,  # F % BLOCK_N == 0
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    i_m, i_n = _grouped_tile(M_BLOCKS, F, BLOCK_N, GROUP_M)
    e = tl.load(BLOCK_EXPERT + i_m // SUB_M)
    if e >= 0:  # blocks past the padded total hold no rows (the grid is the static upper bound)
        i_e = e.to(tl.int64)
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        o_k = tl.arange(0, BLOCK_K)
        b_row = tl.load(SORTED + o_m)
        m_m = b_row < N_ROWS
        b_tok = tl.where(m_m, b_row // TOP_K, 0).to(tl.int64)  # gather: token of each sorted row (padding: token 0)
        m_n = o_n < F
        p_x = X + b_tok[:, None] * stride_xt + o_k[None, :] * stride_xd  # [BLOCK_M, BLOCK_K]
        # [BLOCK_K, BLOCK_N] tiles of w1[e]^T and w3[e]^T, read through strides (no transposed copy)
        p_w1 = W1 + i_e * stride_w1e + o_n[None, :].to(tl.int64) * stride_w1f + o_k[:, None] * stride_w1d
        p_w3 = W3 + i_e * stride_w3e + o_n[None, :].to(tl.int64) * stride_w3f + o_k[:, None] * stride_w3d
        b_a1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        b_a3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, tl.cdiv(D, BLOCK_K)):
            m_k = o_k < D - k * BLOCK_K
            b_x = _load_mk(p_x, m_k, EVEN_K)
            b_w1 = _load_kn(p_w1, m_k, m_n, EVEN_K, EVEN_N)
            if IEEE:
                b_a1 += tl.dot(b_x, b_w1, input_precision="ieee")
            else:
                b_a1 += tl.dot(b_x, b_w1)
            if ACT == 0:
                b_w3 = _load_kn(p_w3, m_k, m_n, EVEN_K, EVEN_N)
                if IEEE:
                    b_a3 += tl.dot(b_x, b_w3, input_precision="ieee")
                else:
                    b_a3 += tl.dot(b_x, b_w3)
            p_x += BLOCK_K * stride_xd
            p_w1 += BLOCK_K * stride_w1d
            p_w3 += BLOCK_K * stride_w3d
        if HAS_B1:
            b_a1 += tl.load(B1 + i_e * stride_b1e + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        if ACT == 0:
            b_h = b_a1 / (1.0 + tl.exp(-b_a1)) * b_a3
        elif ACT == 1:
            b_h = 0.5 * b_a1 * (1.0 + tl.math.erf(b_a1 * 0.7071067811865476))
        else:
            b_h = _gelu_tanh(b_a1)
        # padding rows too (token 0's activations): the down GEMM reads whole row tiles of H, never uninitialised rows
        p_h = H + o_m[:, None].to(tl.int64) * stride_hr + o_n[None, :]
        tl.store(p_h, b_h.to(H.dtype.element_ty), mask=m_n[None, :])


@triton.jit
def _moe_down_fwd_kernel(
    H,
    W2,
    B2,
    WEIGHTS,
    Y,
    SORTED,
    BLOCK_EXPERT,
    M_BLOCKS,
    N_ROWS,
    F,
    D,
    stride_hr,
    stride_w2e,
    stride_w2d,
    stride_w2f,
    stride_b2e,
    stride_yr,
    HAS_B2: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    IEEE: tl.constexpr,
    SUB_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # F % BLOCK_K == 0
    EVEN_N: tl.constexpr,  # D % BLOCK_N == 0
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    i_m, i_n = _grouped_tile(M_BLOCKS, D, BLOCK_N, GROUP_M)
    e = tl.load(BLOCK_EXPERT + i_m // SUB_M)
    if e >= 0:
        i_e = e.to(tl.int64)
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        o_k = tl.arange(0, BLOCK_K)
        b_row = tl.load(SORTED + o_m)
        m_m = b_row < N_ROWS
        m_n = o_n < D
        # H has a row for every sorted position (padding rows: finite, from the gate_up GEMM; read and never stored)
        p_h = H + o_m[:, None].to(tl.int64) * stride_hr + o_k[None, :]  # [BLOCK_M, BLOCK_K]
        p_w2 = W2 + i_e * stride_w2e + o_n[None, :].to(tl.int64) * stride_w2d + o_k[:, None] * stride_w2f
        b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, tl.cdiv(F, BLOCK_K)):
            m_k = o_k < F - k * BLOCK_K
            b_h = _load_mk(p_h, m_k, EVEN_K)
            b_w2 = _load_kn(p_w2, m_k, m_n, EVEN_K, EVEN_N)
            if IEEE:
                b_acc += tl.dot(b_h, b_w2, input_precision="ieee")
            else:
                b_acc += tl.dot(b_h, b_w2)
            p_h += BLOCK_K
            p_w2 += BLOCK_K * stride_w2f
        if HAS_B2:  # per-expert output bias, inside the routing weight
            b_acc += tl.load(B2 + i_e * stride_b2e + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        if HAS_WEIGHTS:  # routing weight in the epilogue
            b_acc *= tl.load(WEIGHTS + b_row, mask=m_m, other=0.0).to(tl.float32)[:, None]
        # each (token, slot) row has its own output row: a permutation, not a reduction
        p_y = Y + b_row[:, None].to(tl.int64) * stride_yr + o_n[None, :]
        tl.store(p_y, b_acc.to(Y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


GROUP_M = 8  # row blocks swept together across the column tiles (L2 reuse)


@dataclass(frozen=True)
class GemmConfig:
    """Tile of one grouped GEMM: ``BLOCK_M x BLOCK_N`` outputs (gate_up: of each of w1 and w3), ``BLOCK_K`` deep."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def smem(self, elt_size: int, b_operands: int) -> int:
        """Shared memory of the software pipeline: ``num_stages`` buffers of the A tile and each B tile (what
        Triton allocates; checked against the compiled kernels with bench.static)."""
        return self.num_stages * (self.block_m + b_operands * self.block_n) * self.block_k * elt_size


# Candidates per (GEMM, tile height), best first; the first whose pipeline fits the device's shared memory is used.
# Tile height = moe_align's block_m (capped at 128; a taller block runs as block_m // 128 row tiles). Arithmetic
# intensity of one K step (bf16 operands, FLOP per byte loaded into shared memory): gate_up 2 BM BN / (BM + 2 BN)
# (two B tiles share the gathered x tile), down BM BN / (BM + BN):
#   gate_up 128 x 128: 85 FLOP/B (64 x 64: 43); down 128 x 256: 85 (128 x 128: 64; 64 x 64: 32).
# 128-row tiles: 8 warps = 2 warpgroups of 64 rows each (Hopper wgmma m64); the two fp32 accumulators of gate_up
# (2 x 128 x 128 / 256 threads = 128 registers) or down's one 128 x 256 fit below 255 registers without spills
# (bench.static). sm_90a / sm_100a (227 KB): gate_up 4 stages of 48 KB, down 3 stages of 48 KB; sm_80 (163 KB) one
# stage less; sm_89 (99 KB) halves BLOCK_K. Fewer rows per expert (auto block_m 64 / 32 / 16, see
# ops.moe.auto_block_m): 4 warps, 64 x 128 tiles.
_TABLE = {
    ("gate_up", 128): [(128, 64, 8, 4), (128, 64, 8, 3), (128, 32, 8, 4), (128, 32, 8, 3), (64, 32, 4, 3),
                       (32, 32, 4, 2)],
    ("down", 128): [(256, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 3), (128, 32, 8, 4), (64, 32, 4, 3),
                    (32, 32, 4, 2)],
    ("gate_up", 64): [(128, 64, 4, 4), (128, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 3), (32, 32, 4, 2)],
    ("down", 64): [(128, 64, 4, 4), (128, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 3), (32, 32, 4, 2)],
    ("gate_up", 32): [(128, 64, 4, 4), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
    ("down", 32): [(128, 64, 4, 4), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
    ("gate_up", 16): [(128, 64, 4, 4), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
    ("down", 16): [(128, 64, 4, 4), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
}  # fmt: skip
# the interpreter costs per program and per loop step: fewer, larger programs (and no pipeline)
_INTERPRET = {"gate_up": (128, 64, 1, 1), "down": (64, 128, 1, 1)}
_EPILOGUE_SMEM = 1024  # margin for the barriers Triton adds to a pipelined loop


def _fit(n: int, block: int) -> int:
    """A tile no wider than the problem needs (tiny D / F), at least 16 (tl.dot's minimum)."""
    return max(16, min(block, triton.next_power_of_2(n)))


@functools.lru_cache(maxsize=256)  # called by can_run and the launcher on every call: plain ints in, frozen configs out
def gemm_configs(block_m: int, D: int, F: int, elt_size: int, swiglu: bool, smem_limit: int | None,
                 interpret: bool = False) -> tuple[GemmConfig, GemmConfig] | str:  # fmt: skip
    """``(gate_up, down)`` configs for moe_align blocks of ``block_m`` rows, ``x [T, D]``, experts of hidden size
    ``F``, operands of ``elt_size`` bytes, on a device with ``smem_limit`` bytes of shared memory per block (None: no
    limit), or the reason nothing fits (the backend then refuses: a kernel must never fail at launch)."""
    bm = min(block_m, 128)
    out = []
    for kind, n, k, b_ops in (("gate_up", F, D, 2 if swiglu else 1), ("down", D, F, 1)):
        if interpret:
            bn, bk, nw, ns = _INTERPRET[kind]
            out.append(GemmConfig(bm, _fit(n, bn), _fit(k, bk), nw, ns))
            continue
        for bn, bk, nw, ns in _TABLE[(kind, bm)]:
            cfg = GemmConfig(bm, _fit(n, bn), _fit(k, bk), nw, ns)
            if smem_limit is None or cfg.smem(elt_size, b_ops) + _EPILOGUE_SMEM <= smem_limit:
                out.append(cfg)
                break
        else:
            cfg = GemmConfig(bm, *_TABLE[(kind, bm)][-1])
            need = cfg.smem(elt_size, b_ops) + _EPILOGUE_SMEM
            return (f"the {kind} GEMM's smallest {bm}-row tile needs {need // 1024} KB of shared memory, the device "
                    f"allows {smem_limit // 1024} KB")  # fmt: skip
    return out[0], out[1]


def moe_grouped_mlp_triton(
    x, sorted_ids, block_expert, w1, w3, b1, w2, weights, h, y, *, top_k: int, act: int, block_m: int, interpret: bool,
    b2=None, smem_limit: int | None = None, configs: tuple[GemmConfig, GemmConfig] | None = None,
) -> None:
    """Launch the two grouped GEMMs. ``h`` [R_pad, F] scratch, ``y`` [T*K, D] output (row = token * K + slot).
    ``configs`` (tests) overrides the table's choice for this device."""
    T, D = x.shape
    F = w1.shape[1]
    n_rows = T * top_k
    ieee = x.dtype.itemsize == 4  # fp32 models: exact fp32 products, not TF32 (torch's default for fp32 matmul)
    if configs is None:
        configs = gemm_configs(block_m, D, F, x.element_size(), act == 0, smem_limit, interpret)
        if isinstance(configs, str):  # the op's can_run refuses this case first; reaching here is a caller's bug
            raise RuntimeError(f"moe_grouped_mlp_triton: {configs}")
    w3_ = w3 if w3 is not None else w1
    for cfg, kind in zip(configs, ("gate_up", "down")):
        if block_m % cfg.block_m:
            raise ValueError(f"{kind} tile height {cfg.block_m} does not divide moe_align's block_m={block_m}")
    cfg = configs[0]
    sub = block_m // cfg.block_m
    m_tiles = block_expert.numel() * sub
    _moe_gate_up_fwd_kernel[(m_tiles * triton.cdiv(F, cfg.block_n),)](
        x, w1, w3_, b1 if b1 is not None else w1, h, sorted_ids, block_expert, m_tiles, n_rows, D, F,
        x.stride(0), x.stride(1), *w1.stride(), *w3_.stride(), b1.stride(0) if b1 is not None else 0, h.stride(0),
        TOP_K=top_k, ACT=act, HAS_B1=b1 is not None, IEEE=ieee, SUB_M=sub, EVEN_K=D % cfg.block_k == 0,
        EVEN_N=F % cfg.block_n == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    cfg = configs[1]
    sub = block_m // cfg.block_m
    m_tiles = block_expert.numel() * sub
    _moe_down_fwd_kernel[(m_tiles * triton.cdiv(D, cfg.block_n),)](
        h, w2, b2 if b2 is not None else h, weights if weights is not None else h, y, sorted_ids, block_expert,
        m_tiles, n_rows, F, D, h.stride(0), *w2.stride(), b2.stride(0) if b2 is not None else 0, y.stride(0),
        HAS_B2=b2 is not None, HAS_WEIGHTS=weights is not None, IEEE=ieee, SUB_M=sub, EVEN_K=F % cfg.block_k == 0,
        EVEN_N=D % cfg.block_n == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# combine
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _moe_combine_fwd_kernel(
    Y,
    SHARED,
    BIAS,
    OUT,
    D,
    stride_yt,
    stride_yk,
    stride_st,
    stride_ot,
    TOP_K: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # fixed order: bit-reproducible run to run
        b_acc += tl.load(Y + i_t * stride_yt + j * stride_yk + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_SHARED:
        b_acc += tl.load(SHARED + i_t * stride_st + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_acc += tl.load(BIAS + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(OUT + i_t * stride_ot + o_d, b_acc.to(OUT.dtype.element_ty), mask=m_d)


def moe_combine_triton(y, shared, bias, out) -> None:
    T, K, D = y.shape
    block_d = min(triton.next_power_of_2(D), 2048)
    _moe_combine_fwd_kernel[(T, triton.cdiv(D, block_d))](
        y, shared if shared is not None else y, bias if bias is not None else y, out, D,
        y.stride(0), y.stride(1), shared.stride(0) if shared is not None else 0, out.stride(0),
        TOP_K=K, HAS_SHARED=shared is not None, HAS_BIAS=bias is not None, BLOCK_D=block_d,
        num_warps=max(1, min(8, block_d // 256)),
    )  # fmt: skip
