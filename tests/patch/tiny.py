"""Tiny random diffusers models of each family, built from config, and inputs for them."""

from __future__ import annotations

import torch


def flux(batch=2, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    S, T = 36, 5
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(6.0), torch.arange(6.0), indexing="ij"), -1)
    inputs = dict(
        hidden_states=torch.randn(batch, S, 8),
        encoder_hidden_states=torch.randn(batch, T, 24),
        pooled_projections=torch.randn(batch, 16),
        timestep=torch.tensor([0.3, 0.7][:batch]),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(T, 3),
    )
    return model, inputs


def sd3(batch=2, dtype=torch.float32):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 8, 8),
        encoder_hidden_states=torch.randn(batch, 5, 24),
        pooled_projections=torch.randn(batch, 16),
        timestep=torch.tensor([300.0, 700.0][:batch]),
    )
    return model, inputs


def pixart(batch=2, dtype=torch.float32):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, caption_channels=24, cross_attention_dim=16, norm_type="ada_norm_single",
        use_additional_conditions=False,
    )  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 8, 8),
        encoder_hidden_states=torch.randn(batch, 5, 24),
        timestep=torch.tensor([300, 700][:batch]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    return model, inputs


def dit(batch=2, dtype=torch.float32):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1001, norm_type="ada_norm_zero",
    )  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 8, 8),
        timestep=torch.tensor([300, 700][:batch]),
        class_labels=torch.tensor([3, 1000][:batch]),
    )
    return model, inputs


def wan(batch=2, dtype=torch.float32, per_token=False):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )  # fmt: skip
    T, H, W = 2, 6, 8
    tokens = T * (H // 2) * (W // 2)
    timestep = torch.tensor([300.0, 700.0][:batch])
    if per_token:  # Wan 2.2 TI2V: one timestep per latent token
        timestep = timestep[:, None].repeat(1, tokens)
        timestep[:, : tokens // 3] = 0.0
    inputs = dict(
        hidden_states=torch.randn(batch, 4, T, H, W),
        encoder_hidden_states=torch.randn(batch, 7, 16),
        timestep=timestep,
    )
    return model, inputs


FAMILIES = {"flux": flux, "sd3": sd3, "pixart": pixart, "dit": dit, "wan": wan}

# what each family's patch must swap: {exact class name: count}
EXPECTED = {
    "flux": {"FluxTransformerBlock": 2, "AdaLayerNormZero": 4, "AdaLayerNormZeroSingle": 2, "AdaLayerNormContinuous": 1},
    "sd3": {
        "JointTransformerBlock": 3, "SD35AdaLayerNormZeroX": 1, "AdaLayerNormZero": 4, "AdaLayerNormContinuous": 2,
    },  # fmt: skip
    "pixart": {"BasicTransformerBlock": 2},
    "dit": {"BasicTransformerBlock": 2, "AdaLayerNormZero": 2},
    "wan": {"WanTransformerBlock": 2},
}
