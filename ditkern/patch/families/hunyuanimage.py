"""HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``): dual-stream blocks fused, adaLN norms fused.

``HunyuanImageTransformerBlock`` (dual stream): ``AdaLayerNormZero`` for each stream (the shared norm rule), joint
attention, then per stream the gated attention residual + ``norm2`` / ``norm2_context`` + the MLP modulation, fused
(``gated_residual_adaln``). ``HunyuanImageSingleTransformerBlock``: its ``AdaLayerNormZeroSingle`` is fused; the block
ends in ``residual + gate * proj_out(...)`` with no norm after it, so the block itself stays as it is. The final
``AdaLayerNormContinuous`` is fused. The text token refiner (``context_embedder``, its own ``HunyuanImageAdaNorm``
gating, no norm after a gated residual) is left as it is.

Stack: the dual-stream, then the single-stream blocks, all ``(hidden_states, encoder_hidden_states) ->
(hidden_states, encoder_hidden_states)`` (the single blocks concatenate and split the streams inside), so the two lists
are one chain; the model reads the image stream after it.

Windowed attention: both block kinds' ``attn`` (``HunyuanImageAttnProcessor``), text last (the single blocks
concatenate image then text); the text is the Qwen states (+ the ByT5 states when given), the grid the latent over
``patch_size`` (2-D or 3-D). The model passes SDPA ``attention_mask [B, 1, 1, S]``: ones for the image tokens, then the
text padding mask, the same for every query row - a pure key-padding mask, which becomes the window op's
``text_mask`` (padded text queries attend to the valid keys in both). Any other mask is refused at call time
(``processors.text_key_mask``).
"""

from __future__ import annotations

import inspect
import math

from ditkern.attention.processors import accepts_text_padding
from ditkern.patch.common import NORM_RULES
from ditkern.patch.families.hunyuan_video15 import dual_stream_block_rule
from ditkern.patch.family import COMMON_SKIP, Family, QuantLayout, Stack, Streams, TokenLayout

IMAGE_TEXT = Streams(
    takes=("hidden_states", "encoder_hidden_states"), returns=("hidden_states", "encoder_hidden_states")
)
"""``block(hidden_states, encoder_hidden_states, temb, ...) -> (hidden_states, encoder_hidden_states)``"""


@accepts_text_padding
def hunyuanimage_grid(model, args, kwargs, read_ids: bool = True):
    """The latent ``[B, C, H, W]`` or ``[B, C, F, H, W]`` over ``patch_size``; the joint sequence's text is the Qwen
    states (+ the ByT5 states when the model has ``context_embedder_2`` and they are given)."""
    a = inspect.signature(type(model).forward).bind_partial(model, *args, **kwargs).arguments
    hs = a["hidden_states"]
    grid = tuple(d // p for d, p in zip(hs.shape[2:], model.config.patch_size))
    text = a["encoder_hidden_states"].shape[1]
    if getattr(model, "context_embedder_2", None) is not None and a.get("encoder_hidden_states_2") is not None:
        text += a["encoder_hidden_states_2"].shape[1]
    return grid, math.prod(grid), text


# the same dual-stream block as HunyuanVideo 1.5; its forward takes the rotary embedding as image_rotary_emb
hunyuanimage_block_rule = dual_stream_block_rule("HunyuanImageTransformerBlock", "image_rotary_emb")


FAMILY = Family(
    name="hunyuanimage",
    model_classes=("HunyuanImageTransformer2DModel",),
    rules={
        "HunyuanImageTransformerBlock": hunyuanimage_block_rule,
        "AdaLayerNormZero": NORM_RULES["AdaLayerNormZero"],
        "AdaLayerNormZeroSingle": NORM_RULES["AdaLayerNormZeroSingle"],
        "AdaLayerNormContinuous": NORM_RULES["AdaLayerNormContinuous"],
    },
    stack=Stack(
        lists=("transformer_blocks", "single_transformer_blocks"),
        blocks={"HunyuanImageTransformerBlock": IMAGE_TEXT, "HunyuanImageSingleTransformerBlock": IMAGE_TEXT},
        reads_after=("hidden_states",),
    ),
    # the model's [B, 1, 1, S] mask: a text key-padding mask, taken as text_mask
    attention=TokenLayout(
        self_attention={"HunyuanImageTransformerBlock": ("attn",), "HunyuanImageSingleTransformerBlock": ("attn",)},
        processors=frozenset({"HunyuanImageAttnProcessor"}),
        text="last",
        grid=hunyuanimage_grid,
    ),
    quant=QuantLayout(skip=COMMON_SKIP),
    notes="single-stream blocks end in a gated residual with no norm after it (only their AdaLayerNormZeroSingle is "
    "fused); the token refiner (context_embedder) is not fused",
)
