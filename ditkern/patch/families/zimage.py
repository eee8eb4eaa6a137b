"""Z-Image (``ZImageTransformer2DModel``): adaLN-RMS modulation and the gated sandwich residual fused.

``ZImageTransformerBlock`` with ``modulation=True`` (the noise refiner and the main ``layers``) computes
``x + tanh(g_msa) * attention_norm2(attn(attention_norm1(x) * (1 + s_msa)))``, then
``x + tanh(g_mlp) * ffn_norm2(ff(ffn_norm1(x) * (1 + s_mlp)))``, every norm an RMSNorm and no shift. Fused:
``attention_norm1(x) * (1 + s_msa)`` (``adaln_modulate``), and the gated residual after attention with ``ffn_norm1`` +
the MLP modulation (``gated_residual_adaln``, ``y = attention_norm2(attn)``). Omni mode's per-token modulation (noisy /
clean tokens through ``select_per_token``) is read as ``[B, S, D]`` tensors. The ``FinalLayer`` is fused too:
``layer_norm(x) * (1 + scale)``, then its linear.

Not fused: the context / SigLIP refiners' blocks (``modulation=False``: RMSNorm-only, no adaLN modulation; the report
says so), the post-attention / post-FFN RMSNorms, the block's last residual add.

Stack: ``layers``, one unified stream ``[image (padded to 32), caption (padded to 32)]``. The Taylor cache
skips it; the model is called with ``x`` / ``t`` / ``cap_feats`` (lists of per-image latents and captions) and its
timestep ``(1000 - t) / 1000`` rises through sampling: the Stack declares ``latents="x"``, ``timestep="t"``,
``timestep_rises=True``. Attention: self-attention of the main layers, image
first, the grid from the latents (all items of one size; the image padding tokens count with the text tokens, which
attend and are attended globally); a batch whose sequences differ in length passes a mask, which windowed attention
refuses with that reason.
"""

from __future__ import annotations

import inspect
import math

from ditkern.patch.common import (
    ADALN_WHAT, BLOCK_WHAT, adaln_plan, check_fingerprint, has_attrs, modulate, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, Family, QuantLayout, Stack, Streams, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS

SEQ_MULTI_OF = 32  # Z-Image pads the image and the caption tokens to multiples of 32 (transformer_z_image.py)
X = Streams(takes=("x",), returns=("x",))
"""``block(x, attn_mask, freqs_cis, adaln_input, ...) -> x``"""


def zimage_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    names = ("modulation", "attention", "attention_norm1", "attention_norm2", "ffn_norm1", "feed_forward", "ffn_norm2")
    reason = has_attrs(block, *names)
    if reason:
        return reason
    if not block.modulation:
        return "modulation=False (context / SigLIP refiner): RMSNorm-only block, no adaLN modulation to fuse"
    reason = has_attrs(block, "adaLN_modulation") or check_fingerprint(block, FINGERPRINTS["ZImageTransformerBlock"])
    if reason:
        return reason
    for norm in (block.attention_norm1, block.ffn_norm1):
        if isinstance(s := norm_spec(norm), str):
            return s
    from diffusers.models.transformers.transformer_z_image import select_per_token  # noqa: PLC0415

    backend = cfg.backend

    def forward(block, x, attn_mask, freqs_cis, adaln_input=None, noise_mask=None, adaln_noisy=None,
                adaln_clean=None):  # fmt: skip
        if noise_mask is not None:  # omni mode: per-token modulation of noisy / clean tokens, [B, S, D]
            seq_len = x.shape[1]
            scale_msa_noisy, gate_msa_noisy, scale_mlp_noisy, gate_mlp_noisy = block.adaLN_modulation(
                adaln_noisy
            ).chunk(4, dim=1)
            scale_msa_clean, gate_msa_clean, scale_mlp_clean, gate_mlp_clean = block.adaLN_modulation(
                adaln_clean
            ).chunk(4, dim=1)
            scale_msa = select_per_token(scale_msa_noisy, scale_msa_clean, noise_mask, seq_len)
            scale_mlp = select_per_token(scale_mlp_noisy, scale_mlp_clean, noise_mask, seq_len)
            gate_msa = select_per_token(gate_msa_noisy.tanh(), gate_msa_clean.tanh(), noise_mask, seq_len)
            gate_mlp = select_per_token(gate_mlp_noisy.tanh(), gate_mlp_clean.tanh(), noise_mask, seq_len)
        else:
            mod = block.adaLN_modulation(adaln_input)
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)
            gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()

        # diffusers writes rms(x) * (1 + s); the kernels take s and add the 1 in fp32
        attn_out = block.attention(
            modulate(block.attention_norm1, x, None, scale_msa, backend), attention_mask=attn_mask,
            freqs_cis=freqs_cis,
        )  # fmt: skip
        x, ffn_input = residual_modulate(
            block.ffn_norm1, x, block.attention_norm2(attn_out), gate_msa, None, scale_mlp, backend
        )
        return x + gate_mlp * block.ffn_norm2(block.feed_forward(ffn_input))

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.ffn_norm1, cfg)


