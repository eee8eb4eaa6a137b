"""CogView4 (``CogView4Transformer2DModel``): adaLN modulation of both streams and the gated residuals fused.

- ``CogView4AdaLayerNormZero`` (``norm1``): ``linear(temb)`` (the model applies SiLU once, before the stack) -> 12
  chunks; ``layer_norm(x) * (1 + scale) + shift`` for the image and the text stream (``adaln_modulate``).
- ``CogView4TransformerBlock``: the gated attention residual fused with ``norm2`` / ``norm2_context`` + the MLP
  modulation, each stream (``gated_residual_adaln``).
- ``CogView4AdaLayerNormContinuous`` (``norm_out``, no SiLU): ``layer_norm(x) * (1 + scale) + shift``.

The final residual add of each block (after the shared feed-forward) ends the block and stays as it is.

Stack: ``transformer_blocks``, ``(hidden_states, encoder_hidden_states) -> (hidden_states, encoder_hidden_states)``
(note the order: image first, unlike FLUX); the model reads only the image stream after it. Attention: joint
self-attention, text first, the grid from the latent over ``patch_size``. With a text padding mask the processor
passes a dense mask to SDPA, which windowed attention refuses with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditkern.attention.processors import spatial_grid
from ditkern.patch.common import (
    BLOCK_WHAT, AdaLNNormRule, adaln_plan, check_fingerprint, has_attrs, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, Family, QuantLayout, Stack, Streams, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS

# block(hidden_states, encoder_hidden_states, ...) -> (hidden_states, encoder_hidden_states)
COGVIEW4_PAIR = Streams(
    takes=("hidden_states", "encoder_hidden_states"), returns=("hidden_states", "encoder_hidden_states")
)


@dataclass(frozen=True)
class _NoSiluRule(AdaLNNormRule):
    """An adaLN norm rule for CogView4's norms, whose ``linear`` reads the conditioning without a SiLU of its own."""

    def check(self, m):
        reason = has_attrs(m, "linear", "norm", *self.attrs) or check_fingerprint(m, FINGERPRINTS[type(m).__name__])
        for norm in (m.norm, *(getattr(m, a) for a in self.attrs)) if not reason else ():
            if isinstance(s := norm_spec(norm), str):
                return s
        return reason


def _cogview4_ada_layer_norm_zero(mod):
    def forward(module, hidden_states, encoder_hidden_states, temb):
        emb = module.linear(temb)
        (
            shift_msa, c_shift_msa, scale_msa, c_scale_msa, gate_msa, c_gate_msa,
            shift_mlp, c_shift_mlp, scale_mlp, c_scale_mlp, gate_mlp, c_gate_mlp,
        ) = emb.chunk(12, dim=1)  # fmt: skip
        hidden_states = mod(module.norm, hidden_states, shift_msa, scale_msa)
        encoder_hidden_states = mod(module.norm_context, encoder_hidden_states, c_shift_msa, c_scale_msa)
        return (
            hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp,
            encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp,
        )  # fmt: skip

    return forward


def _cogview4_ada_layer_norm_continuous(mod):
    def forward(module, x, conditioning_embedding):
        emb = module.linear(conditioning_embedding.to(x.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)
        return mod(module.norm, x, shift, scale)

    return forward


# feeds_linears=False: the processor concatenates text and image before the projections, so no FP8 form of either
# stream's output is what a linear reads
cogview4_norm1_rule = _NoSiluRule(_cogview4_ada_layer_norm_zero, attrs=("norm_context",), feeds_linears=False)
cogview4_norm_out_rule = _NoSiluRule(_cogview4_ada_layer_norm_continuous, feeds_linears=False)


def cogview4_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = (
        has_attrs(block, "norm1", "attn1", "norm2", "norm2_context", "ff")
        or check_fingerprint(block, FINGERPRINTS["CogView4TransformerBlock"])
        or next((s for s in (norm_spec(block.norm2), norm_spec(block.norm2_context)) if isinstance(s, str)), None)
    )
    if reason:
        return reason
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, temb=None, image_rotary_emb=None, attention_mask=None,
                attention_kwargs=None):  # fmt: skip
        (
            norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp,
            norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp,
        ) = block.norm1(hidden_states, encoder_hidden_states, temb)  # fmt: skip
        attn_hidden_states, attn_encoder_hidden_states = block.attn1(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
            attention_mask=attention_mask,
            **(attention_kwargs or {}),
        )
        # each stream: x + gate_msa * attn, then norm2 * (1 + scale_mlp) + shift_mlp, in one pass
        hidden_states, norm_hidden_states = residual_modulate(
            block.norm2, hidden_states, attn_hidden_states, gate_msa, shift_mlp, scale_mlp, backend
        )
        encoder_hidden_states, norm_encoder_hidden_states = residual_modulate(
            block.norm2_context, encoder_hidden_states, attn_encoder_hidden_states, c_gate_msa, c_shift_mlp,
            c_scale_mlp, backend,
        )  # fmt: skip
        ff_output = block.ff(norm_hidden_states)
        ff_output_context = block.ff(norm_encoder_hidden_states)
        hidden_states = hidden_states + ff_output * gate_mlp.unsqueeze(1)
        encoder_hidden_states = encoder_hidden_states + ff_output_context * c_gate_mlp.unsqueeze(1)
        return hidden_states, encoder_hidden_states

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm2, cfg)


FAMILY = Family(
    name="cogview4",
    model_classes=("CogView4Transformer2DModel",),
    rules={
        "CogView4TransformerBlock": cogview4_block_rule,
        "CogView4AdaLayerNormZero": cogview4_norm1_rule,
        "CogView4AdaLayerNormContinuous": cogview4_norm_out_rule,
    },
    stack=Stack(
        lists=("transformer_blocks",),
        blocks={"CogView4TransformerBlock": COGVIEW4_PAIR},
        reads_after=("hidden_states",),
    ),
    attention=TokenLayout(
        self_attention={"CogView4TransformerBlock": ("attn1",)},
        processors=frozenset({"CogView4AttnProcessor"}),
        text="first",
        grid=spatial_grid,
    ),
    quant=QuantLayout(skip=COMMON_SKIP),
    notes="the residual add after the feed-forward ends each block and is not fused",
)
