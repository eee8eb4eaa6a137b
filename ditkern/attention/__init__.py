"""Windowed and linear attention for diffusers DiTs: ``ditkern.patch(model, attention=WindowAttention(...))``.

The ops live in ``ditkern.ops.window_attention`` / ``ditkern.ops.linear_attention``; the feature (processor swaps per
family, read from its declaration) in ``ditkern.attention.feature``, registered by ``ditkern.patch``.
"""

from ditkern.attention.config import WindowAttention

__all__ = ["WindowAttention"]
