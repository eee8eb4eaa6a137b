"""FP8 companions: the per-token FP8 form ``(xq, sx)`` of an activation tensor, produced once and reused.

The fused adaLN kernel (``ditkern.ops.adaln_modulate_fp8``) emits a norm's output together with its FP8 form; the
quantized linear layers that consume that tensor (FLUX: q, k, v and the single-stream MLP) look it up instead of
quantizing it again. An entry is keyed by the tensor object (identity, checked through a weak reference) and its
version counter (an in-place change invalidates it), and it disappears with the tensor. Inside ``torch.compile``
nothing is attached or looked up (every layer quantizes its own input, which is the same function). Neither for an
inference tensor (made under ``torch.inference_mode()``): it has no version counter, so an in-place change could not
be told apart, and its layers quantize their input themselves (same outputs, one activation quantization per layer).
"""

from __future__ import annotations

import weakref

import torch

_ENTRIES: dict[int, tuple] = {}


def _compiling() -> bool:
    return bool(getattr(torch.compiler, "is_compiling", lambda: False)())


def attach(t: torch.Tensor, xq: torch.Tensor, sx: torch.Tensor, grid: str) -> None:
    if _compiling() or t.is_inference():
        return
    key = id(t)
    ref = weakref.ref(t, lambda _, key=key: _ENTRIES.pop(key, None))
    _ENTRIES[key] = (ref, t._version, grid, xq, sx)


def lookup(t: torch.Tensor, grid: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if _compiling() or t.is_inference():
        return None
    e = _ENTRIES.get(id(t))
    if e is None or e[0]() is not t or e[1] != t._version or e[2] != grid:
        return None
    return e[3], e[4]


def clear() -> None:
    _ENTRIES.clear()
