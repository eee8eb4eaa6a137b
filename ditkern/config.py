"""Configuration of ``ditkern.patch``: one frozen dataclass; keyword options of ``patch`` override its fields."""

from __future__ import annotations

from dataclasses import dataclass

from ditkern._backend import requested_backend


@dataclass(frozen=True)
class PatchConfig:
    """What ``ditkern.patch`` does. The defaults are lossless (fused kernels only).

    fused_norms: fuse adaLN norm + modulate, and the gated residual add with the next norm + modulate.
    backend:     None (``DITKERN_BACKEND`` or auto: cuda -> triton -> torch), "auto", "cuda", "triton" or "torch".
                 A named backend that cannot run raises at call time with its reason.
    """

    fused_norms: bool = True
    backend: str | None = None

    def __post_init__(self):
        if not isinstance(self.fused_norms, bool):
            raise TypeError(f"fused_norms must be True or False, got {self.fused_norms!r}")
        if self.backend is not None:
            requested_backend(self.backend)  # raises naming the bad value
