"""Sana (``SanaTransformer2DModel``): ReLU linear self-attention through ditkern's kernel, adaLN fused in the blocks.

- ``Attention`` modules whose processor is ``SanaLinearAttnProcessor2_0`` get :class:`LinearAttnProcessor`: the same
  projections and (optional) QK-norm, then :func:`ditkern.ops.linear_attention` in place of the eager fp32 matmuls on a
  padded value tensor. Lossless like the fused norms (fp32 state), so it is on by default; undone by ``unpatch``.
  In auto mode where no fused linear-attention backend can run (a CPU), the processor is left as it is (report:
  ``NATIVE_REASON``, as ``adaln_plan`` does): the fp32 torch reference is never faster than diffusers' own eager
  processor there. Measured with the previous default (the reference installed, adaLN native), whole-model forwards,
  unpatched / patched CPU seconds, one thread on 2 shared cores, median of 7 in-process pairs in alternating order:
  0.86x fp32 / 0.88x bf16 on the tests' tiny model, 1.00x / 1.00x at width 512 (16 heads, 32x32 tokens).
  ``python -m bench.cpu_lossless --ab --pipeline tiny-sana [--wide] [--dtype bfloat16]`` times the default.
- ``SanaTransformerBlock``: ``norm1`` + the attention modulation fused (``adaln_modulate``), and the cross-attention
  residual add fused with ``norm2`` + the MLP modulation (``gated_residual_adaln`` without a gate). The gated
  self-attention residual is followed by cross-attention, not a norm, and the MLP residual ends the block, so those
  two stay as they are.

Stack: ``transformer_blocks``, image stream only (text through cross-attention). Windowed attention does not apply (the
self-attention is ReLU linear attention, which has no softmax over a token neighbourhood to restrict).
"""

from __future__ import annotations

import torch

from ditkern._backend import choose
from ditkern.ops.linear_attention import BACKENDS as LINEAR_BACKENDS
from ditkern.ops.linear_attention import linear_attention
from ditkern.patch.common import (
    BLOCK_WHAT, adaln_plan, check_fingerprint, has_attrs, modulate, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.engine import Plan, device_dtype
from ditkern.patch.family import COMMON_SKIP, SINGLE, Family, QuantLayout, Stack
from ditkern.patch.report import native_fallback

# source fingerprints (ditkern.patch.common.source_fingerprint) of the forwards mirrored here
FINGERPRINTS = {
    "SanaTransformerBlock": {"8fecb92cffa06a9f"},  # diffusers 0.42.1
}
LINEAR_WHAT = "linear attention fused (linear_attention)"


class LinearAttnProcessor:
    """Drop-in for ``SanaLinearAttnProcessor2_0``: ``relu(q) (relu(k)^T v) / (relu(q) . sum relu(k) + 1e-15)``."""

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # [B, S, heads * Dh] viewed as [B, heads, S, Dh]: no copy, the kernels take strides
        query, key, value = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))
        out = linear_attention(query, key, value, eps=1e-15, backend=self.backend)
        out = out.transpose(1, 2).flatten(2).to(dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


def sana_linear_attention_rule(attn, cfg):
    proc = getattr(attn, "processor", None)
    if type(proc).__name__ != "SanaLinearAttnProcessor2_0":
        return None  # cross-attention (SDPA) and anything else: not ours
    reason = has_attrs(attn, "to_q", "to_k", "to_v", "to_out", "heads", "norm_q", "norm_k")
    if reason:
        return reason
    backend = cfg.backend
    device, dtype = device_dtype(attn)
    head_dim = attn.to_q.out_features // attn.heads
    sample = torch.empty(1, attn.heads, 1, head_dim, device=device, dtype=dtype)
    native = native_fallback("linear_attention", LINEAR_BACKENDS, sample, backend)
    if native is not None:
        return native
    chosen = choose("linear_attention", LINEAR_BACKENDS, sample, backend=backend)
    saved = {}

    def apply(m):
        saved["processor"] = m.processor
        m.set_processor(LinearAttnProcessor(backend))

    def undo(m):
        m.set_processor(saved.pop("processor"))

    return Plan("linear_attention", LINEAR_WHAT, apply=apply, undo=undo, detail=f"{attn.heads} heads", backend=chosen)


def sana_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = (
        has_attrs(block, "norm1", "attn1", "norm2", "attn2", "ff", "scale_shift_table")
        or check_fingerprint(block, FINGERPRINTS["SanaTransformerBlock"])
        or next((s for s in (norm_spec(block.norm1), norm_spec(block.norm2)) if isinstance(s, str)), None)
    )
    if reason:
        return reason
    backend = cfg.backend

    def forward(block, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, height=None, width=None):  # fmt: skip
        batch_size = hidden_states.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + timestep.reshape(batch_size, 6, -1)
        ).chunk(6, dim=1)
        # Sana casts the modulated norm back to the stream's dtype: promote=False keeps x's dtype
        norm_hidden_states = modulate(block.norm1, hidden_states, shift_msa, scale_msa, backend, promote=False)
        attn_output = block.attn1(norm_hidden_states)
        hidden_states = hidden_states + gate_msa * attn_output
        if block.attn2 is not None:
            attn_output = block.attn2(
                hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask
            )
            # the residual add (no gate) with norm2 + MLP modulation, in one pass
            hidden_states, norm_hidden_states = residual_modulate(
                block.norm2, hidden_states, attn_output.to(hidden_states.dtype), None, shift_mlp, scale_mlp, backend
            )
        else:
            norm_hidden_states = modulate(block.norm2, hidden_states, shift_mlp, scale_mlp, backend)
        norm_hidden_states = norm_hidden_states.unflatten(1, (height, width)).permute(0, 3, 1, 2)
        ff_output = block.ff(norm_hidden_states)
        ff_output = ff_output.flatten(2, 3).permute(0, 2, 1)
        return hidden_states + gate_mlp * ff_output

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm2, cfg)


FAMILY = Family(
    name="sana",
    model_classes=("SanaTransformer2DModel",),
    rules={"SanaTransformerBlock": sana_block_rule, "Attention": sana_linear_attention_rule},
    stack=Stack(lists=("transformer_blocks",), blocks={"SanaTransformerBlock": SINGLE}),
    attention="its self-attention is ReLU linear attention (served by linear_attention), not softmax over a token grid",
    quant=QuantLayout(skip=(*COMMON_SKIP, "caption_projection*")),
    notes="the final SanaModulatedNorm lives in the model's forward and is not fused",
)
