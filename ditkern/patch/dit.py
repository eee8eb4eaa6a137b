"""DiT (``DiTTransformer2DModel``): ``BasicTransformerBlock`` with ``ada_norm_zero`` (class + timestep embedding)."""

from ditkern.patch.basic import basic_block_rule
from ditkern.patch.common import NORM_RULES
from ditkern.patch.engine import Family, register_family

DIT = register_family(
    Family(
        name="dit",
        model_classes=("DiTTransformer2DModel",),
        rules={"BasicTransformerBlock": basic_block_rule, "AdaLayerNormZero": NORM_RULES["AdaLayerNormZero"]},
        notes="the final adaLN (proj_out_1 on the conditioning) lives in the model's forward and is not fused",
    )
)
