"""Triton kernel for windowed (2D/3D neighbourhood) attention with global text tokens.

Formula: ``out_i = sum_j softmax_j(q_i . k_j * scale over j in N(i)) v_j`` where ``N(i)`` is, for an image query, its
neighbourhood on the token grid (NATTEN-style clamped rectangle, CLEAR circle, or Sliding-Tile-Attention whole
tiles; see ``ditkern.ops.window_attention``) plus every valid text key, and for a text query every valid key.

Flash-attention forward (Dao et al., arXiv 2205.14135): online softmax in exp2 with fp32 statistics and accumulator.
A program owns one query tile of ``QT x QH x QW`` grid tokens (a 2D/3D patch, not a 1D run of tokens, so the union of
its queries' windows is a small box; 128 queries, so with 8 warps each warpgroup owns 64 whole rows and the row max /
sum never cross warpgroups). The key tiles it visits (``spec.tile``-shaped patches, 64 tokens by default, and 1-D runs
of text keys) come from a list built once per layout on the host (``window_ranges.key_tile_lists``,
FlexAttention-BlockMask style): per query tile the tiles inside every query's window ("full") first, then the ones a
window, the grid edge, the end of the text or the text padding mask cuts. Two loops walk the list, ``for i in
range(...)``, reading the next entry one iteration ahead, so Triton's software pipeliner turns the K/V loads into
cp.async copies ``num_stages - 1`` tiles ahead; the full loop has no predicate at all. Head dims that are not a power
of two are computed as a power-of-two part plus a >= 16 part (72 = 64 + 16: two dots, 80 columns instead of 128), and
row strides are passed in 16-byte units so the loads vectorise whatever the head dim. Text queries are 1-D blocks
that attend to every key (their list: every key run). Layout: q/k/v ``[B, H, S, Dh]`` with any strides, out
``[B, H, S, Dh]`` contiguous.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
import triton.runtime.errors

from ditkern._backend import device_capability, max_shared_memory
from ditkern.kernels.window_ranges import _axis_units, key_range, key_tile_lists, query_tile

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(p, o_row, stride_s, o_d, stride_d, m_row, ALIGN: tl.constexpr, HEAD_DIM: tl.constexpr,
               MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):  # fmt: skip
    """``[rows, len(o_d)]`` of a ``[S, Dh]`` matrix; ``stride_s`` is in units of ``ALIGN`` elements, so the compiler
    knows each row starts on a 16-byte boundary (head dim 72: stride 72 is not a multiple of 16 elements, which Triton
    specialises on, so without the unit it proves nothing and loads element by element)."""
    ptrs = p + o_row[:, None] * stride_s * ALIGN + o_d[None, :] * stride_d
    if MASK_ROWS:
        if MASK_D:
            return tl.load(ptrs, mask=m_row[:, None] & (o_d[None, :] < HEAD_DIM), other=0.0)
        else:
            return tl.load(ptrs, mask=m_row[:, None], other=0.0)
    else:
        if MASK_D:
            return tl.load(ptrs, mask=o_d[None, :] < HEAD_DIM, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attend(acc, acc2, m_i, l_i, b_q, b_q2, p_k, p_v, o_row, m_key, m_qk, o_d, o_d2,
            stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
            MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_D2: tl.constexpr,
            ALIGN: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One key tile: scores, online-softmax update, accumulate p @ v. ``MASKED=False``: every key of the tile is
    valid and inside every query's window, so neither the loads nor the scores are predicated."""
    MASK_D: tl.constexpr = HEAD_DIM < BLOCK_D
    # [BLOCK_N, BLOCK_D]
    b_k = _load_rows(p_k, o_row, stride_ks, o_d, stride_kd, m_key, ALIGN, HEAD_DIM, MASKED, MASK_D)
    b_s = _dot(b_q, tl.trans(b_k), IEEE)
    if HAS_D2:  # head dim 72 = 64 + a 16-wide part (8 of it zero): two dots instead of one padded to 128
        b_k2 = _load_rows(p_k, o_row, stride_ks, o_d2, stride_kd, m_key, ALIGN, HEAD_DIM, MASKED, True)
        b_s += _dot(b_q2, tl.trans(b_k2), IEEE)
    # [BLOCK_M, BLOCK_N] raw scores; the statistics are in the scaled log2 domain. The scale (> 0) is applied to the
    # row max once per row and fused into the exp2 argument (one FFMA per score), not multiplied into every score
    if MASKED:
        b_s = tl.where(m_qk, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
        # a row that has seen only masked keys so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    b_p = tl.exp2(b_s * qk_scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(b_p, 1)
    b_v = _load_rows(p_v, o_row, stride_vs, o_d, stride_vd, m_key, ALIGN, HEAD_DIM, MASKED, MASK_D)
    b_p16 = b_p.to(b_v.dtype)
    acc = acc * alpha[:, None] + _dot(b_p16, b_v, IEEE)
    if HAS_D2:
        b_v2 = _load_rows(p_v, o_row, stride_vs, o_d2, stride_vd, m_key, ALIGN, HEAD_DIM, MASKED, True)
        acc2 = acc2 * alpha[:, None] + _dot(b_p16, b_v2, IEEE)
    return acc, acc2, m_new, l_i


@triton.jit
def _entry_rows(e, IMG_OFF, GH, GW, r_t, r_h, r_w, KH: tl.constexpr, KW: tl.constexpr, ROW64: tl.constexpr):
    """Sequence positions of the keys of one list entry (see ``key_tile_lists``): ``e >= 0`` an image key tile whose
    first token has raster index ``e``; ``e < 0`` the run of consecutive tokens from ``-e - 1``."""
    is_run = e < 0
    start = tl.where(is_run, -e - 1, IMG_OFF + e)
    st = tl.where(is_run, KH * KW, GH * GW)
    sh = tl.where(is_run, KW, GW)
    o_tok = start + r_t * st + r_h * sh + r_w
    if ROW64:
        return o_tok, o_tok.to(tl.int64)
    else:
        return o_tok, o_tok


@triton.jit
def _window_attention_fwd_kernel(
    Q, K, V, O, KPM, LISTS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os,
    stride_mb,
    NH, S, T, IMG_OFF, TXT_OFF,
    GT, GH, GW,
    WT, WH, WW, NUT, NUH, NUW,
    CT, CH, CW, RR,
    N_IMG_TILES, N_Q_TILES, N_BH,
    qk_scale,
    QT: tl.constexpr, QH: tl.constexpr, QW: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    DIV_T: tl.constexpr, DIV_H: tl.constexpr, DIV_W: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_D2: tl.constexpr, D2: tl.constexpr, ALIGN: tl.constexpr,
    ROW64: tl.constexpr, HAS_T: tl.constexpr, HAS_KPM: tl.constexpr, CIRCLE: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = QT * QH * QW
    BLOCK_N: tl.constexpr = KT * KH * KW
    # 1-D grid: the text-query tiles of every (batch, head) first - each walks every key, ~10x an image tile's list
    # at FLUX 4096, so they must not start in the last wave - then each head's image tiles in raster order (neighbours
    # in flight together share their key boxes in L2)
    pid = tl.program_id(0)
    n_txt = (N_Q_TILES - N_IMG_TILES) * N_BH
    if pid < n_txt:
        i_bh = pid % N_BH
        i_tile = N_IMG_TILES + pid // N_BH
    else:
        i_bh = (pid - n_txt) // N_IMG_TILES
        i_tile = (pid - n_txt) % N_IMG_TILES
    i_b = (i_bh // NH).to(tl.int64)
    i_h = (i_bh % NH).to(tl.int64)
    p_q = Q + (i_b * stride_qb + i_h * stride_qh) * ALIGN
    p_k = K + (i_b * stride_kb + i_h * stride_kh) * ALIGN
    p_v = V + (i_b * stride_vb + i_h * stride_vh) * ALIGN
    p_o = O + (i_b * stride_ob + i_h * stride_oh) * ALIGN

    o_m = tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_d2 = BLOCK_D + tl.arange(0, D2)
    MASK_D: tl.constexpr = HEAD_DIM < BLOCK_D

    if i_tile < N_IMG_TILES:
        # an image query tile: a QT x QH x QW patch of the grid
        n_qw = tl.cdiv(GW, QW)
        n_qh = tl.cdiv(GH, QH)
        q_t = (i_tile // (n_qw * n_qh)) * QT + o_m // (QH * QW)
        q_h = ((i_tile // n_qw) % n_qh) * QH + (o_m // QW) % QH
        q_w = (i_tile % n_qw) * QW + o_m % QW
        m_q = (q_t < GT) & (q_h < GH) & (q_w < GW)
        q_tok = IMG_OFF + (q_t * GH + q_h) * GW + q_w
        c_hi = TXT_OFF + T  # run entries of an image tile are its text keys
    else:
        # a block of text queries: attends to every valid key
        o_q = (i_tile - N_IMG_TILES) * BLOCK_M + o_m
        m_q = o_q < T
        q_tok = TXT_OFF + o_q
        q_t = tl.zeros([BLOCK_M], dtype=tl.int32)
        q_h = tl.zeros([BLOCK_M], dtype=tl.int32)
        q_w = tl.zeros([BLOCK_M], dtype=tl.int32)
        c_hi = S
    if ROW64:
        q_row = q_tok.to(tl.int64)
    else:
        q_row = q_tok
    b_q = _load_rows(p_q, q_row, stride_qs, o_d, stride_qd, m_q, ALIGN, HEAD_DIM, True, MASK_D)  # [BLOCK_M, BLOCK_D]
    if HAS_D2:
        b_q2 = _load_rows(p_q, q_row, stride_qs, o_d2, stride_qd, m_q, ALIGN, HEAD_DIM, True, True)
    else:
        b_q2 = b_q
    # per-query window along each axis as a token range [lo, lo + WT * DIV_T) (rect: token or whole-tile units, see
    # window_ranges._axis_units: unit u sees units [s, s + W), i.e. tokens [s * DIV, (s + W) * DIV))
    lo_t = tl.minimum(tl.maximum(q_t // DIV_T - WT // 2, 0), NUT - WT) * DIV_T
    lo_h = tl.minimum(tl.maximum(q_h // DIV_H - WH // 2, 0), NUH - WH) * DIV_H
    lo_w = tl.minimum(tl.maximum(q_w // DIV_W - WW // 2, 0), NUW - WW) * DIV_W
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_t = o_n // (KH * KW)
    r_h = (o_n // KW) % KH
    r_w = o_n % KW
    i_beg = tl.load(LISTS + 3 * i_tile)
    i_mid = tl.load(LISTS + 3 * i_tile + 1)
    i_end = tl.load(LISTS + 3 * i_tile + 2)
    # key tiles inside every query's window: no predicate at all (the bulk of the work)
    e = tl.load(LISTS + i_beg)
    for i in range(i_beg, i_mid):
        o_tok, o_row = _entry_rows(e, IMG_OFF, GH, GW, r_t, r_h, r_w, KH, KW, ROW64)
        e = tl.load(LISTS + i + 1)
        acc, acc2, m_i, l_i = _attend(acc, acc2, m_i, l_i, b_q, b_q2, p_k, p_v, o_row, o_n < BLOCK_N, m_q[:, None],
                                      o_d, o_d2, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, False,
                                      HEAD_DIM, BLOCK_D, HAS_D2, ALIGN, IEEE)  # fmt: skip
    # key tiles cut by a window, the grid edge, the end of the text or the text padding mask
    e = tl.load(LISTS + i_mid)
    for i in range(i_mid, i_end):
        o_tok, o_row = _entry_rows(e, IMG_OFF, GH, GW, r_t, r_h, r_w, KH, KW, ROW64)
        is_run = e < 0
        m_run = o_tok < c_hi
        if HAS_KPM:
            in_txt = (o_tok >= TXT_OFF) & (o_tok < TXT_OFF + T)
            m_run &= tl.load(KPM + i_b * stride_mb + (o_tok - TXT_OFF), mask=m_run & in_txt, other=1) != 0
        e_img = tl.maximum(e, 0)
        k_t0 = e_img // (GH * GW)
        k_h0 = (e_img // GW) % GH
        k_w0 = e_img % GW
        m_img = (k_t0 + r_t < GT) & (k_h0 + r_h < GH) & (k_w0 + r_w < GW)
        m_key = tl.where(is_run, m_run, m_img)  # [BLOCK_N]: which keys exist
        if CIRCLE:
            d_t = q_t[:, None] - (k_t0 + r_t)[None, :]
            d_h = q_h[:, None] - (k_h0 + r_h)[None, :]
            d_w = q_w[:, None] - (k_w0 + r_w)[None, :]
            dist = (d_t * d_t).to(tl.int64) * CT + (d_h * d_h).to(tl.int64) * CH + (d_w * d_w).to(tl.int64) * CW
            m_qk = m_key[None, :] & ((dist <= RR) | is_run)
        else:
            # key offset r inside the tile is in the window iff 0 <= r - (lo - k0) < len: one subtraction and one
            # unsigned compare per axis and score; a run entry (text keys) passes every window test
            BIG: tl.constexpr = 1 << 30
            n_t = tl.where(is_run, BIG, WT * DIV_T).to(tl.uint32)
            n_h = tl.where(is_run, BIG, WH * DIV_H).to(tl.uint32)
            n_w = tl.where(is_run, BIG, WW * DIV_W).to(tl.uint32)
            b_h = tl.where(is_run, 0, lo_h - k_h0)
            b_w = tl.where(is_run, 0, lo_w - k_w0)
            m_qk = (
                m_key[None, :]
                & ((r_h[None, :] - b_h[:, None]).to(tl.uint32, bitcast=True) < n_h)
                & ((r_w[None, :] - b_w[:, None]).to(tl.uint32, bitcast=True) < n_w)
            )  # fmt: skip
            if HAS_T:  # 3-D grids only: on a 2-D grid every token has t = 0
                b_t = tl.where(is_run, 0, lo_t - k_t0)
                m_qk &= (r_t[None, :] - b_t[:, None]).to(tl.uint32, bitcast=True) < n_t
        acc, acc2, m_i, l_i = _attend(acc, acc2, m_i, l_i, b_q, b_q2, p_k, p_v, o_row, m_key, m_qk, o_d, o_d2,
                                      stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, True,
                                      HEAD_DIM, BLOCK_D, HAS_D2, ALIGN, IEEE)  # fmt: skip
        e = tl.load(LISTS + i + 1)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    p_out = p_o + q_row[:, None] * stride_os * ALIGN
    if MASK_D:
        tl.store(p_out + o_d[None, :], (acc / l_safe[:, None]).to(O.dtype.element_ty),
                 mask=m_q[:, None] & (o_d[None, :] < HEAD_DIM))  # fmt: skip
    else:
        tl.store(p_out + o_d[None, :], (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=m_q[:, None])
    if HAS_D2:
        tl.store(p_out + o_d2[None, :], (acc2 / l_safe[:, None]).to(O.dtype.element_ty),
                 mask=m_q[:, None] & (o_d2[None, :] < HEAD_DIM))  # fmt: skip


def head_split(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_D2)``: the head dim as a power-of-two part plus, where that wastes less than padding to the
    next power of two, a second part of >= 16 (``tl.dot`` needs power-of-two sizes >= 16): 72 -> 64 + 16 (80 computed
    instead of 128), 96 -> 64 + 32, 80 -> 64 + 16; 64 and 128 -> one part."""
    full = max(16, triton.next_power_of_2(head_dim))
    if head_dim <= 16 or head_dim == full:
        return full, 0
    low = full // 2
    rest = max(16, triton.next_power_of_2(head_dim - low))
    return (low, rest) if low + rest < full else (full, 0)


def _num_warps(block_m: int) -> int:
    # one warpgroup (4 warps, wgmma's 64-row granule) per 64 query rows, so each warpgroup owns whole rows and the
    # row max / sum never crosses warpgroups; 256-row tiles keep 8 warps (two 64-row MMAs per warpgroup)
    return max(4, min(8, block_m // 16))


def query_rows(block_n: int) -> int:
    """Query-tile rows for a key tile of ``block_n`` tokens: 128 (two warpgroups of 64 rows), or the key tile when it
    is larger."""
    return max(128, block_n)


# Shared memory of the compiled kernel, measured with the GPU-less compile check (bench.static, triton 3.9; flux,
# sd3, pixart and wan cases at 2-3 stages): per software-pipeline stage one K and one V tile ([BLOCK_N, Dh padded]);
# from sm_90 on the wgmma path also keeps the Q tile in shared memory (its A operand), before it Q stays in registers
# (mma.sync). The compiler's figure matched these sums exactly; 1 KB of margin for other Triton versions, and a launch
# that still does not fit retries one stage shallower (the OutOfResources path below).
_SMEM_MARGIN = 1024


def smem_bytes(block_m: int, block_n: int, dpad: int, elt_size: int, stages: int, hopper: bool) -> int:
    """Predicted shared memory of one program (bytes). fp32 inputs take the FMA path (no tensor cores), which keeps Q
    in shared memory on every architecture (sm_89: 128.5 KB at 128 x 64 x 128, one stage)."""
    kv = 2 * block_n * dpad * elt_size
    q = block_m * dpad * elt_size if hopper or elt_size == 4 else 0
    return q + stages * kv + _SMEM_MARGIN


def launch_config(block_n: int, head_dim: int, elt_size: int, capability, smem_limit) -> tuple[int, int, int] | str:
    """``(block_m, num_warps, num_stages)`` for key tiles of ``block_n`` tokens and this head dim on a device of this
    capability with ``smem_limit`` bytes of shared memory per block (None: no limit, the interpreter), or the reason no
    configuration fits (then the backend refuses: a kernel must never fail at launch). 128 query rows where they fit
    at any depth; fp32 (the FMA path, where shared memory, not the MMA shape, is the limit) falls back to 64."""
    block_m = query_rows(block_n)
    if smem_limit is None:
        return block_m, _num_warps(block_m), 2
    hopper = capability is not None and tuple(capability) >= (9, 0)
    dpad = sum(head_split(head_dim))
    rows = [block_m] + ([64] if elt_size == 4 and block_n <= 64 and block_m > 64 else [])
    for bm in rows:
        for stages in (3, 2, 1):
            if smem_bytes(bm, block_n, dpad, elt_size, stages, hopper) <= smem_limit:
                return bm, _num_warps(bm), stages
    need = smem_bytes(rows[-1], block_n, dpad, elt_size, 1, hopper)
    return (
        f"a {rows[-1]}-query / {block_n}-key tile with head dim {head_dim} needs ~{need // 1024} KB of shared memory,"
        f" the device allows {smem_limit // 1024} KB: use a smaller tile"
    )


@functools.lru_cache(maxsize=64)
def _lists_host(spec, qtile, text_tokens, text_position, has_kpm):
    buf, n_q = key_tile_lists(spec, qtile, text_tokens, text_position, has_kpm)
    return torch.tensor(buf, dtype=torch.int32), n_q


@functools.lru_cache(maxsize=64)
def _lists_on(spec, qtile, text_tokens, text_position, has_kpm, device):
    buf, n_q = _lists_host(spec, qtile, text_tokens, text_position, has_kpm)
    return buf.to(device), n_q


def window_attention_triton(q, k, v, spec, text_tokens: int, text_position: str, text_mask, scale: float):
    """Launch on validated inputs (see ``ditkern.ops.window_attention``); returns ``[B, H, S, Dh]`` contiguous."""
    B, NH, S, Dh = q.shape
    out = torch.empty((B, NH, S, Dh), dtype=q.dtype, device=q.device)
    GT, GH, GW = spec.grid
    TT, TH, TW = spec.tile
    block_n = TT * TH * TW
    config = launch_config(block_n, Dh, q.element_size(), device_capability(q.device), max_shared_memory(q.device))
    if isinstance(config, str):  # the op's can_run refuses this case first; reaching here is a caller's bug
        raise RuntimeError(f"window_attention_triton: {config}")
    block_m, num_warps, num_stages = config
    qtile = query_tile(spec, block_m)
    n_img = spec.n_image
    img_off, txt_off = (text_tokens, 0) if text_position == "first" else (0, n_img)
    n_img_tiles = triton.cdiv(GT, qtile[0]) * triton.cdiv(GH, qtile[1]) * triton.cdiv(GW, qtile[2])
    lists, n_q = _lists_on(spec, qtile, text_tokens, text_position, text_mask is not None, str(q.device))
    (ct, ch, cw), rr = spec.circle_weights() if spec.shape == "circle" else ((0, 0, 0), 0)
    units = [_axis_units(spec, a) for a in range(3)]
    kpm = text_mask.to(torch.int8).contiguous() if text_mask is not None else None
    block_d, block_d2 = head_split(Dh)
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3]]
    align = 16 // q.element_size()
    if any(s % align for s in strides):
        align = 1
    qs, ks, vs, os_ = (strides[i : i + 3] for i in range(0, 12, 3))
    row64 = (S - 1) * max(q.stride(2), k.stride(2), v.stride(2), out.stride(2)) >= 2**31
    grid = (n_q * B * NH,)
    args = (
        q, k, v, out, kpm if kpm is not None else out, lists,
        *(s // align for s in qs), q.stride(3), *(s // align for s in ks), k.stride(3),
        *(s // align for s in vs), v.stride(3), *(s // align for s in os_),
        kpm.stride(0) if kpm is not None else 0,
        NH, S, text_tokens, img_off, txt_off,
        GT, GH, GW,
        *(u[1] for u in units), *(u[2] for u in units),
        ct, ch, cw, rr,
        n_img_tiles, n_q, B * NH,
        scale * LOG2E,
    )  # fmt: skip
    constexprs = dict(
        QT=qtile[0], QH=qtile[1], QW=qtile[2], KT=TT, KH=TH, KW=TW,
        DIV_T=units[0][0], DIV_H=units[1][0], DIV_W=units[2][0],
        HEAD_DIM=Dh, BLOCK_D=block_d, HAS_D2=block_d2 > 0, D2=max(block_d2, 16), ALIGN=align, ROW64=row64, HAS_T=GT > 1,
        HAS_KPM=kpm is not None, CIRCLE=spec.shape == "circle", IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    while True:
        try:
            _window_attention_fwd_kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return out
        except triton.runtime.errors.OutOfResources:
            # raised before anything runs, when the compiled kernel's shared memory exceeds the device's: the estimate
            # above was short for this Triton version, so pipeline less deeply
            if num_stages == 1:
                raise
            num_stages -= 1


def visited_key_fraction(spec, text_tokens: int = 0) -> float:
    """Key tokens the kernel loads per image query, relative to the window's own size (1.0 = ideal tile cover).

    Host-side replay of the key boxes with query tiles of the key tile's own shape (the ``auto_tile`` criterion and the
    bench table: how close the 2D/3D tiling is to ideal); the kernel's 128-query tiles visit ``query_tile``'s boxes.
    """
    tiles = 0
    ideal = 1
    for a in range(3):
        ideal *= spec.window[a] if spec.shape == "rect" else min(spec.window[a], spec.grid[a])
    total = 0
    count = 0
    GT, GH, GW = spec.grid
    TT, TH, TW = spec.tile
    for t0 in range(0, GT, TT):
        for h0 in range(0, GH, TH):
            for w0 in range(0, GW, TW):
                n = 1
                for a, (c0, tl_, g) in enumerate(((t0, TT, GT), (h0, TH, GH), (w0, TW, GW))):
                    lo, hi = key_range(spec, a, c0, min(c0 + tl_, g) - 1)
                    n *= math.ceil((hi - lo) / tl_) * tl_
                total += n
                count += 1
                tiles += 1
    return total / count / ideal
