"""Quantized checkpoints: ``save_quantized(model_or_pipe, path)`` / ``load_quantized([model_or_class,] path)``.

``path`` is a directory (the diffusers model layout) or a ``.safetensors`` file.

Directory: ``config.json`` (the model's diffusers config, ``save_config``), ``diffusion_pytorch_model.safetensors``
or, above ``max_shard_size``, shards ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` with their
``diffusion_pytorch_model.safetensors.index.json`` (diffusers' names), and ``ditkern_quantization.json``: the
quantization config (checkpoint format version, ditkern version, model class, dtype, per layer the format, group size
and shape, the layers kept in high precision, the activation mode, and ``calibration``: the method and settings the
layers were chosen with, e.g. ``{"method": "adaround", "format": "auto", "bits": 4.6, ...}``; files without it, from
earlier versions, still load). A ``.safetensors`` file holds the same tensors,
with the config and the model config in its metadata (the only layout of ``ditkern-quant-1`` / ``-2`` files, which
still load).

Tensors: for each quantized linear layer its packed codes (``<path>.qweight_packed``, uint8), scales
(``<path>.qweight_scales``) and, for calibrated layers, the smoothing factors (``<path>.qweight_smooth``); every other
parameter and buffer as it is. Loading needs no calibration and no full-precision weights: a model built from the
saved config has its parameters created on the meta device (nothing allocated, nothing initialised), the file's
tensors are assigned, and the quantized layers get the very packed tensors that were saved, so the loaded model's
outputs are bit-identical to the saved one's.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

CHECKPOINT_FORMAT = "ditkern-quant-2"  # packed layout 2 (FP6 as two bit planes: ditkern/formats.py)
# quant-1 files (FP6 packed four codes in three bytes) still load: their FP6 layers are repacked
READABLE_FORMATS = ("ditkern-quant-1", CHECKPOINT_FORMAT)
QUANT_CONFIG_NAME = "ditkern_quantization.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' SAFETENSORS_WEIGHTS_NAME
INDEX_NAME = WEIGHTS_NAME + ".index.json"  # diffusers' SAFE_WEIGHTS_INDEX_NAME
CONFIG_NAME = "config.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # diffusers' default max_shard_size ("5GB")
_JSON_KEYS = ("layers", "skipped", "formats", "group_sizes", "activations", "model_config", "calibration")  # JSON-in-string in a file


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


def _is_file_path(path: str) -> bool:
    return str(path).endswith(".safetensors")


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in state-dict order, cut into consecutive shards of at most ``max_bytes`` (a larger tensor: alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def save_quantized(model_or_pipeline, path: str | os.PathLike, max_shard_size: int = DEFAULT_SHARD_BYTES) -> str:
    """Write the quantized (``ditkern.patch(model, quant=...)``) transformer to ``path``: a directory (diffusers
    layout: ``config.json``, safetensors shard(s) of at most ``max_shard_size`` bytes each,
    ``ditkern_quantization.json``; created if missing) or a single ``.safetensors`` file. For a pipeline, its
    ``transformer`` is written."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from ditkern._version import __version__  # noqa: PLC0415
    from ditkern.quant.feature import quantized_layers  # noqa: PLC0415

    path = os.fspath(path)
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ValueError(f"save_quantized: max_shard_size={max_shard_size!r} must be a positive number of bytes")
    model = _transformer(model_or_pipeline)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(
            "save_quantized: the model has no quantized layer; patch it with ditkern.patch(model, quant=...)"
        )
    as_file = _is_file_path(path)
    if as_file and os.path.isdir(path):
        raise ValueError(f"save_quantized: {path!r} is a directory; a file path must end in .safetensors")
    if not as_file and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"save_quantized: {path!r} is an existing file that does not end in .safetensors; give a "
                         "directory (diffusers layout) or a .safetensors file")  # fmt: skip
    tensors = {}
    placeholders = {f"{p}.weight" for p in layers}
    for k, v in model.state_dict().items():
        if k.endswith(".qweight_inv_smooth") or k in placeholders:
            continue  # derived from qweight_smooth at load time, bit for bit; the weight's placeholder
        tensors[k] = v.detach().cpu().contiguous()
    meta_layers = {}
    for p, qw in layers.items():
        tensors[f"{p}.qweight_scales"] = qw.scales.cpu().contiguous()  # the float scales, not the buffer's int view
        if qw.smooth is not None:
            tensors[f"{p}.qweight_smooth"] = qw.smooth.cpu().contiguous()
        meta_layers[p] = {"format": qw.format, "group_size": qw.group_size, "shape": list(qw.shape)}
    states = [m.__dict__["_ditkern_quant"] for _, m in model.named_modules() if "_ditkern_quant" in m.__dict__]
    acts = {st["activations"] for st in states}
    records = list({json.dumps(_jsonable(st.get("calibration")), sort_keys=True): st.get("calibration")
                    for st in states}.values())  # fmt: skip
    kept = [p for p, m in model.named_modules() if type(m).__name__ == "Linear" and p not in layers]
    config = getattr(model, "config", None)
    quant = {
        "checkpoint_format": CHECKPOINT_FORMAT,
        "ditkern_version": __version__,
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "layers": meta_layers,
        "skipped": kept,
        "formats": sorted({v["format"] for v in meta_layers.values()}),
        "group_sizes": sorted({v["group_size"] for v in meta_layers.values()}),
        "activations": acts.pop() if len(acts) == 1 else None,
        # how the layers were chosen (method, format or "auto", group size, scales, budget, calibration size): a
        # record only; loading needs no calibration (a list where layers were patched with several configs)
        "calibration": _jsonable(records[0] if len(records) == 1 else records),
    }
    if as_file:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        meta = {k: (json.dumps(v) if k in _JSON_KEYS else v) for k, v in quant.items()}
        meta["model_config"] = json.dumps(_jsonable(dict(config)) if config is not None else None)
        save_file(tensors, path, metadata=meta)
        return path
    os.makedirs(path, exist_ok=True)
    if config is None or not hasattr(model, "save_config"):
        raise TypeError(f"save_quantized: a {type(model).__name__} has no diffusers config to write to "
                        f"{CONFIG_NAME}; save it to a .safetensors file instead")  # fmt: skip
    model.save_config(path)
    shards = _shards(tensors, max_shard_size)
    for name in os.listdir(path):  # shards of an earlier save with another count would be mixed in
        if name.startswith("diffusion_pytorch_model") and name.endswith((".safetensors", ".index.json")):
            os.remove(os.path.join(path, name))
    if len(shards) == 1:
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = WEIGHTS_NAME.replace(".safetensors", f"-{i:05d}-of-{len(shards):05d}.safetensors")
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(path, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, QUANT_CONFIG_NAME), "w") as f:
        json.dump(quant, f, indent=1)
    return path


