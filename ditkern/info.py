"""``python -m ditkern info``: versions, GPU, and for each op which backends can run and why the others cannot."""

from __future__ import annotations

import importlib.metadata
import platform

import torch


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def ops_table() -> dict[str, dict]:
    """{op: {"sample": description, "backends": {name: None | reason}, "auto": chosen}} for every op module in
    ``ditkern/ops`` that declares ``BACKENDS`` and ``info_sample(device, dtype) -> tuple of tensors``."""
    import importlib  # noqa: PLC0415
    import pkgutil  # noqa: PLC0415

    import ditkern.ops  # noqa: PLC0415
    from ditkern._backend import BackendUnavailable, choose, explain  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = {}
    for info in sorted(pkgutil.iter_modules(ditkern.ops.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"ditkern.ops.{info.name}")
        if not (hasattr(mod, "BACKENDS") and hasattr(mod, "info_sample")):
            continue
        tensors = mod.info_sample(device, dtype)
        op = getattr(mod, "OP_NAMES", info.name)
        try:
            chosen = choose(op, mod.BACKENDS, *tensors)
        except BackendUnavailable as exc:
            chosen = f"none ({exc})"
        desc = ", ".join(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensors if t is not None)
        out[op] = {"sample": f"{desc} on {device}", "backends": explain(mod.BACKENDS, *tensors), "auto": chosen}
    return out


def info_dict() -> dict:
    from ditkern._version import __version__  # noqa: PLC0415
    from ditkern._ext import ext, ext_missing  # noqa: PLC0415

    d = {
        "ditkern": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            d[f"GPU {i}"] = f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})"
    else:
        d["GPU"] = "none visible to torch"
    missing = ext_missing()
    if missing:
        d["ditkern._C"] = missing
    else:
        code, msg, count = ext().cuda_status()
        rt = ext().cuda_runtime_version()
        d["ditkern._C"] = f"built (CUDA runtime {rt // 1000}.{rt % 1000 // 10}); driver check: {msg} ({count} device(s))"
    return d


def info(file=None) -> str:
    """Print (and return) the environment and backend report."""
    lines = [f"{k:>12}: {v}" for k, v in info_dict().items()]
    lines.append("")
    lines.append("ops (backend order cuda -> triton -> torch; DITKERN_BACKEND forces one):")
    for op, row in ops_table().items():
        lines.append(f"  {op}  [sample {row['sample']}] -> {row['auto']}")
        for name, reason in row["backends"].items():
            lines.append(f"      {name:<7} {'can run' if reason is None else 'cannot: ' + reason}")
    text = "\n".join(lines)
    print(text, file=file)
    return text
