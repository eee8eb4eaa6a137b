"""A tiny random HiDreamImageTransformer2DModel built from config (dim 32, 4 experts top-2), and inputs for it."""

from __future__ import annotations

import torch


def hidream(batch=2, num_layers=1, num_single_layers=1, experts=4, top_k=2, size=8):
    from diffusers import HiDreamImageTransformer2DModel

    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, caption_channels=[24, 20], text_emb_dim=16,
        num_routed_experts=experts, num_activated_experts=top_k, axes_dims_rope=(8, 4, 4), max_resolution=(16, 16),
        llama_layers=list(range(num_layers + num_single_layers)),
    )  # fmt: skip
    L = num_layers + num_single_layers
    inputs = dict(
        hidden_states=torch.randn(batch, 4, size, size),
        timesteps=torch.tensor([300.0, 700.0][:batch]),
        encoder_hidden_states_t5=torch.randn(batch, 5, 24),
        encoder_hidden_states_llama3=torch.randn(L, batch, 3, 20),
        pooled_embeds=torch.randn(batch, 16),
    )
    return model, inputs
