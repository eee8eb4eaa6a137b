"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): ``WanTransformerBlock`` fused.

Wan keeps its modulation in fp32 (``scale_shift_table + temb.float()``) and normalises in fp32; the fused kernels
take fp32 modulation beside a bf16/fp16 stream and compute in fp32, so the semantics are kept. Three fusions per
block: norm1 + modulate; gated self-attention residual + norm2 (affine, unmodulated; skipped when norm2 is an
Identity); cross-attention residual + norm3 + modulate. Per-token modulation (Wan 2.2 TI2V, ``temb`` of
``[B, S, 6, D]``) is read as strided views in place.

Stack: ``blocks``, image stream only (text through cross-attention). Attention: ``attn1`` is self-attention over the
3-D video grid (frames x height x width of the latent over the patch); ``attn2`` (cross-attention) stays dense.
"""

from __future__ import annotations

from torch import nn

from ditkern.attention.processors import spatial_grid
from ditkern.patch.common import (
    BLOCK_WHAT, adaln_plan, check_fingerprint, has_attrs, modulate, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, SINGLE, Family, QuantLayout, Stack, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS


def wan_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = has_attrs(block, "norm1", "attn1", "norm2", "attn2", "norm3", "ffn", "scale_shift_table") or (
        check_fingerprint(block, FINGERPRINTS["WanTransformerBlock"])
    )
    if reason:
        return reason
    for norm in (block.norm1, block.norm3) + (() if isinstance(block.norm2, nn.Identity) else (block.norm2,)):
        if isinstance(s := norm_spec(norm), str):
            return s
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb):
        if temb.ndim == 4:  # [B, S, 6, D] per-token modulation (Wan 2.2 TI2V)
            mods = [m.squeeze(2) for m in (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
        else:  # [B, 6, D] -> six [B, 1, D] views
            mods = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods
        dtype = hidden_states.dtype

        norm_hidden_states = modulate(block.norm1, hidden_states, shift_msa, scale_msa, backend, promote=False)
        attn_output = block.attn1(norm_hidden_states, None, None, rotary_emb)
        if isinstance(block.norm2, nn.Identity):
            hidden_states = (hidden_states.float() + attn_output * gate_msa).to(dtype)
            norm_hidden_states = hidden_states
        else:
            hidden_states, norm_hidden_states = residual_modulate(
                block.norm2, hidden_states, attn_output.to(dtype), gate_msa, None, None, backend, promote=False
            )
        attn_output = block.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        hidden_states, norm_hidden_states = residual_modulate(
            block.norm3, hidden_states, attn_output.to(dtype), None, c_shift_msa, c_scale_msa, backend, promote=False
        )
        ff_output = block.ffn(norm_hidden_states)
        return (hidden_states.float() + ff_output.float() * c_gate_msa).to(dtype)

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm1, cfg)


FAMILY = Family(
    name="wan",
    model_classes=("WanTransformer3DModel",),
    rules={"WanTransformerBlock": wan_block_rule},
    stack=Stack(lists=("blocks",), blocks={"WanTransformerBlock": SINGLE}),
    attention=TokenLayout(
        self_attention={"WanTransformerBlock": ("attn1",)},
        processors=frozenset({"WanAttnProcessor", "WanAttnProcessor2_0"}),
        text="first",
        grid=spatial_grid,
    ),
    quant=QuantLayout(skip=COMMON_SKIP),
    notes="the final scale-shift lives in the model's forward and is not fused",
)
