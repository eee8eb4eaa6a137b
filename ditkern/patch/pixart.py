"""PixArt-alpha/sigma (``PixArtTransformer2DModel``): ``BasicTransformerBlock`` with ``ada_norm_single``."""

from ditkern.patch.basic import basic_block_rule
from ditkern.patch.engine import Family, register_family

PIXART = register_family(
    Family(
        name="pixart",
        model_classes=("PixArtTransformer2DModel",),
        rules={"BasicTransformerBlock": basic_block_rule},
        notes="the final scale-shift lives in the model's forward and is not fused",
    )
)
