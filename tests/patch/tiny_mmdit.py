"""Tiny random MMDiT-style diffusers models (FLUX.2, Chroma, Qwen-Image), built from config, with inputs as their
pipelines pass them."""

from __future__ import annotations

import torch


def _ids(*axes):
    """Position ids: the cartesian product of the given ranges, one row per token (the pipelines' ``cartesian_prod``)."""
    return torch.cartesian_prod(*[torch.arange(n) if isinstance(n, int) else n for n in axes]).float()


def flux2(batch=2, dtype=torch.float32):
    """Flux2Pipeline: packed latents ``[B, H*W, C]``, ``img_ids`` (t, h, w, l) ``[B, H*W, 4]``, ``txt_ids`` (0, 0, 0,
    l), timestep / 1000, guidance."""
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
    )  # fmt: skip
    H, W, T = 5, 6, 7
    inputs = dict(
        hidden_states=torch.randn(batch, H * W, 8),
        encoder_hidden_states=torch.randn(batch, T, 24),
        timestep=torch.tensor([0.3, 0.7][:batch]),
        img_ids=_ids(1, H, W, 1)[None].repeat(batch, 1, 1),
        txt_ids=_ids(1, 1, 1, T)[None].repeat(batch, 1, 1),
        guidance=torch.full((batch,), 4.0),
    )
    return model, inputs


def chroma(batch=2, dtype=torch.float32, mask=True):
    """ChromaPipeline: packed latents, ``img_ids`` (0, h, w), ``txt_ids`` zeros, timestep / 1000, and the T5 padding
    mask extended by ones for the image tokens (``attention_mask [B, T + H*W]``)."""
    from diffusers import ChromaTransformer2DModel

    model = ChromaTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=2,
    )  # fmt: skip
    H, W, T = 5, 6, 7
    inputs = dict(
        hidden_states=torch.randn(batch, H * W, 8),
        encoder_hidden_states=torch.randn(batch, T, 24),
        timestep=torch.tensor([0.3, 0.7][:batch]),
        img_ids=_ids(1, H, W),
        txt_ids=torch.zeros(T, 3),
    )
    if mask:  # the pipeline keeps one padding token (the EOS) beyond each prompt's length
        text = torch.zeros(batch, T, dtype=torch.bool)
        for i, n in enumerate([4, 6][:batch]):
            text[i, : n + 1] = True
        inputs["attention_mask"] = torch.cat([text, torch.ones(batch, H * W, dtype=torch.bool)], dim=1)
    return model, inputs


def qwenimage(batch=2, dtype=torch.float32, zero_cond_t=False, text_mask=False):
    """QwenImagePipeline: packed 2 x 2 latent patches ``[B, h*w, 4C]``, ``img_shapes [[(1, h, w)]] * B``, timestep /
    1000, no text mask when every prompt token is real (the pipeline drops an all-ones mask). ``zero_cond_t``
    (Qwen-Image-Edit-2511): one reference image appended to every sample, modulated with timestep 0."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t,
    )  # fmt: skip
    h, w, T = 5, 6, 7
    shapes = [(1, h, w)] + ([(1, 3, 4)] if zero_cond_t else [])
    n = sum(f * a * b for f, a, b in shapes)
    inputs = dict(
        hidden_states=torch.randn(batch, n, 16),
        encoder_hidden_states=torch.randn(batch, T, 24),
        timestep=torch.tensor([0.3, 0.7][:batch]),
        img_shapes=[shapes] * batch,
    )
    if text_mask:
        m = torch.ones(batch, T, dtype=torch.long)
        m[0, 5:] = 0
        inputs["encoder_hidden_states_mask"] = m
    return model, inputs


FAMILIES = {"flux2": flux2, "chroma": chroma, "qwenimage": qwenimage}

# what each family's default patch must swap: {exact class name: count}
EXPECTED = {
    "flux2": {"Flux2TransformerBlock": 1, "Flux2SingleTransformerBlock": 2, "AdaLayerNormContinuous": 1},
    "chroma": {
        "ChromaTransformerBlock": 1, "ChromaAdaLayerNormZeroPruned": 2, "ChromaAdaLayerNormZeroSinglePruned": 1,
        "ChromaAdaLayerNormContinuousPruned": 1,
    },  # fmt: skip
    "qwenimage": {"QwenImageTransformerBlock": 2, "AdaLayerNormContinuous": 1},
}
# the tiny models' image grid (for windowed attention); Chroma declares no token layout
GRIDS = {"flux2": (5, 6), "qwenimage": (5, 6)}
BLOCKS = {"flux2": 3, "chroma": 2, "qwenimage": 2}
