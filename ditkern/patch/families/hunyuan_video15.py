"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): dual-stream blocks fused, adaLN norms fused.

``HunyuanVideo15TransformerBlock`` has FLUX's double-stream structure: ``AdaLayerNormZero`` for each stream (fused by the
shared norm rule), joint attention, then per stream the gated attention residual + ``norm2`` + the MLP modulation (fused,
``gated_residual_adaln``). The final ``AdaLayerNormContinuous`` is fused too. The text token refiner
(``context_embedder``: its own ``HunyuanVideo15AdaNorm`` gating, no norm after a gated residual) is left as it is.

Stack: ``transformer_blocks``, ``(hidden_states, encoder_hidden_states) -> (hidden_states, encoder_hidden_states)`` (the
image stream first, unlike FLUX); the model reads the image stream after it.

Windowed attention: the blocks' ``attn`` (``HunyuanVideo15AttnProcessor2_0``), text last; the text of the joint
sequence is the Qwen states, the ByT5 states and the image-embedding tokens (reordered valid first), the grid the latent
over ``(patch_size_t, patch_size, patch_size)``. The processor passes SDPA ``k[:, None, :, None] & k[:, None, None, :]``
with ``k`` = ones for the image tokens, then the text padding mask: every image query's row is the text key-padding
mask (the window op's ``text_mask``); padded text queries' rows are all masked (SDPA returns zeros there, the op lets
them attend to the valid keys), and those tokens are keys masked in every later block and dropped after the stack (the
model reads only the image stream). Any other mask is refused at call time (``processors.text_key_mask``).
"""

from __future__ import annotations

import inspect
import math

from ditkern.attention.processors import accepts_text_padding
from ditkern.patch.common import (
    BLOCK_WHAT, NORM_RULES, adaln_plan, check_fingerprint, has_attrs, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, Family, QuantLayout, Stack, Streams, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS

IMAGE_TEXT = Streams(takes=("hidden_states", "encoder_hidden_states"), returns=("hidden_states", "encoder_hidden_states"))
"""``block(hidden_states, encoder_hidden_states, ...) -> (hidden_states, encoder_hidden_states)``"""


@accepts_text_padding
def hunyuan_video15_grid(model, args, kwargs, read_ids: bool = True):
    """The latent ``[B, C, F, H, W]`` over ``(patch_size_t, patch_size, patch_size)``; the joint sequence's text is the
    Qwen states + the ByT5 states + the image-embedding tokens."""
    a = inspect.signature(type(model).forward).bind_partial(model, *args, **kwargs).arguments
    hs = a["hidden_states"]
    p, pt = model.config.patch_size, model.config.patch_size_t
    grid = (hs.shape[-3] // pt, hs.shape[-2] // p, hs.shape[-1] // p)
    text = sum(a[k].shape[1] for k in ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")
               if a.get(k) is not None)  # fmt: skip
    return grid, math.prod(grid), text


def dual_stream_block_rule(fingerprint: str, rotary: str):
    """The rule of a HunyuanVideo-style dual-stream block (also HunyuanImage's): ``fingerprint`` names the validated
    diffusers forward, ``rotary`` the name under which that forward takes its rotary embedding."""

    def rule(block, cfg):
        return _dual_stream_plan(block, cfg, fingerprint, rotary)

    return rule


def _dual_stream_plan(block, cfg, fingerprint, rotary_name):
    if not cfg.fused_norms:
        return None
    reason = (
        has_attrs(block, "norm1", "norm1_context", "attn", "norm2", "ff", "norm2_context", "ff_context")
        or check_fingerprint(block, FINGERPRINTS[fingerprint])
        or next((s for s in (norm_spec(block.norm2), norm_spec(block.norm2_context)) if isinstance(s, str)), None)
    )
    if reason:
        return reason
    backend = cfg.backend

    def forward(block, hidden_states, encoder_hidden_states, temb, attention_mask=None, rotary=None, *args, **kwargs):
        rotary = kwargs.pop(rotary_name, rotary)
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            encoder_hidden_states, emb=temb
        )
        attn_output, context_attn_output = block.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            attention_mask=attention_mask,
            image_rotary_emb=rotary,
        )
        # per stream: x + gate_msa * attn, then norm2 * (1 + scale_mlp) + shift_mlp, in one pass
        hidden_states, norm_hidden_states = residual_modulate(
            block.norm2, hidden_states, attn_output, gate_msa, shift_mlp, scale_mlp, backend
        )
        encoder_hidden_states, norm_encoder_hidden_states = residual_modulate(
            block.norm2_context, encoder_hidden_states, context_attn_output, c_gate_msa, c_shift_mlp, c_scale_mlp,
            backend,
        )  # fmt: skip
        ff_output = block.ff(norm_hidden_states)
        context_ff_output = block.ff_context(norm_encoder_hidden_states)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        return hidden_states, encoder_hidden_states

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm2, cfg)


hunyuan_video15_block_rule = dual_stream_block_rule("HunyuanVideo15TransformerBlock", "freqs_cis")


FAMILY = Family(
    name="hunyuan_video15",
    model_classes=("HunyuanVideo15Transformer3DModel",),
    rules={
        "HunyuanVideo15TransformerBlock": hunyuan_video15_block_rule,
        "AdaLayerNormZero": NORM_RULES["AdaLayerNormZero"],
        "AdaLayerNormContinuous": NORM_RULES["AdaLayerNormContinuous"],
    },
    stack=Stack(
        lists=("transformer_blocks",),
        blocks={"HunyuanVideo15TransformerBlock": IMAGE_TEXT},
        reads_after=("hidden_states",),
    ),
    # the processor's [B, 1, S, S] mask: the outer product of the text padding mask, taken as text_mask
    attention=TokenLayout(
        self_attention={"HunyuanVideo15TransformerBlock": ("attn",)},
        processors=frozenset({"HunyuanVideo15AttnProcessor2_0"}),
        text="last",
        grid=hunyuan_video15_grid,
    ),
    quant=QuantLayout(skip=COMMON_SKIP),
    notes="the token refiner (context_embedder) is not fused (and not windowed)",
)
