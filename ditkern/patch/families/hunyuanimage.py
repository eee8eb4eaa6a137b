"""HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``): dual-stream blocks fused, adaLN norms fused.

``HunyuanImageTransformerBlock`` (dual stream): ``AdaLayerNormZero`` for each stream (the shared norm rule), joint
attention, then per stream the gated attention residual + ``norm2`` / ``norm2_context`` + the MLP modulation, fused
(``gated_residual_adaln``). ``HunyuanImageSingleTransformerBlock``: its ``AdaLayerNormZeroSingle`` is fused; the block
ends in ``residual + gate * proj_out(...)`` with no norm after it, so the block itself stays as it is. The final
``AdaLayerNormContinuous`` is fused. The text token refiner (``context_embedder``, its own ``HunyuanImageAdaNorm``
gating, no norm after a gated residual) is left as it is.

Stack: the dual-stream, then the single-stream blocks, all ``(hidden_states, encoder_hidden_states) ->
(hidden_states, encoder_hidden_states)`` (the single blocks concatenate and split the streams inside), so the two lists
are one chain; the model reads the image stream after it. Windowed attention does not apply: the model always passes
the text padding mask to SDPA (``attention_mask`` ``[B, 1, 1, S]``), which ditkern's window attention does not take.
"""

from __future__ import annotations

from ditkern.patch.common import (
    BLOCK_WHAT, NORM_RULES, adaln_backend, check_fingerprint, has_attrs, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.engine import Plan
from ditkern.patch.family import COMMON_SKIP, Family, QuantLayout, Stack, Streams
from ditkern.patch.fingerprints import FINGERPRINTS

IMAGE_TEXT = Streams(
    takes=("hidden_states", "encoder_hidden_states"), returns=("hidden_states", "encoder_hidden_states")
)
"""``block(hidden_states, encoder_hidden_states, temb, ...) -> (hidden_states, encoder_hidden_states)``"""


def hunyuanimage_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = (
        has_attrs(block, "norm1", "norm1_context", "attn", "norm2", "ff", "norm2_context", "ff_context")
        or check_fingerprint(block, FINGERPRINTS["HunyuanImageTransformerBlock"])
        or next((s for s in (norm_spec(block.norm2), norm_spec(block.norm2_context)) if isinstance(s, str)), None)
    )
    if reason:
        return reason
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None, *args,
                **kwargs):  # fmt: skip
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            encoder_hidden_states, emb=temb
        )
        attn_output, context_attn_output = block.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb,
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
    name="hunyuanimage",
    model_classes=("HunyuanImageTransformer2DModel",),
    rules={
        "HunyuanImageTransformerBlock": hunyuanimage_block_rule,
        "AdaLayerNormZero": NORM_RULES["AdaLayerNormZero"],
        "AdaLayerNormZeroSingle": NORM_RULES["AdaLayerNormZeroSingle"],
        "AdaLayerNormContinuous": NORM_RULES["AdaLayerNormContinuous"],
    },
    stack=Stack(
        lists=("transformer_blocks", "single_transformer_blocks"),
        blocks={"HunyuanImageTransformerBlock": IMAGE_TEXT, "HunyuanImageSingleTransformerBlock": IMAGE_TEXT},
        reads_after=("hidden_states",),
    ),
    attention="the model always passes the text padding mask to SDPA ([B, 1, 1, S] attention_mask); ditkern's window "
    "attention takes no general mask",
    quant=QuantLayout(skip=COMMON_SKIP),
    notes="single-stream blocks end in a gated residual with no norm after it (only their AdaLayerNormZeroSingle is "
    "fused); the token refiner (context_embedder) is not fused",
)
