"""FLUX.2 (``Flux2Transformer2DModel``): double-stream blocks fused, single-stream norms fused, final adaLN fused.

FLUX.2 computes its modulation once per model call (``double_stream_modulation_img`` / ``_txt``,
``single_stream_modulation``: ``linear(silu(temb))``, shared by every block) and hands each block the raw
``[B, 6D]`` / ``[B, 3D]`` tensor, which the block splits with ``Flux2Modulation.split``; its norms are plain
``nn.LayerNorm`` without affine parameters. So the fusions live in the block rules:

* ``Flux2TransformerBlock``: ``norm1`` / ``norm1_context`` + modulate (``adaln_modulate``), and the gated attention
  residual fused with ``norm2`` / ``norm2_context`` + the MLP modulation (``gated_residual_adaln``), image and text
  stream. Per-token modulation (the KV-cache "extract" mode blends reference-image modulations, ``[B, S, 6D]``) is
  read as strided views.
* ``Flux2SingleTransformerBlock``: ``norm`` + modulate; its residual ``x + gate * attn(...)`` has no norm after it
  inside the block, so nothing else is fused (as in FLUX.1's single-stream blocks).
* ``AdaLayerNormContinuous`` (``norm_out``): the shared rule.

The modulation split is diffusers' own ``Flux2Modulation.split`` (looked up at patch time), so only the block forwards
are mirrored (fingerprinted).

Stack: the double-stream blocks (``(hidden_states, encoder_hidden_states) -> (encoder_hidden_states, hidden_states)``),
then the single-stream blocks, which the model calls with the text already concatenated in front of the image
(``hidden_states`` only, ``encoder_hidden_states=None``). Between the two lists the model's forward concatenates the
streams (and cuts the text off after the last block), so the stack is not one chain; the single-stream list is, and the
Taylor cache forecasts across it (``cached``) while the double blocks always run. Attention: joint text-first sequences
(the double-stream ``attn`` and the parallel single-stream ``attn``), the image grid read from ``img_ids`` (``(t, h, w,
l)``: columns 1 and 2 are the row and column, as FLUX.1's). The KV-cache processors (reference images) are not windowed.
"""

from __future__ import annotations

import os
import sys

import torch

from ditkern.attention.processors import flux_grid
from ditkern.patch.common import (
    ADALN_WHAT, BLOCK_WHAT, NORM_RULES, adaln_plan, check_fingerprint, has_attrs, modulate, norm_spec,
    residual_modulate, source_fingerprint,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, PAIR, SINGLE, Family, QuantLayout, Stack, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS


def _split_of(block):
    """diffusers' ``Flux2Modulation.split`` from the block's own module, or the reason it is not the validated one."""
    mod = getattr(sys.modules.get(type(block).__module__), "Flux2Modulation", None)
    split = getattr(mod, "split", None)
    if split is None:
        return f"{type(block).__module__} has no Flux2Modulation.split"
    fp = source_fingerprint(split)
    if fp not in FINGERPRINTS["Flux2Modulation.split"] and os.environ.get("DITKERN_TRUST_BLOCK_SOURCE", "0") != "1":
        return (
            f"Flux2Modulation.split of the installed diffusers (fingerprint {fp}) differs from the version ditkern's "
            "fused blocks read; left unpatched (DITKERN_TRUST_BLOCK_SOURCE=1 patches anyway)"
        )
    return split


def _block_reason(block, *names: str) -> str | None:
    reason = has_attrs(block, *names) or check_fingerprint(block, FINGERPRINTS[type(block).__name__])
    if reason:
        return reason
    return next((s for n in names if n.startswith("norm") and isinstance(s := norm_spec(getattr(block, n)), str)), None)


def flux2_double_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = _block_reason(block, "norm1", "norm1_context", "attn", "norm2", "ff", "norm2_context", "ff_context")
    split = reason or _split_of(block)
    if isinstance(split, str):
        return split
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, image_rotary_emb=None,
                joint_attention_kwargs=None):  # fmt: skip
        joint_attention_kwargs = joint_attention_kwargs or {}
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = split(temb_mod_img, 2)
        (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = split(temb_mod_txt, 2)

        norm_hidden_states = modulate(block.norm1, hidden_states, shift_msa, scale_msa, backend)
        norm_encoder_hidden_states = modulate(block.norm1_context, encoder_hidden_states, c_shift_msa, c_scale_msa,
                                              backend)  # fmt: skip
        attn_output, context_attn_output = block.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
            **joint_attention_kwargs,
        )

        # image stream: x + gate_msa * attn, then norm2 * (1 + scale_mlp) + shift_mlp, in one pass
        hidden_states, norm_hidden_states = residual_modulate(
            block.norm2, hidden_states, attn_output, gate_msa, shift_mlp, scale_mlp, backend
        )
        hidden_states = hidden_states + gate_mlp * block.ff(norm_hidden_states)

        # text stream, likewise
        encoder_hidden_states, norm_encoder_hidden_states = residual_modulate(
            block.norm2_context, encoder_hidden_states, context_attn_output, c_gate_msa, c_shift_mlp, c_scale_mlp,
            backend,
        )  # fmt: skip
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp * block.ff_context(norm_encoder_hidden_states)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm2, cfg)


