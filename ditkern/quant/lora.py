"""LoRA adapters on ditkern-quantized layers.

Runtime path: a peft adapter (``pipe.load_lora_weights(...)``, ``model.add_adapter(LoraConfig(...))``) wraps a
quantized linear like any ``nn.Linear``: peft's ``lora.Linear`` calls the quantized layer (the packed GEMM) and adds
``scale * B(A(x))`` beside it, so ``set_adapters`` / ``disable_adapters`` / ``delete_adapters`` /
``unload_lora_weights`` behave as on the unquantized model (tests/quant/test_lora.py).

Fusing: peft's ``merge`` writes into ``base_layer.weight``, which a quantized layer does not hold (its ``weight`` is
a one-element placeholder; torch refuses the in-place add). :func:`fuse_lora` merges instead:
``W' = W_hat + sum_a scaling_a * B_a @ A_a``, re-quantized with the layer's format, group size and scale dtype
(absmax), and marks the adapters merged in peft, which then skips their runtime path; :func:`unfuse_lora` puts the
layer's pre-fusion packed weight back (bit for bit). The quant patch gives the patched transformer instance its own
``fuse_lora`` / ``unfuse_lora`` (diffusers' ``ModelMixin`` signatures) that do this for the quantized layers and what
diffusers does for the others, so ``pipe.fuse_lora()`` and ``pipe.transformer.unfuse_lora()`` work; ``unpatch``
removes them. ``pipe.unfuse_lora()`` does not go through the transformer (diffusers calls peft's ``unmerge`` on every
layer, which writes into the placeholder): use ``pipe.transformer.unfuse_lora()`` or :func:`unfuse_lora`.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ditkern.formats import SCALE_DTYPES, quantize, scale_kind
from ditkern.patch.engine import is_patched, targets


def _lora_layers(model_or_pipeline, caller: str = "fuse_lora"):
    """(path, peft LoRA layer, its quantized base layer) for each LoRA layer wrapping a ditkern-quantized linear of
    the module, or of the pipeline's transformer(s)."""
    found = targets(model_or_pipeline)
    if not found:
        raise TypeError(f"{caller}: expected a diffusers transformer or a pipeline with a `transformer`, got "
                        f"{type(model_or_pipeline).__name__}")  # fmt: skip
    for prefix, model in found:
        yield from _model_lora_layers(model, prefix)


def _model_lora_layers(model: nn.Module, prefix: str):
    for path, m in model.named_modules():
        get_base = getattr(m, "get_base_layer", None)
        if get_base is None or not hasattr(m, "lora_A") or not hasattr(m, "get_delta_weight"):
            continue
        base = get_base()
        if "_ditkern_quant" in base.__dict__:
            yield ".".join(p for p in (prefix, path) if p), m, base


_BUFFERS = ("qweight_packed", "qweight_scales", "qweight_inv_smooth")


