"""Nucleus-Image (``NucleusMoEImageTransformer2DModel``): adaLN modulation and the gated attention residual fused;
the expert-choice MoE layers are left as diffusers computes them, with the reason.

``NucleusMoEImageTransformerBlock`` (single stream, text as extra keys/values): ``layer_norm(x) * (1 + scale1)``
fused (``adaln_modulate``, no shift), and the gated attention residual ``x + tanh(clamp(gate1)) * attn`` fused with
``pre_mlp_norm`` + the MLP modulation (``gated_residual_adaln``). In an MoE block the router reads the *unmodulated*
norm, so there the fused pass returns ``h`` and ``layer_norm(h)`` and the ``(1 + scale2)`` product stays the eager
expression diffusers writes. The final ``AdaLayerNormContinuous`` is fused with the shared rule.

MoE (``NucleusMoELayer``): not swapped for ``SparseMoE``. Its routing is expert-choice with a fixed capacity (each
expert takes its top-``ceil(capacity_factor * S / E)`` tokens by affinity; a token may go to any number of experts,
the gates renormalised over the experts that took it), its router reads ``[temb, unmodulated norm]`` while the
experts read the modulated input, and the combine is a scatter-add: ``SparseMoE`` routes token-choice top-k over one
input, so it would compute another function. The layer is reported with that reason.

Stack: ``transformer_blocks``, image stream only (the text is re-projected by every block). Windowed attention does
not apply: image queries attend to image + text keys and there are no text queries, so query and key lengths differ,
which ``window_attention`` (self-attention over a joint text + image sequence) does not take.
"""

from __future__ import annotations

import torch

from ditkern.patch.common import (
    BLOCK_WHAT, NORM_RULES, adaln_backend, check_fingerprint, has_attrs, modulate, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.engine import Plan
from ditkern.patch.family import COMMON_SKIP, SINGLE, Family, MoELayer, QuantLayout, Stack
from ditkern.patch.fingerprints import FINGERPRINTS

MOE_REASON = (
    "expert-choice routing with fixed capacity (each expert takes its top-C tokens; router reads [temb, unmodulated "
    "norm], experts the modulated input; scatter-add combine) is not SparseMoE's token-choice top-k: left as "
    "diffusers computes it"
)


def nucleus_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    names = ("img_mod", "encoder_proj", "pre_attn_norm", "attn", "pre_mlp_norm", "img_mlp", "moe_enabled")
    reason = has_attrs(block, *names) or check_fingerprint(block, FINGERPRINTS["NucleusMoEImageTransformerBlock"])
    if reason:
        return reason
    for norm in (block.pre_attn_norm, block.pre_mlp_norm):
        if isinstance(s := norm_spec(norm), str):
            return s
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        scale1, gate1, scale2, gate2 = block.img_mod(temb).unsqueeze(1).chunk(4, dim=-1)
        gate1 = gate1.clamp(min=-2.0, max=2.0)
        gate2 = gate2.clamp(min=-2.0, max=2.0)
        attn_kwargs = attention_kwargs or {}
        context = None if attn_kwargs.get("cached_txt_key") is not None else block.encoder_proj(encoder_hidden_states)

        img_modulated = modulate(block.pre_attn_norm, hidden_states, None, scale1, backend)
        img_attn_output = block.attn(
            hidden_states=img_modulated, encoder_hidden_states=context, image_rotary_emb=image_rotary_emb, **attn_kwargs
        )
        if block.moe_enabled:  # the router reads the unmodulated norm: fuse the residual with the norm alone
            hidden_states, img_normed2 = residual_modulate(
                block.pre_mlp_norm, hidden_states, img_attn_output, gate1.tanh(), None, None, backend
            )
            img_mlp_output = block.img_mlp(img_normed2 * (1 + scale2), img_normed2, timestep=temb)
        else:
            hidden_states, img_modulated2 = residual_modulate(
                block.pre_mlp_norm, hidden_states, img_attn_output, gate1.tanh(), None, scale2, backend
            )
            img_mlp_output = block.img_mlp(img_modulated2)
        hidden_states = hidden_states + gate2.tanh() * img_mlp_output
        if hidden_states.dtype == torch.float16:
            fp16_finfo = torch.finfo(torch.float16)
            hidden_states = hidden_states.clip(fp16_finfo.min, fp16_finfo.max)
        return hidden_states

    return Plan("block", BLOCK_WHAT, forward, backend=adaln_backend(block, block.pre_mlp_norm, cfg))


def nucleus_moe(layer, block_m: int, backend: str):
    """Why ``NucleusMoELayer`` is not served by ``SparseMoE`` (see the module docstring)."""
    return MOE_REASON


FAMILY = Family(
    name="nucleusmoe",
    model_classes=("NucleusMoEImageTransformer2DModel",),
    rules={
        "NucleusMoEImageTransformerBlock": nucleus_block_rule,
        "AdaLayerNormContinuous": NORM_RULES["AdaLayerNormContinuous"],
    },
    stack=Stack(lists=("transformer_blocks",), blocks={"NucleusMoEImageTransformerBlock": SINGLE}),
    attention="image queries attend to image + text keys with no text queries (query and key lengths differ): not the "
    "joint self-attention window_attention takes",
    # img_in: the patch embedder; img_mod: the first and last block's modulation; img_mlp.gate: the MoE routers (a
    # quantized router changes which tokens each expert takes)
    quant=QuantLayout(skip=(*COMMON_SKIP, "img_in*", "*.img_mlp.gate"), edge_skip=("img_mod*",)),
    moe={"NucleusMoELayer": MoELayer(build=nucleus_moe)},
    notes="NucleusMoELayer is not swapped for SparseMoE: " + MOE_REASON,
)
