"""Nucleus-Image (``NucleusMoEImageTransformer2DModel``): adaLN modulation and the gated attention residual fused;
the expert-choice MoE layers on ``ExpertChoiceMoE`` (grouped GEMM, no host sync).

``NucleusMoEImageTransformerBlock`` (single stream, text as extra keys/values): ``layer_norm(x) * (1 + scale1)``
fused (``adaln_modulate``, no shift), and the gated attention residual ``x + tanh(clamp(gate1)) * attn`` fused with
``pre_mlp_norm`` + the MLP modulation (``gated_residual_adaln``). In an MoE block the router reads the *unmodulated*
norm, so there the fused pass returns ``h`` and ``layer_norm(h)`` and the ``(1 + scale2)`` product stays the eager
expression diffusers writes. The final ``AdaLayerNormContinuous`` is fused with the shared rule.

MoE (``NucleusMoELayer``): served by ``ditkern.nn.ExpertChoiceMoE`` (the ``moe`` feature, ``ExpertChoiceMoE
.from_nucleus``). Its routing is expert-choice with a fixed capacity: scores = softmax (or sigmoid) of
``gate([temb, unmodulated norm])`` over the experts, each expert takes its top-``C = max(1, ceil(capacity_factor * S /
E))`` tokens per item (``torch.topk``, the same call diffusers makes, so ties break the same way); a token may go to
any number of experts, its gates renormalised over the experts that took it and scaled by ``route_scale``; experts read
the modulated input, the shared SwiGLU expert every token, and the weighted rows are added into the shared output. The
experts run as one grouped GEMM pair over the ``E * B * C`` routed rows (each expert exactly ``B * C``: a static
layout, no host sync); the combine is an fp32 ``index_add`` rounded once. The moe feature passes the layer's extra
inputs (``hidden_states_unmodulated``, ``timestep``) through to the module.

Stack: ``transformer_blocks``, image stream only (the text is re-projected by every block). Windowed attention does
not apply: image queries attend to image + text keys and there are no text queries, so query and key lengths differ,
which ``window_attention`` (self-attention over a joint text + image sequence) does not take.
"""

from __future__ import annotations

import os

import torch

from ditkern.patch.common import (
    BLOCK_WHAT, NORM_RULES, adaln_plan, check_fingerprint, has_attrs, modulate, norm_spec, residual_modulate,
    source_fingerprint,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, SINGLE, Family, MoELayer, QuantLayout, Stack
from ditkern.patch.fingerprints import FINGERPRINTS

# the sources ExpertChoiceMoE mirrors (diffusers 0.42.1): NucleusMoELayer.forward, SwiGLUExperts.forward and its two
# expert paths (the loop and F.grouped_mm compute the same function)
MOE_FINGERPRINTS = {
    "NucleusMoELayer.forward": {"d48c84007c673906"},
    "SwiGLUExperts.forward": {"70af67a3ed8e3026"},
    "SwiGLUExperts._run_experts_for_loop": {"52b023e902129276"},
    "SwiGLUExperts._run_experts_grouped_mm": {"f1c02c6c81a20713"},
}


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

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.pre_mlp_norm, cfg)


def _moe_fingerprint_reason(layer) -> str | None:
    if os.environ.get("DITKERN_TRUST_BLOCK_SOURCE", "0") == "1":
        return None
    experts = type(layer.experts)
    for key, fn in (
        ("NucleusMoELayer.forward", type(layer).forward),
        ("SwiGLUExperts.forward", experts.forward),
        ("SwiGLUExperts._run_experts_for_loop", getattr(experts, "_run_experts_for_loop", None)),
        ("SwiGLUExperts._run_experts_grouped_mm", getattr(experts, "_run_experts_grouped_mm", None)),
    ):
        fp = source_fingerprint(fn) if fn is not None else "missing"
        if fp not in MOE_FINGERPRINTS[key]:
            return (
                f"{key} of the installed diffusers (fingerprint {fp}) differs from the version ditkern's expert-choice "
                "MoE mirrors; left unpatched (DITKERN_TRUST_BLOCK_SOURCE=1 patches anyway)"
            )
    return None


def nucleus_moe(layer, block_m: int, backend: str):
    """The ``ExpertChoiceMoE`` computing ``NucleusMoELayer`` (router and shared expert shared with the layer, experts
    stacked; gradients reach the layer's own parameters), or the reason the layer is left alone."""
    reason = has_attrs(layer, "gate", "experts", "shared_expert", "num_experts", "capacity_factor", "use_sigmoid",
                       "route_scale")  # fmt: skip
    reason = reason or has_attrs(layer.experts, "gate_up_proj", "down_proj")
    if reason:
        return reason
    E, D, F2 = layer.experts.gate_up_proj.shape
    if layer.gate.weight.shape[0] != E or layer.num_experts != E or tuple(layer.experts.down_proj.shape) != (
        E, F2 // 2, D
    ):  # fmt: skip
        return "the gate's expert count / the packed expert shapes do not match the layer"
    if layer.gate.bias is not None:
        return "the router has a bias; diffusers' NucleusMoELayer has none"
    reason = _moe_fingerprint_reason(layer)
    if reason:
        return reason
    from ditkern.nn.sparse_moe import ExpertChoiceMoE  # noqa: PLC0415

    return ExpertChoiceMoE.from_nucleus(layer, block_m=block_m, backend=backend)


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
    notes="NucleusMoELayer runs on ExpertChoiceMoE (expert-choice routing, fixed capacity, grouped GEMM, fp32 "
    "index_add combine)",
)
