"""Chroma (``ChromaTransformer2DModel``): FLUX.1's blocks with "pruned" adaLN norms; double-stream blocks fused,
every adaLN norm fused.

Chroma drops FLUX's per-block modulation linears: one approximator (``distilled_guidance_layer``) computes every
modulation of the model at once and the model hands each block its slice (``[B, 6 or 12 or 3, D]``). So its norms
(``ChromaAdaLayerNormZeroPruned``, ``...SinglePruned``, ``...ContinuousPruned``) have no ``linear`` / ``silu``: they
chunk the slice they get and compute ``norm(x) * (1 + scale) + shift``. Their rules are the shared adaLN rules
(``common.AdaLNNormRule``, so the FP8-emitting variant of the quant feature applies too) with the pruned forward and a
check without the linear. ``ChromaTransformerBlock`` fuses the gated attention residual with ``norm2`` /
``norm2_context`` + the MLP modulation, image and text stream, as FLUX's double-stream rule; single-stream blocks end
in ``residual + gate * proj_out(...)`` with no norm after it, so only their norm is fused.

Stack: the double-stream blocks, then the single-stream blocks, which the model calls on the text-first concatenation
(``hidden_states`` only). The model concatenates the streams between the two lists and cuts the text off after them, so
the stack is not one chain: the Taylor cache forecasts across the single-stream list alone (``cached``).

Windowed attention: both block kinds' ``attn`` (``FluxAttnProcessor``, text first, the grid from ``img_ids``). The model
takes ``attention_mask [B, T + H*W]`` and every block passes ``m[:, None, None, :] * m[:, None, :, None]`` to SDPA. A
boolean mask (text valid or padded, image tokens valid) is that outer product: every image query's row is the text
key-padding mask, which becomes the window op's ``text_mask``; the rows of padded text queries are all masked (SDPA
returns zeros) while the op lets them attend to the valid keys, and the model cuts the text tokens off after the
single-stream blocks. Any other mask is refused at call time (``processors.text_key_mask``), among them the float
mask ChromaPipeline builds (the T5 mask in the text encoder's dtype, concatenated with boolean ones: a float 0/1
mask, which SDPA adds to the scores as a bias rather than masking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditkern.attention.processors import accepts_text_padding, flux_grid
from ditkern.patch.common import (
    BLOCK_WHAT, AdaLNNormRule, Modulate, adaln_plan, check_fingerprint, has_attrs, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, PAIR, SINGLE, Family, QuantLayout, Stack, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS


@dataclass(frozen=True)
class PrunedNormRule(AdaLNNormRule):
    """An adaLN rule for a norm that receives its modulation (no ``linear`` / ``silu`` of its own)."""

    def check(self, m) -> str | None:
        reason = has_attrs(m, "norm", *self.attrs)
        if reason:
            return reason
        spec = norm_spec(m.norm)
        return spec if isinstance(spec, str) else check_fingerprint(m, FINGERPRINTS[type(m).__name__])


def _zero_pruned(mod: Modulate):
    """``ChromaAdaLayerNormZeroPruned``: ``emb [B, 6, D]`` flattened and chunked into six ``[B, D]``."""

    def forward(module, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        if module.emb is not None:
            emb = module.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.flatten(1, 2).chunk(6, dim=1)
        return mod(module.norm, x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp

    return forward


def _zero_single_pruned(mod: Modulate):
    """``ChromaAdaLayerNormZeroSinglePruned``: three chunks."""

    def forward(module, x, emb=None):
        shift_msa, scale_msa, gate_msa = emb.flatten(1, 2).chunk(3, dim=1)
        return mod(module.norm, x, shift_msa, scale_msa), gate_msa

    return forward


def _continuous_pruned(mod: Modulate):
    """``ChromaAdaLayerNormContinuousPruned`` (``norm_out``): ``(shift, scale)``, in that order (unlike
    ``AdaLayerNormContinuous``), cast to x's dtype."""

    def forward(module, x, emb):
        shift, scale = torch.chunk(emb.flatten(1, 2).to(x.dtype), 2, dim=1)
        return mod(module.norm, x, shift, scale)

    return forward


def chroma_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = has_attrs(block, "norm1", "norm1_context", "attn", "norm2", "ff", "norm2_context", "ff_context") or (
        check_fingerprint(block, FINGERPRINTS["ChromaTransformerBlock"])
    )
    if reason:
        return reason
    if s := next((s for s in (norm_spec(block.norm2), norm_spec(block.norm2_context)) if isinstance(s, str)), None):
        return s
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_mask=None,
                joint_attention_kwargs=None):  # fmt: skip
        temb_img, temb_txt = temb[:, :6], temb[:, 6:]
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb_img)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            encoder_hidden_states, emb=temb_txt
        )
        joint_attention_kwargs = joint_attention_kwargs or {}
        if attention_mask is not None:
            attention_mask = attention_mask[:, None, None, :] * attention_mask[:, None, :, None]
        attention_outputs = block.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
            attention_mask=attention_mask,
            **joint_attention_kwargs,
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
            block.norm2_context, encoder_hidden_states, context_attn_output, c_gate_msa, c_shift_mlp, c_scale_mlp,
            backend,
        )  # fmt: skip
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * block.ff_context(
            norm_encoder_hidden_states
        )
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm2, cfg)


FAMILY = Family(
    name="chroma",
    model_classes=("ChromaTransformer2DModel",),
    rules={
        "ChromaTransformerBlock": chroma_block_rule,
        "ChromaAdaLayerNormZeroPruned": PrunedNormRule(_zero_pruned, attrs=("emb",)),
        "ChromaAdaLayerNormZeroSinglePruned": PrunedNormRule(_zero_single_pruned),
        "ChromaAdaLayerNormContinuousPruned": PrunedNormRule(_continuous_pruned, feeds_linears=False),
    },
    stack=Stack(
        lists=("transformer_blocks", "single_transformer_blocks"),
        # the model calls the single-stream blocks on the text-first concatenation
        blocks={"ChromaTransformerBlock": PAIR, "ChromaSingleTransformerBlock": SINGLE},
        # text and image are concatenated between the two lists (the stack is not one chain); the single-stream
        # list is one chain over the joint sequence (hidden_states in, hidden_states out): the cache skips it, the
        # double blocks always run
        cached=("single_transformer_blocks",),
        reads_after=("hidden_states",),
        # ControlNet samples are added to the image tokens between the single blocks
        uncached_if=("controlnet_single_block_samples",),
    ),
    # the blocks' SDPA masks: the outer product of the text padding mask (boolean), taken as text_mask
    attention=TokenLayout(
        self_attention={"ChromaTransformerBlock": ("attn",), "ChromaSingleTransformerBlock": ("attn",)},
        processors=frozenset({"FluxAttnProcessor", "FluxAttnProcessor2_0"}),
        text="first",
        grid=accepts_text_padding(flux_grid),
    ),
    # the approximator computes every modulation of the model: kept in high precision
    quant=QuantLayout(skip=(*COMMON_SKIP, "distilled_guidance_layer*")),
    notes="single-stream blocks: only the norm is fused (the residual has no norm after it in the block); the "
    "approximator (distilled_guidance_layer) is not fused",
)