def zimage_final_layer_rule(m, cfg):
    if not cfg.fused_norms:
        return None
    reason = has_attrs(m, "norm_final", "linear", "adaLN_modulation") or check_fingerprint(
        m, FINGERPRINTS["ZImage.FinalLayer"]
    )
    if reason:
        return reason
    if isinstance(s := norm_spec(m.norm_final), str):
        return s
    from diffusers.models.transformers.transformer_z_image import select_per_token  # noqa: PLC0415

    backend = cfg.backend

    def forward(module, x, c=None, noise_mask=None, c_noisy=None, c_clean=None):
        if noise_mask is not None:
            scale = select_per_token(
                module.adaLN_modulation(c_noisy), module.adaLN_modulation(c_clean), noise_mask, x.shape[1]
            )
        else:
            assert c is not None, "Either c or (c_noisy, c_clean) must be provided"
            scale = module.adaLN_modulation(c)
        return module.linear(modulate(module.norm_final, x, None, scale, backend))

    return adaln_plan("adaln", ADALN_WHAT, forward, m, m.norm_final, cfg)


def zimage_grid(model, args, kwargs, read_ids: bool = True):
    """The image grid of a basic-mode call (``x``: one ``[C, F, H, W]`` latent per item, all of one size), the image
    tokens, and the other tokens of the unified sequence: the image padding plus the padded caption."""
    sig = inspect.signature(type(model).forward)
    a = sig.bind_partial(model, *args, **kwargs)
    a.apply_defaults()
    x, caps = a.arguments["x"], a.arguments["cap_feats"]
    if not x or isinstance(x[0], list):  # omni mode: several images per item, no single grid
        return None, 0, 0
    p, pf = a.arguments["patch_size"], a.arguments["f_patch_size"]
    shapes = {tuple(t.shape[-3:]) for t in x}
    if len(shapes) != 1:
        return None, 0, 0
    f, h, w = shapes.pop()
    grid = (h // p, w // p) if f // pf == 1 else (f // pf, h // p, w // p)
    n = math.prod(grid)
    cap = max(len(c) + (-len(c)) % SEQ_MULTI_OF for c in caps)
    return grid, n, (-n) % SEQ_MULTI_OF + cap


FAMILY = Family(
    name="zimage",
    model_classes=("ZImageTransformer2DModel",),
    rules={"ZImageTransformerBlock": zimage_block_rule, "FinalLayer": zimage_final_layer_rule},
    stack=Stack(
        lists=("layers",),
        blocks={"ZImageTransformerBlock": X},
        reads_after=("x",),
        # forward(x: list of B latents, t: [B], cap_feats, ...); the pipeline's t is (1000 - t) / 1000: it rises
        latents="x",
        timestep="t",
        timestep_rises=True,
        uncached_if=("controlnet_block_samples",),  # added to the stream between layers
    ),
    attention=TokenLayout(
        self_attention={"ZImageTransformerBlock": ("attention",)},
        processors=frozenset({"ZSingleStreamAttnProcessor"}),
        text="last",
        grid=zimage_grid,
    ),
    quant=QuantLayout(skip=(*COMMON_SKIP, "all_final_layer*"), edge_skip=("adaLN_modulation*",)),
    notes="refiner blocks with modulation=False are RMSNorm-only and stay unfused; the post-attention / post-FFN "
    "RMSNorms (attention_norm2, ffn_norm2) are not fused",
)
