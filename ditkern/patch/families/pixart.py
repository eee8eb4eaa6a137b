"""PixArt-alpha/sigma (``PixArtTransformer2DModel``): ``BasicTransformerBlock`` with ``ada_norm_single``.

Stack: ``transformer_blocks``, image stream only (the text enters through cross-attention). Attention: ``attn1`` is
self-attention over the image tokens; ``attn2`` (cross-attention to the text) stays dense. Quantization also keeps
the text projection and the shared timestep modulation (``adaln_single``) in high precision.
"""

from ditkern.patch import basic
from ditkern.patch.basic import basic_block_rule
from ditkern.patch.family import COMMON_SKIP, Family, QuantLayout

FAMILY = Family(
    name="pixart",
    model_classes=("PixArtTransformer2DModel",),
    rules={"BasicTransformerBlock": basic_block_rule},
    stack=basic.STACK,
    attention=basic.TOKENS,
    quant=QuantLayout(skip=(*COMMON_SKIP, "caption_projection*", "adaln_single*")),
    notes="the final scale-shift lives in the model's forward and is not fused",
)
