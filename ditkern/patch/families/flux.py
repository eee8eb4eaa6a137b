"""FLUX (``FluxTransformer2DModel``): double-stream blocks fused, single-stream and final adaLN norms fused.

In a double-stream block the gated residual add after attention is fused with ``norm2`` + the MLP modulation, for
the image and the text stream. Single-stream blocks end in ``residual + gate * proj_out(...)`` with no norm after
it inside the block, so only their ``AdaLayerNormZeroSingle`` is fused.

Stack: the double-stream blocks, then the single-stream blocks, both ``(hidden_states, encoder_hidden_states) ->
(encoder_hidden_states, hidden_states)``; the model reads only the image stream after them. Attention: joint
text-first sequences, the image grid read from ``img_ids``.
"""

from __future__ import annotations

import torch

from ditkern.attention.processors import flux_grid
from ditkern.patch.common import (
    BLOCK_WHAT, NORM_RULES, adaln_plan, check_fingerprint, has_attrs, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, PAIR, Family, QuantLayout, Stack, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS


def flux_double_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = (
        has_attrs(block, "norm1", "norm1_context", "attn", "norm2", "ff", "norm2_context", "ff_context")
        or check_fingerprint(block, FINGERPRINTS["FluxTransformerBlock"])
        or next((s for s in (norm_spec(block.norm2), norm_spec(block.norm2_context)) if isinstance(s, str)), None)
    )
    if reason:
        return reason
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            encoder_hidden_states, emb=temb
        )
        attention_outputs = block.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
            **(joint_attention_kwargs or {}),
        )
        attn_output, context_attn_output = attention_outputs[0], attention_outputs[1]

        # image stream: x + gate_msa * attn, then norm2 * (1 + scale_mlp) + shift_mlp, in one pass
        hidden_states, norm_hidden_states = residual_modulate(
            block.norm2, hidden_states, attn_output, gate_msa, shift_mlp, scale_mlp, backend
        )
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * block.ff(norm_hidden_states)
        if len(attention_outputs) == 3:  # IP-adapter output
            hidden_states = hidden_states + attention_outputs[2]

        # text stream, likewise
        encoder_hidden_states, norm_encoder_hidden_states = residual_modulate(
            block.norm2_context, encoder_hidden_states, context_attn_output, c_gate_msa, c_shift_mlp, c_scale_mlp, backend
        )
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * block.ff_context(
            norm_encoder_hidden_states
        )
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm2, cfg)


FAMILY = Family(
    name="flux",
    model_classes=("FluxTransformer2DModel",),
    rules={"FluxTransformerBlock": flux_double_block_rule, **NORM_RULES},
    stack=Stack(
        lists=("transformer_blocks", "single_transformer_blocks"),
        blocks={"FluxTransformerBlock": PAIR, "FluxSingleTransformerBlock": PAIR},
        reads_after=("hidden_states",),
    ),
    attention=TokenLayout(
        self_attention={"FluxTransformerBlock": ("attn",), "FluxSingleTransformerBlock": ("attn",)},
        processors=frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0"}),
        text="first",
        grid=flux_grid,
    ),
    quant=QuantLayout(skip=COMMON_SKIP),
)
