"""Tiny random image DiTs (Lumina2, Z-Image, CogView4, NucleusMoE, HunyuanImage) built from config, with inputs
shaped as their diffusers pipelines pass them (tests/patch/test_family_image.py)."""

from __future__ import annotations

import torch


def lumina2(batch=2, t=(0.3, 0.7)):
    """``Lumina2Pipeline``: latents [B, C, H, W], timestep ``1 - t / 1000`` (0 = noise), the Gemma caption states
    and their attention mask (here the last caption token of every item is padding)."""
    from diffusers import Lumina2Transformer2DModel

    model = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, norm_eps=1e-5, axes_dim_rope=(4, 6, 6),
        axes_lens=(32, 16, 16), cap_feat_dim=24,
    )  # fmt: skip
    T = 7
    mask = torch.ones(batch, T, dtype=torch.bool)
    mask[:, -1] = False
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 6, 10),
        timestep=torch.tensor(t[:batch]),
        encoder_hidden_states=torch.randn(batch, T, 24),
        encoder_attention_mask=mask,
    )
    return model, inputs


def cogview4(batch=2, t=(300.0, 700.0)):
    """``CogView4Pipeline``: latents [B, C, H, W], timestep ``t`` (1000 = noise), GLM text states and the SDXL-style
    size conditions."""
    from diffusers import CogView4Transformer2DModel

    model = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=24, time_embed_dim=16, condition_dim=4, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(16, 16),
    )  # fmt: skip
    size = torch.tensor([[48.0, 80.0]] * batch)
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 6, 10),
        encoder_hidden_states=torch.randn(batch, 5, 24),
        timestep=torch.tensor(t[:batch]),
        original_size=size,
        target_size=size,
        crop_coords=torch.zeros(batch, 2),
    )
    return model, inputs


def nucleusmoe(batch=2, t=(0.3, 0.7)):
    """``NucleusMoEImagePipeline``: 2x2-packed latents [B, S, 4 * C], ``img_shapes`` [(1, h, w)] per item, timestep
    ``t / 1000`` (1 = noise), text states with their mask (the last token of item 0 is padding). Block 0 is dense,
    blocks 1 and 2 are expert-choice MoE (4 experts, capacity ceil(2 * 15 / 4) = 8 of 15 tokens)."""
    from diffusers import NucleusMoEImageTransformer2DModel

    model = NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        num_key_value_heads=1, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), mlp_ratio=8.0,
        dense_moe_strategy="leave_first_block_dense", num_experts=4, moe_intermediate_dim=16, capacity_factors=2.0,
    )  # fmt: skip
    for p in model.parameters():  # SwiGLUExperts' packed weights are allocated with torch.empty
        if p.dim() == 3:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    h, w, T = 3, 5, 6
    mask = torch.ones(batch, T, dtype=torch.bool)
    mask[0, -1] = False
    inputs = dict(
        hidden_states=torch.randn(batch, h * w, 16),
        img_shapes=[(1, h, w)] * batch,
        encoder_hidden_states=torch.randn(batch, T, 24),
        encoder_hidden_states_mask=mask,
        timestep=torch.tensor(t[:batch]),
    )
    return model, inputs


def zimage(batch=2, t=(0.3, 0.7)):
    """``ZImagePipeline``: a list of latents [C, 1, H, W] (one per item), timestep ``(1000 - t) / 1000`` (0 = noise),
    a list of caption states [L, cap_feat_dim] (the Qwen3 states of the unpadded prompt; one length here, so the
    unified sequences need no mask). 15 image tokens and 7 caption tokens, each padded to 32."""
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=24, axes_dims=[4, 6, 6], axes_lens=[80, 16, 16],
    )  # fmt: skip
    with torch.no_grad():  # zeros at init: random pad tokens, so that a wrong padding shows
        model.x_pad_token.normal_()
        model.cap_pad_token.normal_()
    inputs = dict(
        x=[torch.randn(4, 1, 6, 10) for _ in range(batch)],
        t=torch.tensor(t[:batch]),
        cap_feats=[torch.randn(7, 24) for _ in range(batch)],
    )
    return model, inputs


def hunyuanimage(batch=2, t=(300.0, 700.0)):
    """``HunyuanImagePipeline``: latents [B, C, H, W], timestep ``t`` (1000 = noise), the Qwen2.5-VL states and their
    padding mask (the last token of item 0 is padding; the ByT5 glyph states are optional and left out)."""
    from diffusers import HunyuanImageTransformer2DModel

    model = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=(2, 2), text_embed_dim=24, rope_axes_dim=(8, 8),
    )  # fmt: skip
    T = 6
    mask = torch.ones(batch, T, dtype=torch.int64)
    mask[0, -1] = 0
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 6, 10),
        timestep=torch.tensor(t[:batch]),
        encoder_hidden_states=torch.randn(batch, T, 24),
        encoder_attention_mask=mask,
    )
    return model, inputs
