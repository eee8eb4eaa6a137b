"""Backend choice for ditkern ops: cuda -> triton -> torch, each able to say why it cannot run.

Every op declares its backends as ``{name: can_run}`` where ``can_run(*tensors) -> None | str`` returns None when the
backend can run on these inputs and otherwise the reason it cannot. ``choose`` walks them in order. A backend forced by
the user (``DITKERN_BACKEND`` or ``backend=...``) that cannot run raises with its reason instead of falling back.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Mapping

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


# Per-SM shared memory a block can opt into (bytes), by compute capability; the CUDA programming guide's table
# ("Technical Specifications per Compute Capability"): 8.0 163 KB, 8.6/8.7/8.9 99 KB, 9.0 227 KB, 10.x 227 KB,
# 12.x 99 KB. Used where no device can be asked (the GPU-less compile check) and as the launchers' budget.
_SHARED_MEMORY = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024,
                  (10, 0): 227 * 1024, (10, 3): 227 * 1024, (12, 0): 99 * 1024}  # fmt: skip
_compile_target: tuple[int, int] | None = None


@contextlib.contextmanager
def compile_target(capability: tuple[int, int]) -> Iterator[None]:
    """Inside the block, CPU tensors stand for a GPU of this compute capability (the GPU-less compile check,
    ``bench/aot.py``): Triton backends accept them and capability checks see ``capability``. Never used to run."""
    global _compile_target
    previous, _compile_target = _compile_target, tuple(capability)
    try:
        yield
    finally:
        _compile_target = previous


def simulated_capability() -> tuple[int, int] | None:
    return _compile_target


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device (or of the compile target), None for a CPU without one."""
    if _compile_target is not None:
        return _compile_target
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


def max_shared_memory(device: torch.device) -> int | None:
    """Bytes of shared memory one block may use on this device (None on CPU: the interpreter has no limit)."""
    cap = device_capability(device)
    if cap is None:
        return None
    if _compile_target is None:
        props = torch.cuda.get_device_properties(torch.device(device))
        optin = getattr(props, "shared_memory_per_block_optin", None)
        if optin:
            return int(optin)
    if cap in _SHARED_MEMORY:
        return _SHARED_MEMORY[cap]
    same_major = [v for c, v in _SHARED_MEMORY.items() if c[0] == cap[0]]
    return min(same_major) if same_major else 99 * 1024  # an unknown architecture: the smallest recent budget


def triton_can_run_on(*tensors: torch.Tensor) -> str | None:
    """Reason Triton cannot run on these tensors' device, or None."""
    reason = triton_missing()
    if reason:
        return reason
    if _compile_target is not None:
        return None
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
    cap = device_capability(device)
    if cap is None:
        return None
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
