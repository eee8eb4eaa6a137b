"""Qwen-Image (``QwenImageTransformer2DModel``): MMDiT blocks fused, final adaLN norm fused.

``QwenImageTransformerBlock`` computes its modulation with ``img_mod`` / ``txt_mod`` (``Sequential(SiLU, Linear)``)
and normalises with plain ``nn.LayerNorm`` (no affine). Per stream: ``norm1`` + modulate (``adaln_modulate``), and the
gated attention residual fused with ``norm2`` + the MLP modulation (``gated_residual_adaln``). Qwen-Image-Edit-2511's
``zero_cond_t`` (a second, zero-timestep modulation for the reference-image tokens, chosen per token by
``modulate_index``) becomes per-token ``[B, S, D]`` modulation, selected exactly as the block's ``_modulate`` selects
it (both fingerprinted).

Stack: ``transformer_blocks``, ``(hidden_states, encoder_hidden_states) -> (encoder_hidden_states, hidden_states)``;
the model reads only the image stream after them. Attention: the joint text-first sequence of
``QwenDoubleStreamAttnProcessor2_0``; the grid is read from ``img_shapes`` (one ``(frames, h, w)`` per sample, the
latent over the 2 x 2 patch); a call with several images per sample (edit: reference images appended) has no single
grid. A text padding mask (``encoder_hidden_states_mask``: the pipeline passes None when every prompt token is real)
becomes an SDPA mask, which windowed attention refuses at call time.
"""

from __future__ import annotations

import math
import os

import torch

from ditkern.patch.common import (
    BLOCK_WHAT, NORM_RULES, adaln_plan, check_fingerprint, has_attrs, modulate, norm_spec, residual_modulate,
    source_fingerprint,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, PAIR, Family, QuantLayout, Stack, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS


def _mods(mod_params, index=None):
    """(shift, scale, gate) of one modulation, as ``QwenImageTransformerBlock._modulate`` selects them: ``[B, 1, D]``
    views, or per token ``[B, S, D]`` where ``index`` picks the first (0) or second half of the batch."""
    shift, scale, gate = mod_params.chunk(3, dim=-1)
    if index is None:
        return shift.unsqueeze(1), scale.unsqueeze(1), gate.unsqueeze(1)
    b = shift.size(0) // 2
    first = index.unsqueeze(-1) == 0
    return tuple(torch.where(first, t[:b].unsqueeze(1), t[b:].unsqueeze(1)) for t in (shift, scale, gate))


def _modulate_reason(block) -> str | None:
    if os.environ.get("DITKERN_TRUST_BLOCK_SOURCE", "0") == "1":
        return None
    fp = source_fingerprint(getattr(type(block), "_modulate", None))
    if fp in FINGERPRINTS["QwenImageTransformerBlock._modulate"]:
        return None
    return (
        f"QwenImageTransformerBlock._modulate of the installed diffusers (fingerprint {fp}) differs from the version "
        "ditkern's fused block mirrors; left unpatched (DITKERN_TRUST_BLOCK_SOURCE=1 patches anyway)"
    )


def qwen_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    norms = ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2")
    reason = (
        has_attrs(block, "img_mod", "txt_mod", "attn", "img_mlp", "txt_mlp", "zero_cond_t", *norms)
        or check_fingerprint(block, FINGERPRINTS["QwenImageTransformerBlock"])
        or _modulate_reason(block)
        or next((s for n in norms if isinstance(s := norm_spec(getattr(block, n)), str)), None)
    )
    if reason:
        return reason
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb=None,
                joint_attention_kwargs=None, modulate_index=None):  # fmt: skip
        img_mod_params = block.img_mod(temb)
        if block.zero_cond_t:
            temb = torch.chunk(temb, 2, dim=0)[0]
        txt_mod_params = block.txt_mod(temb)
        img_mod1, img_mod2 = img_mod_params.chunk(2, dim=-1)
        txt_mod1, txt_mod2 = txt_mod_params.chunk(2, dim=-1)

        img_shift1, img_scale1, img_gate1 = _mods(img_mod1, modulate_index)
        txt_shift1, txt_scale1, txt_gate1 = _mods(txt_mod1)
        img_modulated = modulate(block.img_norm1, hidden_states, img_shift1, img_scale1, backend)
        txt_modulated = modulate(block.txt_norm1, encoder_hidden_states, txt_shift1, txt_scale1, backend)

        joint_attention_kwargs = joint_attention_kwargs or {}
        img_attn_output, txt_attn_output = block.attn(
            hidden_states=img_modulated,
            encoder_hidden_states=txt_modulated,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            image_rotary_emb=image_rotary_emb,
            **joint_attention_kwargs,
        )

        # x + gate1 * attn, then norm2 * (1 + scale2) + shift2, in one pass per stream
        img_shift2, img_scale2, img_gate2 = _mods(img_mod2, modulate_index)
        hidden_states, img_modulated2 = residual_modulate(
            block.img_norm2, hidden_states, img_attn_output, img_gate1, img_shift2, img_scale2, backend
        )
        hidden_states = hidden_states + img_gate2 * block.img_mlp(img_modulated2)

        txt_shift2, txt_scale2, txt_gate2 = _mods(txt_mod2)
        encoder_hidden_states, txt_modulated2 = residual_modulate(
            block.txt_norm2, encoder_hidden_states, txt_attn_output, txt_gate1, txt_shift2, txt_scale2, backend
        )
        encoder_hidden_states = encoder_hidden_states + txt_gate2 * block.txt_mlp(txt_modulated2)

        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.img_norm2, cfg)


