"""The report returned by ``ditkern.patch``: patched and skipped modules, each with what was done or why not."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ditkern._backend import choose, explain, requested_backend


# windowed attention under grad (grad mode on, an input or parameter requiring grad): WindowProcessor steps aside
WINDOW_UNDER_GRAD = "windowed attention is inference-only: under grad each layer runs its own exact (dense) attention"

# a lossless rule whose op has no fused backend on the model's device (auto mode): the module keeps its own forward
NATIVE_REASON = "torch: native ops, no fused kernel on"
NATIVE_NOTE = (
    f"'{NATIVE_REASON} ...' rows keep their own forward (bit-identical to unpatched, as fast): no fused backend "
    "runs there, and the fp32 torch reference would be slower than the module's native ops; backend='torch' "
    "installs the fused forwards on that reference anyway"
)


def native_fallback(op: str, backends: Mapping, sample: torch.Tensor, backend: str | None) -> str | None:
    """The native-ops skip reason of a lossless rule whose ``op`` would land on its torch reference for ``sample``
    (the module's device and dtype) in auto mode - no fused backend (cuda, triton) can run there - else None (a
    fused backend runs, or a backend was asked for by name: ``backend="torch"`` installs the reference)."""
    if requested_backend(backend) != "auto" or choose(op, backends, sample) != "torch":
        return None
    why = explain({k: v for k, v in backends.items() if k != "torch"}, sample)
    return native_reason(sample.device.type, str(sample.dtype).removeprefix("torch."), why)


def native_reason(device: str, dtype: str, why: dict[str, str | None]) -> str:
    """The skip reason of a module left to its native torch ops on ``device`` (``"cpu"``) for ``dtype``
    (``"float32"``); ``why``: each fused backend's reason it cannot run."""
    because = "; ".join(f"{name}: {reason}" for name, reason in why.items())
    return f"{NATIVE_REASON} {device} {dtype} ({because})"


@dataclass(frozen=True)
class Row:
    module: str  # dotted path from the pipeline or model
    cls: str  # exact class name of the module
    status: str  # "patched" | "skipped"
    what: str  # the fusion installed (patched rows)
    backend: str  # backend the fused op runs on for the model's current device and dtype
    reason: str  # why it was skipped (skipped rows)
    detail: str = ""  # feature-specific facts: a format, a memory figure


@dataclass
class PatchReport:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        if row.status == "patched" and "(window_attention)" in row.what and WINDOW_UNDER_GRAD not in self.notes:
            self.notes.append(WINDOW_UNDER_GRAD)
        if row.status == "skipped" and row.reason.startswith(NATIVE_REASON) and NATIVE_NOTE not in self.notes:
            self.notes.append(NATIVE_NOTE)

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def patched(self) -> list[Row]:
        return [r for r in self.rows if r.status == "patched"]

    @property
    def skipped(self) -> list[Row]:
        return [r for r in self.rows if r.status == "skipped"]

    def __bool__(self) -> bool:
        return bool(self.patched)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for r in self.patched:
            kinds[r.what] = kinds.get(r.what, 0) + 1
        parts = [f"{n} x {w}" for w, n in kinds.items()]
        native = sum(r.reason.startswith(NATIVE_REASON) for r in self.skipped)
        why = f" ({native} keep their native torch ops: no fused kernel on this device)" if native else ""
        return (f"ditkern: patched {len(self.patched)} module(s) ({', '.join(parts) or 'none'}), "
                f"skipped {len(self.skipped)}{why}")  # fmt: skip

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.rows:
            headers = ("status", "module", "class", "what / why not", "backend", "detail")
            table = [(r.status, r.module, r.cls, r.what or r.reason, r.backend, r.detail) for r in self.rows]
            widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
            fmt = "  ".join(f"{{:<{w}}}" for w in widths)
            lines.append(fmt.format(*headers))
            lines.append(fmt.format(*("-" * w for w in widths)))
            lines.extend(fmt.format(*t) for t in table)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    __repr__ = __str__

    def to_dict(self) -> dict:
        return {"rows": [r.__dict__ for r in self.rows], "notes": list(self.notes)}
