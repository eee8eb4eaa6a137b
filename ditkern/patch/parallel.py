"""diffusers' parallelism as ditkern sees it: the one place that reads what ``enable_parallelism`` records on a model.

``ModelMixin.enable_parallelism(config=...)`` (diffusers 0.42) stores a ``ParallelConfig`` on the model as
``model._parallel_config``, holding a ``ContextParallelConfig`` (``context_parallel_config``: Ulysses / ring, tokens
sharded over ranks) and / or a ``TensorParallelConfig`` (``tensor_parallel_config``: the model's ``_tp_plan`` linears
sharded over ranks as ``torch.distributed.tensor.DTensor`` weights, by ``parallelize_module``). It records the config
before it applies it, so a model whose parallelism diffusers then refused (tensor parallelism on a CPU mesh) carries
the config with nothing sharded: what is sharded is read from the weights themselves.
"""

from __future__ import annotations

import fnmatch

from torch import nn


def context_parallel_config(model: nn.Module):
    """The ``ContextParallelConfig`` diffusers' ``enable_parallelism`` gave ``model``, or None."""
    return getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)


def tensor_parallel_config(model: nn.Module):
    """The ``TensorParallelConfig`` diffusers' ``enable_parallelism`` gave ``model``, or None."""
    return getattr(getattr(model, "_parallel_config", None), "tensor_parallel_config", None)


def tp_sharded_linears(model: nn.Module) -> dict[str, str]:
    """``{module path: placement}`` of the linear layers of ``model`` whose weight tensor parallelism sharded (a
    ``DTensor``, e.g. ``Shard(dim=0)`` for a ``"colwise"`` entry of the ``_tp_plan``). Empty without TP."""
    if tensor_parallel_config(model) is None:
        return {}
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    return {
        path: ", ".join(map(str, m.weight.placements))
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and isinstance(m._parameters.get("weight"), DTensor)
    }


def quant_refusal(model: nn.Module, quant) -> str | None:
    """Why ``quant`` (a ``PatchConfig.quant``: a QuantConfig or a preset name) cannot be applied to ``model`` under
    its tensor parallelism, or None.

    A quantized linear packs its weight's codes and keeps one scale per group along the input dimension; under tensor
    parallelism each rank holds one shard of the weight (output rows for "colwise", input columns for "rowwise", per
    fused block for the packed styles), and a quantized layer would need its packed codes and scales sharded the same
    way, per shard - not implemented. Linears the plan leaves whole (replicated) quantize as on one device.
    """
    if quant is None:
        return None
    sharded = tp_sharded_linears(model)
    if not sharded:
        return None
    preq = getattr(quant, "_prequantized", None)  # ditkern.load_quantized: exactly the layers in the checkpoint
    # an explicit skip list is fnmatch patterns over module paths (QuantConfig.skip), matched here as quant matches
    # it; without one (the family's default list, which only the quant feature resolves) every sharded linear
    # counts: no default list keeps a DiT block's attention and MLP projections, the layers a _tp_plan shards
    skip = getattr(quant, "skip", None) or ()
    hit = [p for p in sharded if (p in preq if preq is not None else not any(fnmatch.fnmatchcase(p, s) for s in skip))]
    if not hit:
        return None
    shown = ", ".join(f"{p} ({sharded[p]})" for p in hit[:3]) + (f" and {len(hit) - 3} more" if len(hit) > 3 else "")
    return (
        f"quant= cannot quantize the {len(hit)} linear layer(s) that tensor parallelism shards ({shown}): packed "
        "weights and scales per shard are not implemented. Keep them in high precision with QuantConfig(skip=[...]) "
        f"covering them, e.g. the patterns of {type(model).__name__}._tp_plan plus the family's default list, which "
        "a skip list replaces (ditkern.quant.feature.default_skip(model)); or patch without quant="
    )

