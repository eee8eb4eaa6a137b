"""Configuration of ``ditkern.patch``: one frozen dataclass; keyword options of ``patch`` override its fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ditkern._backend import requested_backend


@dataclass(frozen=True)
class PatchConfig:
    """What ``ditkern.patch`` does. The defaults are lossless (fused kernels only).

    fused_norms: fuse adaLN norm + modulate, and the gated residual add with the next norm + modulate.
    backend:     None (``DITKERN_BACKEND`` or auto: cuda -> triton -> torch), "auto", "cuda", "triton" or "torch".
                 A named backend that cannot run raises at call time with its reason. In auto mode, where no fused
                 kernel can run (a CPU), the lossless adaLN rules leave each module to its own native forward (the
                 report says why); "torch" asked for by name installs the fused forwards on the fp32 reference.
    cache, quant, attention, moe: the lossy features, each validated by the feature that owns it; None = off.
    """

    fused_norms: bool = True
    backend: str | None = None
    cache: Any = None  # ditkern.TaylorCache(...)      (feature: ditkern/cache)
    quant: Any = None  # "fp4" | "w4a8" | QuantConfig  (feature: ditkern/quant)
    attention: Any = None  # ditkern.WindowAttention(...) (feature: ditkern/attention)
    moe: Any = None  # MoE dispatch options            (feature: ditkern/moe)

    def __post_init__(self):
        if not isinstance(self.fused_norms, bool):
            raise TypeError(f"fused_norms must be True or False, got {self.fused_norms!r}")
        if self.backend is not None:
            requested_backend(self.backend)  # raises naming the bad value