def flux2_single_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = _block_reason(block, "norm", "attn")
    split = reason or _split_of(block)
    if isinstance(split, str):
        return split
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb=None,
                joint_attention_kwargs=None, split_hidden_states=False, text_seq_len=None):  # fmt: skip
        if encoder_hidden_states is not None:
            text_seq_len = encoder_hidden_states.shape[1]
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        mod_shift, mod_scale, mod_gate = split(temb_mod, 1)[0]
        norm_hidden_states = modulate(block.norm, hidden_states, mod_shift, mod_scale, backend)
        joint_attention_kwargs = joint_attention_kwargs or {}
        attn_output = block.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                 **joint_attention_kwargs)  # fmt: skip
        hidden_states = hidden_states + mod_gate * attn_output
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        if split_hidden_states:
            return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
        return hidden_states

    return adaln_plan("adaln", ADALN_WHAT, forward, block, block.norm, cfg)


FAMILY = Family(
    name="flux2",
    model_classes=("Flux2Transformer2DModel",),
    rules={
        "Flux2TransformerBlock": flux2_double_block_rule,
        "Flux2SingleTransformerBlock": flux2_single_block_rule,
        "AdaLayerNormContinuous": NORM_RULES["AdaLayerNormContinuous"],
    },
    stack=Stack(
        lists=("transformer_blocks", "single_transformer_blocks"),
        # the model calls the single-stream blocks with the text concatenated into hidden_states
        blocks={"Flux2TransformerBlock": PAIR, "Flux2SingleTransformerBlock": SINGLE},
        # the model concatenates text and image between the two lists and cuts the text off after the single
        # blocks, so the whole stack is not one chain; the single-stream list is (called with hidden_states = the
        # text-first joint sequence, encoder_hidden_states=None, returning the joint sequence): the cache skips it
        # and the double blocks always run
        cached=("single_transformer_blocks",),
        reads_after=("hidden_states",),
        # the KV-cache modes change the joint sequence (reference tokens) and fill a cache from every block
        uncached_if=("kv_cache",),
    ),
    attention=TokenLayout(
        self_attention={"Flux2TransformerBlock": ("attn",), "Flux2SingleTransformerBlock": ("attn",)},
        processors=frozenset({"Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"}),
        text="first",
        grid=flux_grid,
    ),
    # the three model-level modulations feed every block: kept in high precision, like other families' edge norms
    quant=QuantLayout(skip=(*COMMON_SKIP, "*_modulation*")),
    notes="single-stream blocks: only norm + modulate (the residual has no norm after it in the block); the "
    "model-level modulation linears are not fused (plain Linear, shared by all blocks)",
)
