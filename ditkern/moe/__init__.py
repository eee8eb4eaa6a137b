"""Sparse mixture-of-experts: the ``moe`` patch option (HiDream's MoE feed-forwards on fused dispatch) and the
Dense2MoE-style converter ``densify_to_moe``. Kernels: ``ditkern.ops.moe``; module: ``ditkern.nn.SparseMoE``."""

from ditkern.moe.config import MoEConfig
from ditkern.moe.densify import densify_to_moe

__all__ = ["MoEConfig", "densify_to_moe"]
