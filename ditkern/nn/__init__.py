"""Reusable modules built on ditkern's ops."""

from ditkern.nn.sparse_moe import ExpertChoiceMoE, SparseMoE

__all__ = ["SparseMoE", "ExpertChoiceMoE"]
