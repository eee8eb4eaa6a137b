"""Quantized checkpoints: ``save_quantized(model, path)`` / ``load_quantized(model_or_class, path)``.

One safetensors file holds the transformer's whole state: for each quantized linear layer its packed codes
(``<path>.qweight_packed``, uint8), scales (``<path>.qweight_scales``) and, for calibrated layers, the smoothing factors
(``<path>.qweight_smooth``); every other parameter and buffer as it is. The metadata records the checkpoint format
version, the ditkern version, the model class and its diffusers config, and per layer the format, group size and
shape, plus the layers kept in high precision. Loading needs no calibration and reinstalls exactly the same packed
tensors, so the loaded model's outputs are bit-identical to the saved one's.
"""

from __future__ import annotations

import json

import torch
from torch import nn

CHECKPOINT_FORMAT = "ditkern-quant-2"  # packed layout 2 (FP6 as two bit planes: ditkern/formats.py)
# quant-1 files (FP6 packed four codes in three bytes) still load: their FP6 layers are repacked
READABLE_FORMATS = ("ditkern-quant-1", CHECKPOINT_FORMAT)


def _transformer(obj) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    m = getattr(obj, "transformer", None)
    if isinstance(m, nn.Module):
        return m
    raise TypeError(f"expected a diffusers transformer or a pipeline with a `transformer`, got {type(obj).__name__}")


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def save_quantized(model_or_pipeline, path: str) -> str:
    """Write the quantized (``ditkern.patch(model, quant=...)``) transformer to ``path`` (safetensors)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from ditkern._version import __version__  # noqa: PLC0415
    from ditkern.quant.feature import quantized_layers  # noqa: PLC0415

    model = _transformer(model_or_pipeline)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(
            "save_quantized: the model has no quantized layer; patch it with ditkern.patch(model, quant=...)"
        )
    tensors = {}
    for k, v in model.state_dict().items():
        if k.endswith(".qweight_inv_smooth"):
            continue  # derived from qweight_smooth at load time, bit for bit
        tensors[k] = v.detach().cpu().contiguous()
    meta_layers = {}
    for p, qw in layers.items():
        tensors[f"{p}.qweight_scales"] = qw.scales.cpu().contiguous()  # the float scales, not the buffer's int view
        if qw.smooth is not None:
            tensors[f"{p}.qweight_smooth"] = qw.smooth.cpu().contiguous()
        meta_layers[p] = {"format": qw.format, "group_size": qw.group_size, "shape": list(qw.shape)}
    acts = {
        m.__dict__["_ditkern_quant"]["activations"] for _, m in model.named_modules() if "_ditkern_quant" in m.__dict__
    }
    kept = [p for p, m in model.named_modules() if type(m).__name__ == "Linear" and p not in layers]
    config = getattr(model, "config", None)
    meta = {
        "checkpoint_format": CHECKPOINT_FORMAT,
        "ditkern_version": __version__,
        "model_class": type(model).__name__,
        "model_config": json.dumps(_jsonable(dict(config)) if config is not None else None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "layers": json.dumps(meta_layers),
        "skipped": json.dumps(kept),
        "formats": json.dumps(sorted({v["format"] for v in meta_layers.values()})),
        "group_sizes": json.dumps(sorted({v["group_size"] for v in meta_layers.values()})),
        "activations": json.dumps(acts.pop() if len(acts) == 1 else None),
    }
    save_file(tensors, path, metadata=meta)
    return path


def read_metadata(path: str) -> dict:
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def load_quantized(model_or_class, path: str, **patch_options):
    """Load a checkpoint written by :func:`save_quantized` and return the patched model.

    ``model_or_class``: a model instance of the saved class (its weights are replaced), a pipeline (its
    ``transformer``), or a diffusers model class (built from the saved config). ``patch_options`` go to
    ``ditkern.patch`` (e.g. ``backend="triton"``, ``fused_norms=False``). After loading, ``unpatch`` leaves the
    dequantized weights in the quantized layers (the originals are not in the file).
    """
    from safetensors.torch import load_file  # noqa: PLC0415

    from ditkern._version import __version__  # noqa: PLC0415
    from ditkern.patch.engine import patch, unpatch  # noqa: PLC0415
    from ditkern.quant.config import QuantConfig  # noqa: PLC0415
    from ditkern.formats import QuantizedWeight, get_format, pack, unpack_layout1  # noqa: PLC0415

    meta = read_metadata(path)
    fmt = meta.get("checkpoint_format")
    if fmt not in READABLE_FORMATS:
        raise ValueError(f"{path}: checkpoint format {fmt!r} is not one of {READABLE_FORMATS} (written by ditkern "
                         f"{meta.get('ditkern_version', '?')}); re-quantize with this version")  # fmt: skip
    ver = meta.get("ditkern_version", "")
    if ver.split(".")[:2] != __version__.split(".")[:2]:
        raise ValueError(f"{path}: written by ditkern {ver}, this is ditkern {__version__} (the major.minor "
                         "versions must match); re-quantize with this version")  # fmt: skip
    if isinstance(model_or_class, type):
        if model_or_class.__name__ != meta["model_class"]:
            raise ValueError(f"{path} holds a {meta['model_class']}, not a {model_or_class.__name__}")
        model = model_or_class.from_config(json.loads(meta["model_config"]))
        model = model.to(getattr(torch, meta["dtype"]))
        pipe = None
    else:
        model = _transformer(model_or_class)
        pipe = None if isinstance(model_or_class, nn.Module) else model_or_class
        if type(model).__name__ != meta["model_class"]:
            raise ValueError(f"{path} holds a {meta['model_class']}, not a {type(model).__name__}")
    unpatch(model)
    device = next(model.parameters()).device
    tensors = load_file(path)
    layers = json.loads(meta["layers"])
    modules = dict(model.named_modules())
    preq = {}
    for p, info in layers.items():
        m = modules.get(p)
        if m is None or type(m).__name__ != "Linear":
            raise ValueError(f"{path}: quantized layer {p!r} is not a Linear in this {type(model).__name__}")
        if list(m.weight.shape) != info["shape"]:
            raise ValueError(f"{path}: layer {p!r} has shape {info['shape']} in the file, {list(m.weight.shape)} here")
        packed, scales = tensors.pop(f"{p}.qweight_packed"), tensors.pop(f"{p}.qweight_scales")
        if fmt == "ditkern-quant-1":  # layout 1: repack (only FP6 differs; the codes are the same)
            f = get_format(info["format"])
            packed = pack(unpack_layout1(packed, f), f)
        qw = QuantizedWeight(packed.to(device), scales.to(device),
                             info["format"], info["group_size"], tuple(info["shape"]),
                             tensors.pop(f"{p}.qweight_smooth", None))  # fmt: skip
        if qw.smooth is not None:
            qw.smooth = qw.smooth.to(device)
        preq[p] = qw
        with torch.no_grad():
            m.weight.copy_(qw.dequantize(m.weight.dtype))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not any(k == f"{p}.weight" for p in preq)]
    if missing or unexpected:
        raise ValueError(f"{path}: state mismatch for {type(model).__name__}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")  # fmt: skip
    first = next(iter(preq.values()))
    qc = QuantConfig(format=first.format, group_size=first.group_size, skip=[])
    object.__setattr__(qc, "_prequantized", preq)
    object.__setattr__(qc, "activations", patch_options.pop("activations", json.loads(meta.get("activations", "null"))))
    patch(pipe if pipe is not None else model, quant=qc, **patch_options)
    return model
