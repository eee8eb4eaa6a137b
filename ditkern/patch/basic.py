"""``BasicTransformerBlock`` with adaLN modulation (DiT's ``ada_norm_zero``, PixArt's ``ada_norm_single``).

Shared by the DiT and PixArt families (``ditkern/patch/families/dit.py``, ``pixart.py``). The residual add that precedes the feed-forward norm is fused with that norm
and the MLP modulation: the gated self-attention add for DiT (no cross-attention), the cross-attention add for
PixArt. Other norm types carry no modulation and are left alone (reported as skipped).
"""

from __future__ import annotations

from ditkern.attention.processors import spatial_grid
from ditkern.patch.common import (
    BLOCK_WHAT, adaln_plan, check_fingerprint, chunked_ff, has_attrs, modulate, norm_spec, residual_modulate,
)
from ditkern.patch.family import SINGLE, Stack, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS

# a model of BasicTransformerBlocks (DiT, PixArt): one stack of image-stream blocks whose attn1 is self-attention
# over the latent's token grid (attn2, where present, is cross-attention to the text and stays dense)
STACK = Stack(lists=("transformer_blocks",), blocks={"BasicTransformerBlock": SINGLE})
TOKENS = TokenLayout(
    self_attention={"BasicTransformerBlock": ("attn1",)},
    processors=frozenset({"AttnProcessor2_0"}),
    text="first",
    grid=spatial_grid,
)


def basic_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    nt = getattr(block, "norm_type", None)
    if nt not in ("ada_norm_zero", "ada_norm_single"):
        return f"norm_type {nt!r} has no adaLN-Zero modulation to fuse"
    reason = has_attrs(block, "norm1", "attn1", "attn2", "ff", "pos_embed", "only_cross_attention") or check_fingerprint(
        block, FINGERPRINTS["BasicTransformerBlock"]
    )
    if reason:
        return reason
    if block.pos_embed is not None:
        return "a positional embedding inside the block (pos_embed) is not fused"
    ff_norm = block.norm3 if nt == "ada_norm_zero" else block.norm2
    if isinstance(s := norm_spec(ff_norm), str):
        return s
    if nt == "ada_norm_single" and isinstance(s := norm_spec(block.norm1), str):
        return s
    backend = cfg.backend
    zero = nt == "ada_norm_zero"
    original = type(block).forward

    def forward(
        block,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        timestep=None,
        cross_attention_kwargs=None,
        class_labels=None,
        added_cond_kwargs=None,
    ):
        cross_attention_kwargs = dict(cross_attention_kwargs or {})
        if "gligen" in cross_attention_kwargs or hidden_states.ndim != 3:
            # GLIGEN's fuser sits between the residual and the next norm: run the unfused original
            return original(
                block, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep,
                cross_attention_kwargs, class_labels, added_cond_kwargs,
            )  # fmt: skip
        cross_attention_kwargs.pop("scale", None)
        if zero:
            norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(
                hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype
            )
        else:
            batch_size = hidden_states.shape[0]
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                block.scale_shift_table[None] + timestep.reshape(batch_size, 6, -1)
            ).chunk(6, dim=1)
            norm_hidden_states = modulate(block.norm1, hidden_states, shift_msa, scale_msa, backend)

        attn_output = block.attn1(
            norm_hidden_states,
            encoder_hidden_states=encoder_hidden_states if block.only_cross_attention else None,
            attention_mask=attention_mask,
            **cross_attention_kwargs,
        )
        if block.attn2 is not None:
            hidden_states = hidden_states + (gate_msa.unsqueeze(1) if zero else gate_msa) * attn_output
            norm_hidden_states = block.norm2(hidden_states) if zero else hidden_states  # PixArt: no norm here
            y = block.attn2(
                norm_hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                **cross_attention_kwargs,
            )
            gate = None
        else:
            y, gate = attn_output, gate_msa
        hidden_states, norm_hidden_states = residual_modulate(
            block.norm3 if zero else block.norm2, hidden_states, y, gate, shift_mlp, scale_mlp, backend
        )
        ff_output = chunked_ff(block, block.ff, norm_hidden_states)
        return hidden_states + (gate_mlp.unsqueeze(1) if zero else gate_mlp) * ff_output

    return adaln_plan("block", BLOCK_WHAT, forward, block, ff_norm, cfg)
