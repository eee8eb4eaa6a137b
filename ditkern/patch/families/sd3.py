"""SD3 / SD3.5 (``SD3Transformer2DModel``): joint blocks fused (incl. SD3.5 dual attention), adaLN norms fused.

The gated residual add that precedes ``norm2`` is fused with it: after the joint attention for SD3, after the
second (image-only) attention for SD3.5's dual-attention blocks. The context stream of a block that is not
``context_pre_only`` gets the same fusion.

Stack: the joint blocks, ``(hidden_states, encoder_hidden_states) -> (encoder_hidden_states, hidden_states)`` (the
last one returns None for the text stream); the model reads only the image stream after them. Attention: joint
sequences with the text last (``attn``), plus SD3.5's image-only ``attn2``; the grid is the latent's over the patch.
"""

from __future__ import annotations

from ditkern.attention.processors import spatial_grid
from ditkern.patch.common import (
    BLOCK_WHAT, NORM_RULES, adaln_plan, check_fingerprint, chunked_ff, has_attrs, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, PAIR, Family, QuantLayout, Stack, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS


def joint_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = (
        has_attrs(block, "norm1", "norm1_context", "attn", "attn2", "norm2", "ff", "context_pre_only")
        or check_fingerprint(block, FINGERPRINTS["JointTransformerBlock"])
        or (s if isinstance(s := norm_spec(block.norm2), str) else None)
    )
    if reason:
        return reason
    if not block.context_pre_only and isinstance(s := norm_spec(block.norm2_context), str):
        return s
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        joint_attention_kwargs = joint_attention_kwargs or {}
        if block.use_dual_attention:
            norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2, gate_msa2 = block.norm1(
                hidden_states, emb=temb
            )
        else:
            norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
        if block.context_pre_only:
            norm_encoder_hidden_states = block.norm1_context(encoder_hidden_states, temb)
        else:
            norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
                encoder_hidden_states, emb=temb
            )
        attn_output, context_attn_output = block.attn(
            hidden_states=norm_hidden_states, encoder_hidden_states=norm_encoder_hidden_states, **joint_attention_kwargs
        )
        if block.use_dual_attention:
            hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
            y, gate = block.attn2(hidden_states=norm_hidden_states2, **joint_attention_kwargs), gate_msa2
        else:
            y, gate = attn_output, gate_msa
        hidden_states, norm_hidden_states = residual_modulate(
            block.norm2, hidden_states, y, gate, shift_mlp, scale_mlp, backend
        )
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * chunked_ff(block, block.ff, norm_hidden_states)

        if block.context_pre_only:
            return None, hidden_states
        encoder_hidden_states, norm_encoder_hidden_states = residual_modulate(
            block.norm2_context, encoder_hidden_states, context_attn_output, c_gate_msa, c_shift_mlp, c_scale_mlp, backend
        )
        context_ff_output = chunked_ff(block, block.ff_context, norm_encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        return encoder_hidden_states, hidden_states

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm2, cfg)


FAMILY = Family(
    name="sd3",
    model_classes=("SD3Transformer2DModel",),
    rules={"JointTransformerBlock": joint_block_rule, **NORM_RULES},
    stack=Stack(lists=("transformer_blocks",), blocks={"JointTransformerBlock": PAIR}, reads_after=("hidden_states",)),
    attention=TokenLayout(
        self_attention={"JointTransformerBlock": ("attn", "attn2")},  # attn2: SD3.5's image-only dual attention
        processors=frozenset({"JointAttnProcessor2_0"}),
        text="last",
        grid=spatial_grid,
    ),
    quant=QuantLayout(skip=COMMON_SKIP),
)
