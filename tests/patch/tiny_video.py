"""Tiny random video DiTs from diffusers (built from config, fp32) and the inputs their pipelines pass them."""

from __future__ import annotations

import torch


def wan_vace(batch=2):
    """``WanVACETransformer3DModel``: 2 Wan blocks, 2 VACE blocks (vace_layers 0 and 1); the control latents are the
    pipeline's video + mask latents (``vace_in_channels``), one conditioning scale per VACE layer."""
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=6,
    )  # fmt: skip
    T, H, W = 2, 4, 6  # 2 x 2 x 3 tokens
    inputs = dict(
        hidden_states=torch.randn(batch, 4, T, H, W),
        encoder_hidden_states=torch.randn(batch, 7, 16),
        timestep=torch.tensor([300.0, 700.0][:batch]),
        control_hidden_states=torch.randn(batch, 6, T, H, W),
        control_hidden_states_scale=torch.tensor([1.0, 0.7]),
    )
    return model, inputs


FAMILIES = {"wan_vace": wan_vace}


def ltx2(batch=2, v23=False):
    """``LTX2VideoTransformer3DModel``: 2 audio-video blocks. The pipeline passes packed video tokens ``[B, F*H*W, C]``
    (patch size 1), packed audio tokens, the connectors' text states for both streams with their mask, one timestep
    per item (``sigma`` too, for LTX-2.3), and the latent sizes. ``v23``: LTX-2.3's options (gated attention, prompt
    cross-attention modulation, the perturbed-attention processor)."""
    from diffusers import LTX2VideoTransformer3DModel

    extra = dict(gated_attn=True, audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True,
                 perturbed_attn=True) if v23 else {}  # fmt: skip
    model = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        audio_in_channels=6, audio_out_channels=6, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=2, caption_channels=24, **extra,
    )  # fmt: skip
    F, H, W, A, T = 2, 2, 3, 5, 6
    mask = torch.ones(batch, T, dtype=torch.long)
    mask[-1, -2:] = 0  # padded prompt
    t = torch.tensor([300.0, 700.0][:batch])
    inputs = dict(
        hidden_states=torch.randn(batch, F * H * W, 8),
        audio_hidden_states=torch.randn(batch, A, 6),
        encoder_hidden_states=torch.randn(batch, T, 24),
        audio_encoder_hidden_states=torch.randn(batch, T, 24),
        timestep=t,
        sigma=t / 1000,
        encoder_attention_mask=mask,
        audio_encoder_attention_mask=mask,
        num_frames=F,
        height=H,
        width=W,
        fps=24.0,
        audio_num_frames=A,
    )
    return model, inputs


FAMILIES["ltx2"] = ltx2


def hunyuan_video15(batch=2, i2v=False):
    """``HunyuanVideo15Transformer3DModel``: 2 dual-stream blocks, 1 refiner block. The pipeline passes the latents
    concatenated with the condition latents and mask (``in_channels`` = 2 * C + 1), the Qwen and ByT5 text states with
    their masks (padded), and the SigLIP image embeddings (zeros for text-to-video)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    model = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=24, text_embed_2_dim=20,
        image_embed_dim=12, rope_axes_dim=(4, 6, 6),
    )  # fmt: skip
    F, H, W, T, T2 = 1, 3, 4, 4, 3
    mask = torch.ones(batch, T, dtype=torch.long)
    mask[-1, -2:] = 0
    mask_2 = torch.ones(batch, T2, dtype=torch.long)
    mask_2[0, -1:] = 0
    inputs = dict(
        hidden_states=torch.randn(batch, 9, F, H, W),
        timestep=torch.tensor([300.0, 700.0][:batch]),
        encoder_hidden_states=torch.randn(batch, T, 24),
        encoder_attention_mask=mask,
        encoder_hidden_states_2=torch.randn(batch, T2, 20),
        encoder_attention_mask_2=mask_2,
        image_embeds=torch.randn(batch, 2, 12) if i2v else torch.zeros(batch, 2, 12),
    )
    return model, inputs


FAMILIES["hunyuan_video15"] = hunyuan_video15
