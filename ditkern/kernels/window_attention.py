"""Triton kernel for windowed (2D/3D neighbourhood) attention with global text tokens.

Formula: ``out_i = sum_j softmax_j(q_i . k_j * scale over j in N(i)) v_j`` where ``N(i)`` is, for an image query, its
neighbourhood on the token grid (NATTEN-style clamped rectangle, CLEAR circle, or Sliding-Tile-Attention whole
tiles; see ``ditkern.ops.window_attention``) plus every valid text key, and for a text query every valid key.

Flash-attention forward (Dao et al., arXiv 2205.14135): online softmax in exp2 with fp32 statistics and accumulator.
A program owns one query tile of ``TT x TH x TW`` grid tokens (a 2D/3D patch, not a 1D run of tokens, so the union of
its queries' windows is a small box) and walks only the key tiles covering that box - tiles outside it are never
loaded. Key tiles have the query tile's shape; a key tile that lies inside every query's window is not masked at all
(in tile granularity that is every key tile but those cut by the grid edge). Text queries are 1-D blocks that attend
to every key. Layout: q/k/v ``[B, H, S, Dh]`` with any strides, out ``[B, H, S, Dh]`` contiguous.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
import triton.runtime.errors

from ditkern._backend import device_capability, max_shared_memory
from ditkern.kernels.window_ranges import key_range

LOG2E = 1.4426950408889634


@triton.jit
def _attend(acc, m_i, l_i, b_q, p_kbase, p_vbase, o_tok, m_key, m_qk, o_d, m_d, stride_ks, stride_kd, stride_vs,
            stride_vd, qk_scale, APPLY_MASK: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One key block: scores, online-softmax update, accumulate p @ v."""
    o_tok64 = o_tok.to(tl.int64)
    b_k = tl.load(
        p_kbase + o_tok64[:, None] * stride_ks + o_d[None, :] * stride_kd, mask=m_key[:, None] & m_d[None, :], other=0.0
    )  # [BLOCK_N, BLOCK_D]
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    b_s = b_s * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
    if APPLY_MASK:
        b_s = tl.where(m_qk, b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    # a row that has seen only masked keys so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    b_p = tl.exp2(b_s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(b_p, 1)
    b_v = tl.load(
        p_vbase + o_tok64[:, None] * stride_vs + o_d[None, :] * stride_vd, mask=m_key[:, None] & m_d[None, :], other=0.0
    )
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return acc, m_new, l_i


@triton.jit
def _axis_box(c0, c1, N, WIN, TILE: tl.constexpr, CIRCLE: tl.constexpr, TILE_MODE: tl.constexpr):
    """Keys ``[lo, hi)`` along one axis seen by queries with coordinates ``c0..c1`` (inclusive)."""
    if CIRCLE:
        r = WIN // 2
        lo = tl.maximum(c0 - r, 0)
        hi = tl.minimum(c1 + r + 1, N)
    elif TILE_MODE:
        nt = tl.cdiv(N, TILE)
        wt = tl.minimum(tl.where(WIN >= N, nt, WIN // TILE), nt)
        s = tl.minimum(tl.maximum(c0 // TILE - wt // 2, 0), nt - wt)
        lo = s * TILE
        hi = tl.minimum((s + wt) * TILE, N)
    else:
        lo = tl.minimum(tl.maximum(c0 - WIN // 2, 0), N - WIN)
        hi = tl.minimum(tl.maximum(c1 - WIN // 2, 0), N - WIN) + WIN
    return lo, hi


@triton.jit
def _axis_full(c0, c1, k0, k1, N, WIN):
    """Is the key range ``k0..k1`` (inclusive) inside the rect window of every query ``c0..c1`` (token mode)."""
    s_last = tl.minimum(tl.maximum(c1 - WIN // 2, 0), N - WIN)  # the latest window start
    s_first = tl.minimum(tl.maximum(c0 - WIN // 2, 0), N - WIN)  # the earliest window end is s_first + WIN
    return (k0 >= s_last) & (k1 < s_first + WIN)


@triton.jit
def _window_attention_fwd_kernel(
    Q, K, V, O, KPM,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os,
    stride_mb,
    NH, S, T, IMG_OFF, TXT_OFF, HEAD_DIM,
    GT, GH, GW, WT, WH, WW,
    CT, CH, CW, RR,
    N_IMG_TILES,
    qk_scale,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_KPM: tl.constexpr, CIRCLE: tl.constexpr, TILE_MODE: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    BLOCK: tl.constexpr = TT * TH * TW
    i_tile = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // NH).to(tl.int64)
    i_h = (i_bh % NH).to(tl.int64)
    p_q = Q + i_b * stride_qb + i_h * stride_qh
    p_k = K + i_b * stride_kb + i_h * stride_kh
    p_v = V + i_b * stride_vb + i_h * stride_vh
    p_o = O + i_b * stride_ob + i_h * stride_oh

    o_m = tl.arange(0, BLOCK)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)

    if i_tile < N_IMG_TILES:
        # ---- an image query tile: a TT x TH x TW patch of the grid
        n_tw = tl.cdiv(GW, TW)
        n_th = tl.cdiv(GH, TH)
        t0 = (i_tile // (n_tw * n_th)) * TT
        h0 = ((i_tile // n_tw) % n_th) * TH
        w0 = (i_tile % n_tw) * TW
        q_t = t0 + o_m // (TH * TW)
        q_h = h0 + (o_m // TW) % TH
        q_w = w0 + o_m % TW
        m_q = (q_t < GT) & (q_h < GH) & (q_w < GW)
        q_tok = IMG_OFF + (q_t * GH + q_h) * GW + q_w
        b_q = tl.load(
            p_q + q_tok.to(tl.int64)[:, None] * stride_qs + o_d[None, :] * stride_qd,
            mask=m_q[:, None] & m_d[None, :], other=0.0,
        )  # [BLOCK, BLOCK_D]
        t1 = tl.minimum(t0 + TT, GT) - 1
        h1 = tl.minimum(h0 + TH, GH) - 1
        w1 = tl.minimum(w0 + TW, GW) - 1
        lo_t, hi_t = _axis_box(t0, t1, GT, WT, TT, CIRCLE, TILE_MODE)
        lo_h, hi_h = _axis_box(h0, h1, GH, WH, TH, CIRCLE, TILE_MODE)
        lo_w, hi_w = _axis_box(w0, w1, GW, WW, TW, CIRCLE, TILE_MODE)
        # per-query window starts (rect, token granularity)
        s_t = tl.minimum(tl.maximum(q_t - WT // 2, 0), GT - WT)
        s_h = tl.minimum(tl.maximum(q_h - WH // 2, 0), GH - WH)
        s_w = tl.minimum(tl.maximum(q_w - WW // 2, 0), GW - WW)
        for k_t0 in range(lo_t, hi_t, TT):
            for k_h0 in range(lo_h, hi_h, TH):
                for k_w0 in range(lo_w, hi_w, TW):
                    k_t = k_t0 + o_m // (TH * TW)
                    k_h = k_h0 + (o_m // TW) % TH
                    k_w = k_w0 + o_m % TW
                    m_k = (k_t < hi_t) & (k_h < hi_h) & (k_w < hi_w)
                    k_tok = IMG_OFF + (k_t * GH + k_h) * GW + k_w
                    if CIRCLE:
                        d_t = q_t[:, None] - k_t[None, :]
                        d_h = q_h[:, None] - k_h[None, :]
                        d_w = q_w[:, None] - k_w[None, :]
                        dist = (d_t * d_t).to(tl.int64) * CT + (d_h * d_h).to(tl.int64) * CH
                        dist += (d_w * d_w).to(tl.int64) * CW
                        m_qk = m_k[None, :] & (dist <= RR)
                        acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, p_k, p_v, k_tok, m_k, m_qk, o_d, m_d, stride_ks,
                                                stride_kd, stride_vs, stride_vd, qk_scale, True, IEEE)  # fmt: skip
                    elif TILE_MODE:
                        # whole key tiles: only the grid edge can cut one
                        edge = (k_t0 + TT > hi_t) | (k_h0 + TH > hi_h) | (k_w0 + TW > hi_w)
                        if edge:
                            acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, p_k, p_v, k_tok, m_k, m_k[None, :], o_d, m_d,
                                                    stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, True, IEEE)  # fmt: skip
                        else:
                            acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, p_k, p_v, k_tok, m_k, m_k[None, :], o_d, m_d,
                                                    stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, False, IEEE)  # fmt: skip
                    else:
                        full = (
                            _axis_full(t0, t1, k_t0, k_t0 + TT - 1, GT, WT)
                            & _axis_full(h0, h1, k_h0, k_h0 + TH - 1, GH, WH)
                            & _axis_full(w0, w1, k_w0, k_w0 + TW - 1, GW, WW)
                        )
                        if full:
                            acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, p_k, p_v, k_tok, m_k, m_k[None, :], o_d, m_d,
                                                    stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, False, IEEE)  # fmt: skip
                        else:
                            m_qk = (
                                m_k[None, :]
                                & (k_t[None, :] >= s_t[:, None]) & (k_t[None, :] < s_t[:, None] + WT)
                                & (k_h[None, :] >= s_h[:, None]) & (k_h[None, :] < s_h[:, None] + WH)
                                & (k_w[None, :] >= s_w[:, None]) & (k_w[None, :] < s_w[:, None] + WW)
                            )  # fmt: skip
                            acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, p_k, p_v, k_tok, m_k, m_qk, o_d, m_d, stride_ks,
                                                    stride_kd, stride_vs, stride_vd, qk_scale, True, IEEE)  # fmt: skip
        # every text key (global tokens)
        for j0 in range(0, T, BLOCK):
            o_j = j0 + o_m
            m_k = o_j < T
            if HAS_KPM:
                m_k &= tl.load(KPM + i_b * stride_mb + o_j, mask=m_k, other=0) != 0
            acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, p_k, p_v, TXT_OFF + o_j, m_k, m_k[None, :], o_d, m_d,
                                    stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, True, IEEE)  # fmt: skip
    else:
        # ---- a block of text queries: attends to every valid key
        o_q = (i_tile - N_IMG_TILES) * BLOCK + o_m
        m_q = o_q < T
        q_tok = TXT_OFF + o_q
        b_q = tl.load(
            p_q + q_tok.to(tl.int64)[:, None] * stride_qs + o_d[None, :] * stride_qd,
            mask=m_q[:, None] & m_d[None, :], other=0.0,
        )
        for j0 in range(0, S, BLOCK):
            o_j = j0 + o_m
            m_k = o_j < S
            if HAS_KPM:
                is_txt = (o_j >= TXT_OFF) & (o_j < TXT_OFF + T)
                m_k &= tl.load(KPM + i_b * stride_mb + (o_j - TXT_OFF), mask=m_k & is_txt, other=1) != 0
            acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, p_k, p_v, o_j, m_k, m_k[None, :], o_d, m_d,
                                    stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, True, IEEE)  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    tl.store(
        p_o + q_tok.to(tl.int64)[:, None] * stride_os + o_d[None, :],
        b_o.to(O.dtype.element_ty),
        mask=m_q[:, None] & m_d[None, :],
    )


def _num_warps(block: int, block_d: int) -> int:
    return 4 if block * block_d <= 64 * 64 else 8


# Shared memory of the compiled kernel in units of one [BLOCK, BLOCK_D] tile, by software-pipeline depth, measured with
# the GPU-less compile check (bench/static.py, triton 3.9, 8x8 tiles, Dh 64-256): before Hopper the K/V loads are
# cp.async-staged (2.5 / 5 / 8 tiles), from sm_90 on the wgmma path also stages Q and the P operand (2 / 8 / 12).
# Rounded up by one tile of margin for other Triton versions; a launch that still does not fit retries shallower.
_SMEM_TILES = {False: {3: 9, 2: 6, 1: 3.5}, True: {3: 13, 2: 9, 1: 3}}


def launch_config(block: int, block_d: int, elt_size: int, capability, smem_limit) -> tuple[int, int] | str:
    """``(num_warps, num_stages)`` for a query tile of ``block`` tokens and head dim ``block_d`` on a device of this
    capability with ``smem_limit`` bytes of shared memory per block (None: no limit, the interpreter), or the reason no
    configuration fits (then the backend refuses: a kernel must never fail at launch)."""
    warps = _num_warps(block, block_d)
    if smem_limit is None:
        return warps, 2
    tile = block * block_d * elt_size
    table = _SMEM_TILES[capability is not None and tuple(capability) >= (9, 0)]
    for stages in (3, 2, 1):
        if table[stages] * tile <= smem_limit:
            return warps, stages
    return (
        f"a {block}-token query tile with head dim {block_d} needs ~{int(table[1] * tile) // 1024} KB of shared memory,"
        f" the device allows {smem_limit // 1024} KB: use a smaller tile"
    )


def window_attention_triton(q, k, v, spec, text_tokens: int, text_position: str, text_mask, scale: float):
    """Launch on validated inputs (see ``ditkern.ops.window_attention``); returns ``[B, H, S, Dh]`` contiguous."""
    B, NH, S, Dh = q.shape
    out = torch.empty((B, NH, S, Dh), dtype=q.dtype, device=q.device)
    GT, GH, GW = spec.grid
    TT, TH, TW = spec.tile
    block = TT * TH * TW
    n_img = spec.n_image
    img_off, txt_off = (text_tokens, 0) if text_position == "first" else (0, n_img)
    n_img_tiles = triton.cdiv(GT, TT) * triton.cdiv(GH, TH) * triton.cdiv(GW, TW)
    n_txt_blocks = triton.cdiv(text_tokens, block)
    (ct, ch, cw), rr = spec.circle_weights() if spec.shape == "circle" else ((0, 0, 0), 0)
    kpm = text_mask.to(torch.int8).contiguous() if text_mask is not None else None
    block_d = max(16, triton.next_power_of_2(Dh))
    grid = (n_img_tiles + n_txt_blocks, B * NH)
    config = launch_config(block, block_d, q.element_size(), device_capability(q.device), max_shared_memory(q.device))
    if isinstance(config, str):  # the op's can_run refuses this case first; reaching here is a caller's bug
        raise RuntimeError(f"window_attention_triton: {config}")
    num_warps, num_stages = config
    args = (
        q, k, v, out, kpm if kpm is not None else out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        kpm.stride(0) if kpm is not None else 0,
        NH, S, text_tokens, img_off, txt_off, Dh,
        GT, GH, GW, *spec.window,
        ct, ch, cw, rr,
        n_img_tiles,
        scale * LOG2E,
    )  # fmt: skip
    constexprs = dict(
        TT=TT, TH=TH, TW=TW, BLOCK_D=block_d,
        HAS_KPM=kpm is not None, CIRCLE=spec.shape == "circle", TILE_MODE=spec.granularity == "tile",
        IEEE=q.dtype == torch.float32,
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

    Host-side replay of the kernel's loop bounds (for the bench table: how close the 2D/3D tiling is to ideal).
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
