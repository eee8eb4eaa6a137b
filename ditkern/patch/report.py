"""The report returned by ``ditkern.patch``: patched and skipped modules, each with what was done or why not."""

from __future__ import annotations

from dataclasses import dataclass, field


# windowed attention under grad (grad mode on, an input or parameter requiring grad): WindowProcessor steps aside
WINDOW_UNDER_GRAD = "windowed attention is inference-only: under grad each layer runs its own exact (dense) attention"


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
        return f"ditkern: patched {len(self.patched)} module(s) ({', '.join(parts) or 'none'}), skipped {len(self.skipped)}"

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