def fuse_lora(model_or_pipeline, adapter_names: list[str] | None = None, lora_scale: float = 1.0,
              safe_fusing: bool = False) -> list[str]:  # fmt: skip
    """Merge the active (or the named) LoRA adapters into every ditkern-quantized layer they wrap, re-quantizing the
    merged weight; returns the paths of the fused layers. As diffusers' ``fuse_lora``: ``lora_scale`` multiplies the
    active adapters' scaling first (peft ``scale_layer``), ``safe_fusing`` refuses a non-finite merged weight. Layers
    that are not quantized are left to peft (``pipe.fuse_lora()`` / ``layer.merge()``). AWQ-smoothed layers are
    re-quantized without smoothing."""
    if not isinstance(lora_scale, (int, float)) or isinstance(lora_scale, bool):
        raise TypeError(f"fuse_lora: lora_scale must be a number, got {lora_scale!r}")
    fused = []
    for path, layer, base in _lora_layers(model_or_pipeline, "fuse_lora"):
        if lora_scale != 1.0:
            layer.scale_layer(lora_scale)
        names = list(adapter_names) if adapter_names is not None else list(layer.active_adapters)
        names = [a for a in names if a in layer.lora_A and a not in layer.merged_adapters]
        if not names:
            continue
        st = base.__dict__["_ditkern_quant"]
        qw = st["qweight"]
        with torch.no_grad():
            w = qw.dequantize(torch.float32)
            for a in names:
                w = w + layer.get_delta_weight(a).float().to(w.device)
            if safe_fusing and not torch.isfinite(w).all():
                raise ValueError(f"fuse_lora: {path}: the merged weight is not finite; adapters {names} seem broken")
            new = quantize(w, qw.format, qw.group_size, SCALE_DTYPES[scale_kind(qw.scales)], name=path)
        if "lora_unfused" not in st:  # the layer as patched, for unfuse_lora
            st["lora_unfused"] = (qw, {k: base._buffers[k] for k in _BUFFERS if k in base._buffers})
        dev = base.qweight_packed.device
        base._buffers["qweight_packed"] = new.packed.to(dev)
        # stored as the integer view the patch chose for this scale dtype (the same as before: same format)
        base._buffers["qweight_scales"] = new.scales.to(dev).view(base._buffers["qweight_scales"].dtype)
        base._buffers.pop("qweight_inv_smooth", None)
        st["qweight"] = new
        layer.merged_adapters.extend(names)
        fused.append(path)
    return fused


def unfuse_lora(model_or_pipeline) -> list[str]:
    """Undo :func:`fuse_lora` on every quantized layer: its packed weight as before the first fusion, bit for bit,
    and no adapter marked merged (their runtime path runs again). Returns the paths of the restored layers."""
    restored = []
    for path, layer, base in _lora_layers(model_or_pipeline, "unfuse_lora"):
        st = base.__dict__["_ditkern_quant"]
        if "lora_unfused" not in st:
            continue
        st["qweight"], buffers = st.pop("lora_unfused")
        for k in _BUFFERS:
            base._buffers.pop(k, None)
        base._buffers.update(buffers)
        layer.merged_adapters.clear()
        restored.append(path)
    return restored


def _tuner_layers(model: nn.Module, quantized: bool):
    quant_ids = {id(layer) for _, layer, _ in _model_lora_layers(model, "")}
    for m in model.modules():
        if hasattr(m, "merge") and hasattr(m, "merged_adapters") and (id(m) in quant_ids) == quantized:
            yield m


def _model_fuse_lora(model, lora_scale=1.0, safe_fusing=False, adapter_names=None):
    """``ModelMixin.fuse_lora`` of a quantized transformer: quantized layers re-quantized, peft's merge elsewhere."""
    if not is_patched(model):  # an unpatched deep copy of a patched transformer: diffusers' own
        return type(model).fuse_lora(model, lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)
    model.lora_scale, model._safe_fusing = lora_scale, safe_fusing  # what diffusers' fuse_lora records
    fuse_lora(model, adapter_names, lora_scale, safe_fusing)
    for m in _tuner_layers(model, quantized=False):
        if lora_scale != 1.0:
            m.scale_layer(lora_scale)
        m.merge(safe_merge=safe_fusing, adapter_names=adapter_names)


def _model_unfuse_lora(model):
    """``ModelMixin.unfuse_lora`` of a quantized transformer."""
    if not is_patched(model):
        return type(model).unfuse_lora(model)
    unfuse_lora(model)
    for m in _tuner_layers(model, quantized=False):
        m.unmerge()


def install_fuse_methods(model: nn.Module) -> None:
    """Give the transformer instance its own ``fuse_lora`` / ``unfuse_lora`` (:func:`remove_fuse_methods` undoes)."""
    model.__dict__["fuse_lora"] = types.MethodType(_model_fuse_lora, model)
    model.__dict__["unfuse_lora"] = types.MethodType(_model_unfuse_lora, model)


def remove_fuse_methods(model: nn.Module) -> None:
    model.__dict__.pop("fuse_lora", None)
    model.__dict__.pop("unfuse_lora", None)
