"""Lumina-Image 2.0 (``Lumina2Transformer2DModel``): adaLN-RMS modulation and the gated sandwich residual fused.

``Lumina2TransformerBlock`` with ``modulation=True`` (the noise refiner and the main ``layers``) is a sandwich-norm
block: ``x + tanh(g_msa) * norm2(attn(norm1(x) * (1 + s_msa)))``, then ``ffn_norm1(x) * (1 + s_mlp)`` into the
SwiGLU feed-forward and ``x + tanh(g_mlp) * ffn_norm2(ff)``; every norm is an RMSNorm and there is no shift. Fused:

- ``LuminaRMSNormZero`` (``norm1``): ``rms(x) * (1 + scale_msa)`` in one pass (``adaln_modulate``, no shift);
- in the block, the gated residual add after attention with ``ffn_norm1`` + the MLP modulation
  (``gated_residual_adaln``: ``y`` is ``norm2(attn)``, the gate ``tanh(g_msa)``, no shift);
- the final ``LuminaLayerNormContinuous``: ``layer_norm(x) * (1 + scale)`` (then its own ``linear_2``).

Not fused: the context refiner's blocks (``modulation=False``: RMSNorm-only, no adaLN modulation; the report says
so), the post-attention / post-FFN ``norm2`` / ``ffn_norm2`` (plain RMSNorms of a sub-block output, kept as diffusers
computes them) and the final residual add of each block (nothing follows it inside the block).

Stack: ``layers``, one joint stream ``[caption, image]`` per block (the refiners run before it on the separate
streams and are not part of the chain). Attention: joint self-attention, text first, the grid read from the latent
and the caption's effective length (``encoder_attention_mask``); a batch whose captions differ in length passes a
mask and is refused by windowed attention with that reason. Taylor cache: over ``layers``; Lumina's timestep runs from 0
at noise up to 1, declared with ``timestep_rises`` (a timestep back down starts a new generation).
"""

from __future__ import annotations

import inspect

from ditkern.patch.common import (
    ADALN_WHAT, BLOCK_WHAT, AdaLNNormRule, adaln_plan, check_fingerprint, has_attrs, modulate, norm_spec,
    residual_modulate,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, SINGLE, Family, QuantLayout, Stack, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS


def _lumina_rms_norm_zero(mod):
    """``LuminaRMSNormZero``: linear(silu(emb)) -> 4 chunks; rms(x) * (1 + scale_msa) fused (no shift)."""

    def forward(module, x, emb=None):
        emb = module.linear(module.silu(emb))
        scale_msa, gate_msa, scale_mlp, gate_mlp = emb.chunk(4, dim=1)
        return mod(module.norm, x, None, scale_msa), gate_msa, scale_mlp, gate_mlp

    return forward


lumina_rms_norm_zero_rule = AdaLNNormRule(_lumina_rms_norm_zero)


def lumina_norm_out_rule(m, cfg):
    """``LuminaLayerNormContinuous``: linear_1(silu(c)) is the scale; norm(x) * (1 + scale) fused, then linear_2."""
    if not cfg.fused_norms:
        return None
    reason = has_attrs(m, "linear_1", "silu", "norm", "linear_2") or check_fingerprint(
        m, FINGERPRINTS["LuminaLayerNormContinuous"]
    )
    if reason:
        return reason
    if isinstance(s := norm_spec(m.norm), str):
        return s
    backend = cfg.backend

    def forward(module, x, conditioning_embedding):
        scale = module.linear_1(module.silu(conditioning_embedding).to(x.dtype))
        x = modulate(module.norm, x, None, scale, backend)
        if module.linear_2 is not None:
            x = module.linear_2(x)
        return x

    return adaln_plan("adaln", ADALN_WHAT, forward, m, m.norm, cfg)


def lumina2_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = has_attrs(block, "modulation", "norm1", "attn", "norm2", "ffn_norm1", "feed_forward", "ffn_norm2")
    if reason:
        return reason
    if not block.modulation:
        return "modulation=False (context refiner): RMSNorm-only block, no adaLN modulation to fuse"
    reason = check_fingerprint(block, FINGERPRINTS["Lumina2TransformerBlock"])
    if reason:
        return reason
    if isinstance(s := norm_spec(block.ffn_norm1), str):
        return s
    backend = cfg.backend

    def forward(block, hidden_states, attention_mask, image_rotary_emb, temb=None):
        norm_hidden_states, gate_msa, scale_mlp, gate_mlp = block.norm1(hidden_states, temb)
        attn_output = block.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_hidden_states,
            attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb,
        )
        # x + tanh(g_msa) * norm2(attn), then ffn_norm1(.) * (1 + s_mlp), in one pass
        hidden_states, mlp_input = residual_modulate(
            block.ffn_norm1, hidden_states, block.norm2(attn_output), gate_msa.unsqueeze(1).tanh(), None, scale_mlp,
            backend,
        )  # fmt: skip
        mlp_output = block.feed_forward(mlp_input)
        return hidden_states + gate_mlp.unsqueeze(1).tanh() * block.ffn_norm2(mlp_output)

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.ffn_norm1, cfg)


def lumina2_grid(model, args, kwargs, read_ids: bool = True):
    """``[B, C, H, W]`` latent over ``patch_size``; text = the caption's effective length (``encoder_attention_mask``
    sums; the joint sequence holds ``caption[:len] + image``)."""
    a = inspect.signature(type(model).forward).bind_partial(model, *args, **kwargs).arguments
    hs, ehs, mask = a["hidden_states"], a.get("encoder_hidden_states"), a.get("encoder_attention_mask")
    p = model.config.patch_size
    grid = (hs.shape[-2] // p, hs.shape[-1] // p)
    text = ehs.shape[1] if ehs is not None else 0
    if mask is not None and read_ids:  # a data-dependent read: WindowAttention(grid=...) skips it under compile
        text = int(mask.sum(dim=1).max())
    return grid, grid[0] * grid[1], text


FAMILY = Family(
    name="lumina2",
    model_classes=("Lumina2Transformer2DModel",),
    rules={
        "Lumina2TransformerBlock": lumina2_block_rule,
        "LuminaRMSNormZero": lumina_rms_norm_zero_rule,
        "LuminaLayerNormContinuous": lumina_norm_out_rule,
    },
    stack=Stack(
        lists=("layers",),
        blocks={"Lumina2TransformerBlock": SINGLE},
        timestep_rises=True,  # the pipeline passes 1 - t / 1000: 0 (noise) -> 1 (image)
    ),
    attention=TokenLayout(
        self_attention={"Lumina2TransformerBlock": ("attn",)},
        processors=frozenset({"Lumina2AttnProcessor2_0"}),
        text="first",
        grid=lumina2_grid,
    ),
    quant=QuantLayout(skip=COMMON_SKIP),
    notes="context-refiner blocks (modulation=False) are RMSNorm-only and stay unfused; the post-attention / post-FFN "
    "RMSNorms (norm2, ffn_norm2) are not fused",
)
