"""Triton kernels for non-causal ReLU linear attention (Sana, arXiv 2410.10629; LiT, arXiv 2501.12976).

Formula per (batch, head): ``KV = sum_s relu(k_s)^T v_s`` (``[Dh, Dh]``), ``z = sum_s relu(k_s)`` (``[Dh]``),
``out_s = relu(q_s) KV / (relu(q_s) . z + eps)``. Layout: q/k/v ``[B, H, S, Dh]`` with any strides, out
``[B, H, S, Dh]`` contiguous.

Two passes, because the output needs the state over the whole sequence: ``_linear_attention_state_kernel``
accumulates the state of one chunk of the sequence per program (fp32; the products of relu'd 16-bit values are exact
in fp32, so the 16-bit ``tl.dot`` equals Sana's fp32 matmul up to summation order), the chunks' partial states are
summed in fixed order (deterministic, ``[B, H, C, Dh, Dh]`` - tiny), and ``_linear_attention_out_kernel`` applies the
state to a block of queries per program. Splitting the sequence over programs keeps the GPU full when ``B * H`` is
below the SM count (Sana 1600M: 70 heads). The second pass multiplies the fp32 state in fp32 (``ieee``): it is
``S * Dh^2`` FLOPs per head, not the bottleneck.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _linear_attention_state_kernel(
    K, V, KV, Z,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    NH, S, D, CHUNK,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    i_bh = tl.program_id(0)
    i_c = tl.program_id(1)
    n_c = tl.num_programs(1)
    i_b = (i_bh // NH).to(tl.int64)
    i_h = (i_bh % NH).to(tl.int64)
    o_s = tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_k = K + i_b * stride_kb + i_h * stride_kh
    p_v = V + i_b * stride_vb + i_h * stride_vh
    b_kv = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    b_z = tl.zeros([BLOCK_D], dtype=tl.float32)
    s_end = tl.minimum((i_c + 1) * CHUNK, S)
    for s0 in range(i_c * CHUNK, s_end, BLOCK_S):
        o_ss = (s0 + o_s).to(tl.int64)
        m_s = o_ss < s_end
        m = m_s[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_ss[:, None] * stride_ks + o_d[None, :] * stride_kd, mask=m, other=0.0)  # [BLOCK_S, BLOCK_D]
        b_v = tl.load(p_v + o_ss[:, None] * stride_vs + o_d[None, :] * stride_vd, mask=m, other=0.0)
        b_k = tl.maximum(b_k, 0.0)
        if IEEE:
            b_kv += tl.dot(tl.trans(b_k), b_v, input_precision="ieee")
        else:
            b_kv += tl.dot(tl.trans(b_k), b_v)
        b_z += tl.sum(b_k.to(tl.float32), 0)
    i_part = i_bh.to(tl.int64) * n_c + i_c
    tl.store(KV + i_part * BLOCK_D * BLOCK_D + o_d[:, None] * BLOCK_D + o_d[None, :], b_kv)
    tl.store(Z + i_part * BLOCK_D + o_d, b_z)


@triton.jit
def _linear_attention_out_kernel(
    Q, KV, Z, O,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_ob, stride_oh, stride_os,
    NH, S, D, eps,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    i_bh = tl.program_id(0)
    i_s = tl.program_id(1)
    i_b = (i_bh // NH).to(tl.int64)
    i_h = (i_bh % NH).to(tl.int64)
    o_s = (i_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m = (o_s < S)[:, None] & (o_d < D)[None, :]
    b_q = tl.load(
        Q + i_b * stride_qb + i_h * stride_qh + o_s[:, None] * stride_qs + o_d[None, :] * stride_qd, mask=m, other=0.0
    ).to(tl.float32)
    b_q = tl.maximum(b_q, 0.0)  # [BLOCK_S, BLOCK_D]
    base = i_bh.to(tl.int64)
    b_kv = tl.load(KV + base * BLOCK_D * BLOCK_D + o_d[:, None] * BLOCK_D + o_d[None, :])  # [BLOCK_D, BLOCK_D] fp32
    b_z = tl.load(Z + base * BLOCK_D + o_d)
    b_num = tl.dot(b_q, b_kv, input_precision="ieee")
    b_den = tl.sum(b_q * b_z[None, :], 1) + eps
    b_o = b_num / b_den[:, None]
    tl.store(O + i_b * stride_ob + i_h * stride_oh + o_s[:, None] * stride_os + o_d[None, :], b_o.to(O.dtype.element_ty),
             mask=m)  # fmt: skip


def _chunks(B: int, NH: int, S: int, block_s: int, on_gpu: bool) -> int:
    """Sequence chunks per head for the state pass: enough programs for ~2 waves on a 132-SM GPU (1 when
    interpreted: the interpreter pays per program)."""
    want = max(1, -(-264 // (B * NH))) if on_gpu else 2
    return max(1, min(want, triton.cdiv(S, block_s)))


def linear_attention_triton(q, k, v, *, eps: float) -> torch.Tensor:
    B, NH, S, D = q.shape
    S_kv = k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    block_s = 64 if block_d <= 64 else 32
    n_c = _chunks(B, NH, S_kv, block_s, q.is_cuda)
    chunk = triton.cdiv(triton.cdiv(S_kv, n_c), block_s) * block_s
    n_c = triton.cdiv(S_kv, chunk)
    kv = torch.empty(B * NH, n_c, block_d, block_d, dtype=torch.float32, device=q.device)
    z = torch.empty(B * NH, n_c, block_d, dtype=torch.float32, device=q.device)
    _linear_attention_state_kernel[(B * NH, n_c)](
        k, v, kv, z, *k.stride(), *v.stride(), NH, S_kv, D, chunk,
        BLOCK_S=block_s, BLOCK_D=block_d, IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    kv = kv.sum(1) if n_c > 1 else kv[:, 0]  # fixed-order reduction of the partial states
    z = z.sum(1) if n_c > 1 else z[:, 0]
    kv, z = kv.contiguous(), z.contiguous()
    out = torch.empty(B, NH, S, D, dtype=q.dtype, device=q.device)
    _linear_attention_out_kernel[(B * NH, triton.cdiv(S, block_s))](
        q, kv, z, out, *q.stride(), *out.stride()[:3], NH, S, D, eps,
        BLOCK_S=block_s, BLOCK_D=block_d,
    )  # fmt: skip
    return out
