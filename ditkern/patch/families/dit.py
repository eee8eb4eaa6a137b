"""DiT (``DiTTransformer2DModel``): ``BasicTransformerBlock`` with ``ada_norm_zero`` (class + timestep embedding).

Stack: ``transformer_blocks``, image stream only. Attention: ``attn1`` is self-attention over the image tokens (no
text); the grid is the latent's over the patch size.
"""

from ditkern.patch import basic
from ditkern.patch.basic import basic_block_rule
from ditkern.patch.common import NORM_RULES
from ditkern.patch.family import COMMON_SKIP, Family, QuantLayout

FAMILY = Family(
    name="dit",
    model_classes=("DiTTransformer2DModel",),
    rules={"BasicTransformerBlock": basic_block_rule, "AdaLayerNormZero": NORM_RULES["AdaLayerNormZero"]},
    stack=basic.STACK,
    attention=basic.TOKENS,
    quant=QuantLayout(skip=COMMON_SKIP),
    notes="the final adaLN (proj_out_1 on the conditioning) lives in the model's forward and is not fused",
)