def _checkpoint_dir(path: str) -> str:
    """The directory holding ``ditkern_quantization.json``: ``path`` itself, or a pipeline's ``transformer/``."""
    if os.path.isfile(os.path.join(path, QUANT_CONFIG_NAME)):
        return path
    sub = os.path.join(path, "transformer")
    if os.path.isfile(os.path.join(sub, QUANT_CONFIG_NAME)):
        return sub
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise ValueError(f"{path!r} is a model directory but not a ditkern quantized checkpoint (no "
                         f"{QUANT_CONFIG_NAME}); load it with from_pretrained, quantize: ditkern.patch")  # fmt: skip
    raise ValueError(f"{path!r} is not a ditkern quantized checkpoint: it has no {QUANT_CONFIG_NAME} (nor a "
                     f"transformer/{QUANT_CONFIG_NAME})")  # fmt: skip


def _open_safetensors(path: str):
    from safetensors import safe_open  # noqa: PLC0415

    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types; the message names the file
        raise ValueError(f"{path!r} is not a readable safetensors file: {type(exc).__name__}: {exc}") from None


def _check_path(path: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_quantized: {path!r} does not exist")
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The quantization config of a checkpoint (a directory's ``ditkern_quantization.json``, a file's metadata),
    values as written: JSON strings in a file's metadata, JSON values in a directory's config."""
    path = _check_path(path)
    if os.path.isdir(path):
        with open(os.path.join(_checkpoint_dir(path), QUANT_CONFIG_NAME)) as f:
            return json.load(f)
    with _open_safetensors(path) as f:
        return dict(f.metadata() or {})


def _read(path: str) -> tuple[dict, dict | None, dict[str, torch.Tensor]]:
    """(quantization config with JSON values, model config or None, tensors) of a file or directory checkpoint."""
    from safetensors.torch import load_file  # noqa: PLC0415

    if os.path.isdir(path):
        d = _checkpoint_dir(path)
        with open(os.path.join(d, QUANT_CONFIG_NAME)) as f:
            quant = json.load(f)
        cfg_path = os.path.join(d, CONFIG_NAME)
        config = None
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                config = json.load(f)
        index = os.path.join(d, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = [WEIGHTS_NAME]
        tensors = {}
        for name in files:
            fp = os.path.join(d, name)
            if not os.path.isfile(fp):
                raise FileNotFoundError(f"load_quantized: {fp!r} (a shard of the checkpoint in {d!r}) does not exist")
            with _open_safetensors(fp):
                pass
            tensors.update(load_file(fp))
        return quant, config, tensors
    if not _is_file_path(path):
        raise ValueError(f"load_quantized: {path!r} is neither a directory nor a .safetensors file")
    raw = read_metadata(path)
    if "checkpoint_format" not in raw:
        raise ValueError(f"{path!r} is a safetensors file but not a ditkern quantized checkpoint (its metadata has no "
                         "checkpoint_format)")  # fmt: skip
    quant = {k: (json.loads(v) if k in _JSON_KEYS and isinstance(v, str) else v) for k, v in raw.items()}
    return quant, quant.pop("model_config", None), load_file(path)


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created inside are put on the meta device as they are registered (nothing kept, their
    initialisation a no-op); buffers are created as usual (non-persistent ones are not in the checkpoint)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _model_class(name: str, path: str):
    import diffusers  # noqa: PLC0415

    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"{path!r} holds a {name}, which is not a diffusers model class; pass the class: "
                         "load_quantized(ModelClass, path)")  # fmt: skip
    return cls


def _build(cls, config: dict | None, dtype: torch.dtype, path: str) -> nn.Module:
    if config is None:
        raise ValueError(f"{path!r} has no model config; pass a model instance: load_quantized(model, path)")
    with _parameters_on_meta():
        model = cls.from_config(config)
    return model.to(dtype).eval()  # as from_pretrained leaves it (DiT's label embedder drops labels in training mode)


def load_quantized(model_or_class, path: str | os.PathLike | None = None, *, device=None, **patch_options):
    """Load a checkpoint written by :func:`save_quantized` and return the patched transformer.

    ``load_quantized(path)`` builds the diffusers model class named in the checkpoint; ``load_quantized(ModelClass,
    path)`` builds that class (it must be the saved one); ``load_quantized(model, path)`` loads into a model instance
    of the saved class (its weights are replaced, its full-precision quantized weights released);
    ``load_quantized(pipe, path)`` loads into ``pipe.transformer``, or, when the pipeline was made with
    ``transformer=None``, builds it and registers it on the pipeline. ``path``: a checkpoint directory (or a
    pipeline directory with a ``transformer/`` checkpoint) or a ``.safetensors`` file. ``device``: where the loaded
    tensors go (default: the instance's device, else the CPU). ``patch_options`` go to ``ditkern.patch`` (e.g.
    ``backend="triton"``, ``fused_norms=False``). After loading, ``unpatch`` leaves the dequantized weights in the
    quantized layers (the originals are not in the file).
    """
    from ditkern._version import __version__  # noqa: PLC0415
    from ditkern.formats import QuantizedWeight, get_format, pack, unpack_layout1  # noqa: PLC0415
    from ditkern.patch.engine import patch, unpatch  # noqa: PLC0415
    from ditkern.quant.config import QuantConfig  # noqa: PLC0415

    if path is None:
        if not isinstance(model_or_class, (str, os.PathLike)):
            raise TypeError("load_quantized(path) takes a path; or load_quantized(model | pipeline | ModelClass, path)")
        model_or_class, path = None, model_or_class
    path = _check_path(path)
    quant, config, tensors = _read(path)
    fmt = quant.get("checkpoint_format")
    if fmt not in READABLE_FORMATS:
        raise ValueError(f"{path}: checkpoint format {fmt!r} is not one of {READABLE_FORMATS} (written by ditkern "
                         f"{quant.get('ditkern_version', '?')}); re-quantize with this version")  # fmt: skip
    ver = quant.get("ditkern_version", "")
    if ver.split(".")[:2] != __version__.split(".")[:2]:
        raise ValueError(f"{path}: written by ditkern {ver}, this is ditkern {__version__} (the major.minor "
                         "versions must match); re-quantize with this version")  # fmt: skip
    saved_class = quant["model_class"]
    dtype = getattr(torch, quant["dtype"])
    pipe = None
    if model_or_class is None:
        model = _build(_model_class(saved_class, path), config, dtype, path)
    elif isinstance(model_or_class, type):
        if model_or_class.__name__ != saved_class:
            raise ValueError(f"{path} holds a {saved_class}, not a {model_or_class.__name__}")
        model = _build(model_or_class, config, dtype, path)
    elif not isinstance(model_or_class, nn.Module) and getattr(model_or_class, "transformer", 0) is None:
        pipe = model_or_class  # a pipeline made with transformer=None: the checkpoint supplies it
        model = _build(_model_class(saved_class, path), config, dtype, path)
    else:
        model = _transformer(model_or_class)
        pipe = None if isinstance(model_or_class, nn.Module) else model_or_class
        if type(model).__name__ != saved_class:
            raise ValueError(f"{path} holds a {saved_class}, not a {type(model).__name__}")
        unpatch(model)
    if device is None:
        p = next((p for p in model.parameters() if p.device.type != "meta"), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    modules = dict(model.named_modules())
    preq = {}
    for p, info in quant["layers"].items():
        m = modules.get(p)
        if m is None or type(m).__name__ != "Linear":
            raise ValueError(f"{path}: quantized layer {p!r} is not a Linear in this {type(model).__name__}")
        if list(m.weight.shape) != info["shape"]:
            raise ValueError(f"{path}: layer {p!r} has shape {info['shape']} in the file, {list(m.weight.shape)} here")
        packed, scales = tensors.pop(f"{p}.qweight_packed"), tensors.pop(f"{p}.qweight_scales")
        if fmt == "ditkern-quant-1":  # layout 1: repack (only FP6 differs; the codes are the same)
            f = get_format(info["format"])
            packed = pack(unpack_layout1(packed, f), f)
        smooth = tensors.pop(f"{p}.qweight_smooth", None)
        preq[p] = QuantizedWeight(packed.to(device), scales.to(device), info["format"], info["group_size"],
                                  tuple(info["shape"]), None if smooth is None else smooth.to(device))  # fmt: skip
        # no full-precision weight: a one-element placeholder of the weight's shape (unpatch dequantizes)
        ph = torch.zeros((), dtype=m.weight.dtype, device=device).expand(*info["shape"])
        m._parameters["weight"] = nn.Parameter(ph, requires_grad=m.weight.requires_grad)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not any(k == f"{p}.weight" for p in preq)]
    if missing or unexpected:
        raise ValueError(f"{path}: state mismatch for {type(model).__name__}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")  # fmt: skip
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if still_meta:
        raise ValueError(f"{path}: the checkpoint does not hold {still_meta[:5]} of {type(model).__name__}")
    model.to(device)
    first = next(iter(preq.values()))
    qc = QuantConfig(format=first.format, group_size=first.group_size, skip=[])
    object.__setattr__(qc, "_prequantized", preq)
    record = quant.get("calibration") or {"method": "not recorded (a checkpoint from an earlier ditkern)"}
    object.__setattr__(qc, "_loaded_record", record)  # a re-save records what the checkpoint recorded
    object.__setattr__(qc, "activations", patch_options.pop("activations", quant.get("activations")))
    if pipe is not None and getattr(pipe, "transformer", None) is None:
        pipe.register_modules(transformer=model)
    patch(pipe if pipe is not None else model, quant=qc, **patch_options)
    return model
