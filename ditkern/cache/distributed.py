"""The Taylor cache under diffusers' context parallelism: one gate decision for all ranks.

Under sequence parallelism each rank holds a slice of the tokens, so the gate's error sums computed on local tokens
differ between ranks; :func:`gate_all_reduce` sums them over the model's context-parallel group so that every rank
takes the same branch. Outside a parallel run it returns its input unchanged.

The group is the one diffusers records on the model in ``enable_parallelism`` (read by
:func:`ditkern.patch.parallel.context_parallel_config`): the ``ContextParallelConfig``, whose ``_flattened_mesh``
(ring x ulysses) is the mesh that diffusers' ``EquipartitionSharder`` splits the sequence over, so its group is
exactly the set of ranks whose tokens make up one sequence. Tensor parallelism shards weights, not tokens: every
rank of a TP group sees every token, its sums are already global, and nothing is reduced.
"""

from __future__ import annotations

import torch
from torch import nn

from ditkern.patch.parallel import context_parallel_config


def cp_mesh(model: nn.Module):
    """The device mesh of ``model``'s context parallelism, or None (not distributed, no CP, a mesh of one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    mesh = getattr(context_parallel_config(model), "_flattened_mesh", None)
    return None if mesh is None or mesh.size() == 1 else mesh


def gate_all_reduce(model: nn.Module, sums: torch.Tensor) -> torch.Tensor:
    """``sums``: [2, B] float64 on the CPU (squared forecast error, squared reference, per batch item, over this
    rank's tokens). Returns the sums over every rank of the model's context-parallel group."""
    mesh = cp_mesh(model)
    if mesh is None:
        return sums
    # The collective runs on the backend's device: gloo reduces CPU tensors, NCCL only device ones.
    device = torch.device(mesh.device_type)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.accelerator.current_device_index())
    buf = sums.to(device, copy=True)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM, group=mesh.get_group())
    return buf.cpu()