def qwen_grid(model, args, kwargs, read_ids: bool = True) -> tuple[tuple[int, ...] | None, int, int]:
    """The token grid of a Qwen-Image call from ``img_shapes``: ``[[(frames, h, w)], ...]`` per sample (h and w are
    the latent's over the 2 x 2 patch). None when a sample holds several images (edit: reference images appended) or
    the samples differ."""
    import inspect  # noqa: PLC0415

    a = inspect.signature(type(model).forward).bind_partial(model, *args, **kwargs).arguments
    hs, ehs, shapes = a["hidden_states"], a.get("encoder_hidden_states"), a.get("img_shapes")
    n, text = hs.shape[1], (ehs.shape[1] if ehs is not None else 0)
    if not shapes or not read_ids:
        return None, n, text
    per_sample = {tuple(tuple(int(v) for v in s) for s in (sample if isinstance(sample, list) else [sample]))
                  for sample in shapes}  # fmt: skip
    if len(per_sample) != 1 or len(first := next(iter(per_sample))) != 1:
        return None, n, text
    f, h, w = first[0]
    grid = (h, w) if f == 1 else (f, h, w)
    return (grid if math.prod(grid) == n else None), n, text


FAMILY = Family(
    name="qwenimage",
    model_classes=("QwenImageTransformer2DModel",),
    rules={"QwenImageTransformerBlock": qwen_block_rule, "AdaLayerNormContinuous": NORM_RULES["AdaLayerNormContinuous"]},
    stack=Stack(lists=("transformer_blocks",), blocks={"QwenImageTransformerBlock": PAIR}, reads_after=("hidden_states",)),
    attention=TokenLayout(
        self_attention={"QwenImageTransformerBlock": ("attn",)},
        processors=frozenset({"QwenDoubleStreamAttnProcessor2_0"}),
        text="first",
        grid=qwen_grid,
    ),
    # img_in / txt_in are the patch and text embedders; the first and last block's modulation stays high precision
    quant=QuantLayout(skip=(*COMMON_SKIP, "img_in", "txt_in"), edge_skip=("img_mod*", "txt_mod*")),
    notes="the model's txt_norm (RMSNorm of the text states before txt_in) is not fused: no modulation",
)
