"""Options of the ``moe`` patch feature."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEConfig:
    """``ditkern.patch(pipe, moe=MoEConfig(...))``. Without it (``moe=None``) MoE layers are swapped with defaults.

    enabled: swap MoE feed-forwards (HiDream's ``MOEFeedForwardSwiGLU``) for fused dispatch (``SparseMoE``).
             ``moe=False`` is the same as ``MoEConfig(enabled=False)``.
    block_m: rows per GEMM tile, the padding unit of each expert's segment (power of two >= 16), or None (default):
             chosen per call from the rows per expert (``ditkern.ops.moe.auto_block_m``: 128 from 256 rows per expert).
    """

    enabled: bool = True
    block_m: int | None = None

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise TypeError(f"MoEConfig.enabled must be True or False, got {self.enabled!r}")
        b = self.block_m
        if b is None:
            return
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"MoEConfig.block_m must be a power of two >= 16, got {b!r}")


def resolve(value) -> MoEConfig:
    """The MoEConfig for a ``PatchConfig.moe`` value: None -> defaults, bool -> enabled, MoEConfig as is."""
    if value is None:
        return MoEConfig()
    if isinstance(value, bool):
        return MoEConfig(enabled=value)
    if isinstance(value, MoEConfig):
        return value
    raise TypeError(f"moe must be None, True/False or a ditkern.moe.MoEConfig, got {type(value).__name__}")
