"""LoRA adapters on ditkern-quantized layers.

Runtime path: a peft adapter (``pipe.load_lora_weights(...)``, ``model.add_adapter(LoraConfig(...))``) wraps a
quantized linear like any ``nn.Linear``: peft's ``lora.Linear`` calls the quantized layer (the packed GEMM) and adds
``scale * B(A(x))`` beside it, so ``set_adapters`` / ``disable_adapters`` / ``delete_adapters`` /
``unload_lora_weights`` behave as on the unquantized model (tests/quant/test_lora.py).

Fusing: peft's ``merge`` (``pipe.fuse_lora()``) writes into ``base_layer.weight``, which a quantized layer does not
hold (its ``weight`` is a one-element placeholder; torch refuses the in-place add). :func:`fuse_lora` merges instead:
``W' = W_hat + sum_a scaling_a * B_a @ A_a``, re-quantized with the layer's format, group size and scale dtype
(absmax), and marks the adapters merged in peft, which then skips their runtime path.
"""

from __future__ import annotations

import torch
from torch import nn

from ditkern.formats import quantize

_SCALE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.uint8: "e8m0"}


def _lora_layers(model: nn.Module):
    """(path, peft LoRA layer, its quantized base layer) for each LoRA layer wrapping a ditkern-quantized linear."""
    for path, m in model.named_modules():
        get_base = getattr(m, "get_base_layer", None)
        if get_base is None or not hasattr(m, "lora_A") or not hasattr(m, "get_delta_weight"):
            continue
        base = get_base()
        if "_ditkern_quant" in base.__dict__:
            yield path, m, base


def fuse_lora(model_or_pipeline, adapter_names: list[str] | None = None, lora_scale: float = 1.0) -> list[str]:
    """Merge the active (or the named) LoRA adapters into every ditkern-quantized layer they wrap, re-quantizing the
    merged weight; returns the paths of the fused layers. Layers that are not quantized are left to peft
    (``pipe.fuse_lora()`` / ``layer.merge()``). AWQ-smoothed layers are re-quantized without smoothing."""
    from ditkern.quant.checkpoint import _transformer  # noqa: PLC0415
    from ditkern.quant.feature import _int_view  # noqa: PLC0415

    if not isinstance(lora_scale, (int, float)) or isinstance(lora_scale, bool):
        raise TypeError(f"fuse_lora: lora_scale must be a number, got {lora_scale!r}")
    model = _transformer(model_or_pipeline)
    fused = []
    for path, layer, base in _lora_layers(model):
        names = list(adapter_names) if adapter_names is not None else list(layer.active_adapters)
        names = [a for a in names if a in layer.lora_A and a not in layer.merged_adapters]
        if not names:
            continue
        st = base.__dict__["_ditkern_quant"]
        qw = st["qweight"]
        with torch.no_grad():
            w = qw.dequantize(torch.float32)
            for a in names:
                w = w + lora_scale * layer.get_delta_weight(a).float().to(w.device)
            new = quantize(w, qw.format, qw.group_size, _SCALE_NAME[qw.scales.dtype], name=path)
        dev = base.qweight_packed.device
        base._buffers["qweight_packed"] = new.packed.to(dev)
        base._buffers["qweight_scales"] = _int_view(new.scales.to(dev))
        base._buffers.pop("qweight_inv_smooth", None)
        st["qweight"] = new
        layer.merged_adapters.extend(names)
        fused.append(path)
    return fused
