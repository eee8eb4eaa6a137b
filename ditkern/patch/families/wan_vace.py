"""Wan VACE (``WanVACETransformer3DModel``): the Wan blocks and the VACE control blocks fused.

- ``WanTransformerBlock`` (``blocks``): Wan's own rule (``ditkern/patch/families/wan.py``).
- ``WanVACETransformerBlock`` (``vace_blocks``): the same three fusions on the control stream - norm1 + modulate, the
  gated self-attention residual + norm2 (affine, unmodulated; skipped when norm2 is an Identity), the cross-attention
  residual + norm3 + modulate - with its input projection (first VACE block) and the hint projection ``proj_out``
  kept as diffusers computes them. Modulation in fp32 beside the stream, as in Wan.

Stack: ``blocks`` (image stream only). The model's forward adds a VACE hint to the image stream after each block of
``vace_layers``, between the blocks, so the whole stack is not one chain; the blocks after the last hint are, and the
Taylor cache skips those (Wan2.1-VACE-14B: blocks 36-39 of 40; the blocks up to the last hint always run). The VACE
blocks take (hidden_states, encoder_hidden_states, control_hidden_states) and return a new hint beside the control
stream, which no stream signature expresses; they are outside the stack, so windowed attention covers the ``attn1`` of
``blocks`` only (the VACE blocks' self-attention stays dense). Quant: also keeps the VACE input/hint projections
(``proj_in``, ``proj_out`` of each VACE block: the hint enters the image stream unnormalised).
"""

from __future__ import annotations

from torch import nn

from ditkern.attention.processors import spatial_grid
from ditkern.patch.common import (
    BLOCK_WHAT, adaln_plan, check_fingerprint, has_attrs, modulate, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.families.wan import wan_block_rule
from ditkern.patch.family import COMMON_SKIP, SINGLE, Family, QuantLayout, Stack, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS


def after_last_hint(model, blocks):
    """The cached chain: the blocks after the last VACE hint (``blocks.{max(vace_layers) + 1}`` on)."""
    last = max(model.config.vace_layers)
    if len(blocks) - (last + 1) < 2:
        return (
            f"the model's forward adds a VACE control hint to the image stream after each block of vace_layers; the "
            f"last hint follows block {last} of {len(blocks)}, leaving fewer than two blocks after it as one chain"
        )
    return blocks[last + 1 :]


def wan_vace_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = has_attrs(block, "proj_in", "norm1", "attn1", "norm2", "attn2", "norm3", "ffn", "proj_out",
                       "scale_shift_table") or check_fingerprint(block, FINGERPRINTS["WanVACETransformerBlock"])  # fmt: skip
    if reason:
        return reason
    for norm in (block.norm1, block.norm3) + (() if isinstance(block.norm2, nn.Identity) else (block.norm2,)):
        if isinstance(s := norm_spec(norm), str):
            return s
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, control_hidden_states, temb, rotary_emb):
        if block.proj_in is not None:
            control_hidden_states = block.proj_in(control_hidden_states)
            control_hidden_states = control_hidden_states + hidden_states
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            block.scale_shift_table.to(temb.device) + temb.float()
        ).chunk(6, dim=1)
        x = control_hidden_states
        dtype = x.dtype

        norm_hidden_states = modulate(block.norm1, x, shift_msa, scale_msa, backend, promote=False)
        attn_output = block.attn1(norm_hidden_states, None, None, rotary_emb)
        if isinstance(block.norm2, nn.Identity):
            x = (x.float() + attn_output * gate_msa).to(dtype)
            norm_hidden_states = x
        else:
            x, norm_hidden_states = residual_modulate(
                block.norm2, x, attn_output.to(dtype), gate_msa, None, None, backend, promote=False
            )
        attn_output = block.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        x, norm_hidden_states = residual_modulate(
            block.norm3, x, attn_output.to(dtype), None, c_shift_msa, c_scale_msa, backend, promote=False
        )
        ff_output = block.ffn(norm_hidden_states)
        x = (x.float() + ff_output.float() * c_gate_msa).to(dtype)

        conditioning_states = None
        if block.proj_out is not None:
            conditioning_states = block.proj_out(x)
        return conditioning_states, x

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm1, cfg)


FAMILY = Family(
    name="wan_vace",
    model_classes=("WanVACETransformer3DModel",),
    rules={"WanTransformerBlock": wan_block_rule, "WanVACETransformerBlock": wan_vace_block_rule},
    stack=Stack(
        lists=("blocks",),
        blocks={"WanTransformerBlock": SINGLE},
        # the forward adds a VACE control hint to the image stream after each block of vace_layers, so only the
        # blocks after the last hint are one chain; the blocks up to it always run
        cached=after_last_hint,
    ),
    attention=TokenLayout(
        self_attention={"WanTransformerBlock": ("attn1",)},
        processors=frozenset({"WanAttnProcessor", "WanAttnProcessor2_0"}),
        text="first",
        grid=spatial_grid,
    ),
    quant=QuantLayout(skip=(*COMMON_SKIP, "vace_blocks.*.proj_in", "vace_blocks.*.proj_out")),
    notes="the final scale-shift lives in the model's forward and is not fused; the VACE blocks' self-attention is "
    "outside the declared stack and stays dense under windowed attention",
)
