"""NaN-poisoned allocations for op tests: an output element the kernel never writes stays NaN and fails the check.

``torch.empty`` promises nothing about its contents, and on a fresh allocation it is often zeros or finite leftovers,
so ``isfinite(out)`` cannot tell a written element from an unwritten one. With ``poison_empty(monkeypatch)`` every
floating-point tensor that ``torch.empty`` / ``torch.empty_like`` return (inside the op too: the op looks them up on
the ``torch`` module at call time) is filled with NaN first. That is still a valid ``empty``, so correct code cannot
notice; code that leaves elements unwritten returns NaN there.
"""

from __future__ import annotations

import functools

import torch

_POISONABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _poisoned(alloc):
    @functools.wraps(alloc)
    def wrapper(*args, **kwargs):
        t = alloc(*args, **kwargs)
        if t.dtype in _POISONABLE and t.device.type != "meta":
            t.fill_(float("nan"))
        return t

    return wrapper


def poison_empty(monkeypatch) -> None:
    """Until the test ends, float tensors from ``torch.empty`` / ``torch.empty_like`` start as NaN."""
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A NaN tensor with t's shape, dtype and device (for outputs a test passes in, e.g. write-only state)."""
    return torch.full_like(t, float("nan"))


def assert_all_written(out: torch.Tensor, what: str = "output") -> None:
    bad = torch.isnan(out)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {out.numel()} elements are NaN (unwritten?), first at {idx}")
