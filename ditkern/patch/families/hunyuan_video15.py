"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): dual-stream blocks fused, adaLN norms fused.

``HunyuanVideo15TransformerBlock`` has FLUX's double-stream structure: ``AdaLayerNormZero`` for each stream (fused by the
shared norm rule), joint attention, then per stream the gated attention residual + ``norm2`` + the MLP modulation (fused,
``gated_residual_adaln``). The final ``AdaLayerNormContinuous`` is fused too. The text token refiner
(``context_embedder``: its own ``HunyuanVideo15AdaNorm`` gating, no norm after a gated residual) is left as it is.

Stack: ``transformer_blocks``, ``(hidden_states, encoder_hidden_states) -> (hidden_states, encoder_hidden_states)`` (the
image stream first, unlike FLUX); the model reads the image stream after it. Windowed attention does not apply:
``HunyuanVideo15AttnProcessor2_0`` passes a boolean ``[B, 1, S, S]`` padding mask to every attention call, and ditkern's
window attention takes text padding only as ``text_mask`` ``[B, T]``, not from a general mask.
"""

from __future__ import annotations

from ditkern.patch.common import (
    BLOCK_WHAT, NORM_RULES, adaln_backend, check_fingerprint, has_attrs, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.engine import Plan
from ditkern.patch.family import COMMON_SKIP, Family, QuantLayout, Stack, Streams
from ditkern.patch.fingerprints import FINGERPRINTS

IMAGE_TEXT = Streams(takes=("hidden_states", "encoder_hidden_states"), returns=("hidden_states", "encoder_hidden_states"))
"""``block(hidden_states, encoder_hidden_states, ...) -> (hidden_states, encoder_hidden_states)``"""


def hunyuan_video15_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = (
        has_attrs(block, "norm1", "norm1_context", "attn", "norm2", "ff", "norm2_context", "ff_context")
        or check_fingerprint(block, FINGERPRINTS["HunyuanVideo15TransformerBlock"])
        or next((s for s in (norm_spec(block.norm2), norm_spec(block.norm2_context)) if isinstance(s, str)), None)
    )
    if reason:
        return reason
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, temb, attention_mask=None, freqs_cis=None, *args,
                **kwargs):  # fmt: skip
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            encoder_hidden_states, emb=temb
        )
        attn_output, context_attn_output = block.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            attention_mask=attention_mask,
            image_rotary_emb=freqs_cis,
        )
        # per stream: x + gate_msa * attn, then norm2 * (1 + scale_mlp) + shift_mlp, in one pass
        hidden_states, norm_hidden_states = residual_modulate(
            block.norm2, hidden_states, attn_output, gate_msa, shift_mlp, scale_mlp, backend
        )
        encoder_hidden_states, norm_encoder_hidden_states = residual_modulate(
            block.norm2_context, encoder_hidden_states, context_attn_output, c_gate_msa, c_shift_mlp, c_scale_mlp,
            backend,
        )  # fmt: skip
        ff_output = block.ff(norm_hidden_states)
        context_ff_output = block.ff_context(norm_encoder_hidden_states)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        return hidden_states, encoder_hidden_states

    return Plan("block", BLOCK_WHAT, forward, backend=adaln_backend(block, block.norm2, cfg))


FAMILY = Family(
    name="hunyuan_video15",
    model_classes=("HunyuanVideo15Transformer3DModel",),
    rules={
        "HunyuanVideo15TransformerBlock": hunyuan_video15_block_rule,
        "AdaLayerNormZero": NORM_RULES["AdaLayerNormZero"],
        "AdaLayerNormContinuous": NORM_RULES["AdaLayerNormContinuous"],
    },
    stack=Stack(
        lists=("transformer_blocks",),
        blocks={"HunyuanVideo15TransformerBlock": IMAGE_TEXT},
        reads_after=("hidden_states",),
    ),
    attention="HunyuanVideo15AttnProcessor2_0 passes a boolean [B, 1, S, S] padding mask to every attention call; "
    "ditkern's window attention takes text padding only as text_mask [B, T], not from a general mask",
    quant=QuantLayout(skip=COMMON_SKIP),
    notes="the token refiner (context_embedder) is not fused; windowed attention is not declared (masked SDPA)",
)
