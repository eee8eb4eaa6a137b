"""Reusable modules built on ditkern's ops."""

from ditkern.nn.sparse_moe import SparseMoE

__all__ = ["SparseMoE"]
