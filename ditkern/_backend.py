"""Backend choice for ditkern ops: cuda -> triton -> torch, each able to say why it cannot run.

Every op declares its backends as ``{name: can_run}`` where ``can_run(*tensors) -> None | str`` returns None when the
backend can run on these inputs and otherwise the reason it cannot. ``choose`` walks them in order. A backend forced by
the user (``DITKERN_BACKEND`` or ``backend=...``) that cannot run raises with its reason instead of falling back.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping

import torch

logger = logging.getLogger("ditkern")

BACKENDS = ("cuda", "triton", "torch")
_VALID = ("auto",) + BACKENDS
_logged: set[tuple] = set()


class BackendUnavailable(RuntimeError):
    """A backend that was asked for by name cannot run on the given inputs; the message says why."""


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the explicit argument, else ``DITKERN_BACKEND``, else ``auto``."""
    value = backend if backend is not None else os.environ.get("DITKERN_BACKEND", "auto")
    value = value.strip().lower()
    if value not in _VALID:
        source = "backend" if backend is not None else "DITKERN_BACKEND"
        raise ValueError(f"{source}={value!r} is not one of {', '.join(_VALID)}")
    return value


@functools.lru_cache(maxsize=None)
def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def triton_can_run_on(*tensors: torch.Tensor) -> str | None:
    """Reason Triton cannot run on these tensors' device, or None."""
    reason = triton_missing()
    if reason:
        return reason
    dev = tensors[0].device
    if dev.type == "cuda":
        return None
    if dev.type == "cpu" and triton_interpreted():
        return None
    if dev.type == "cpu":
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (the interpreter is for tests, not speed)"
    return f"tensors are on {dev.type}, Triton here targets CUDA"


@functools.lru_cache(maxsize=None)
def cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_missing(device: torch.device) -> str | None:
    """Reason this device has no FP8 (E4M3) tensor cores, or None (CPU: the interpreter/reference handle fp8)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    cap = cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
    return None if cap >= (8, 9) else f"FP8 (E4M3) tensor cores need compute capability >= (8, 9), device has {cap}"


def choose(op: str, backends: Mapping[str, Callable[..., str | None]], *tensors, backend: str | None = None) -> str:
    """Name of the backend that runs ``op`` on ``tensors``.

    ``backends`` is ordered by preference. In auto mode the reasons of the skipped ones are logged once at DEBUG.
    """
    wanted = requested_backend(backend)
    if wanted != "auto":
        if wanted not in backends:
            raise BackendUnavailable(f"ditkern::{op} has no {wanted!r} backend (it has: {', '.join(backends)})")
        reason = backends[wanted](*tensors)
        if reason is not None:
            raise BackendUnavailable(f"ditkern::{op}: backend {wanted!r} was requested but cannot run: {reason}")
        return wanted
    reasons = []
    for name, can_run in backends.items():
        reason = can_run(*tensors)
        if reason is None:
            if reasons:
                key = (op, name, tuple(reasons))
                if key not in _logged:
                    _logged.add(key)
                    logger.debug("ditkern::%s runs on %s; skipped: %s", op, name, "; ".join(reasons))
            return name
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailable(f"ditkern::{op}: no backend can run: {'; '.join(reasons)}")


def explain(backends: Mapping[str, Callable[..., str | None]], *tensors) -> dict[str, str | None]:
    """For ``python -m ditkern info``: each backend's reason (None = can run) on these sample tensors."""
    return {name: can_run(*tensors) for name, can_run in backends.items()}
