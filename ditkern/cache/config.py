"""``ditkern.TaylorCache``: the configuration of ``ditkern.patch(model, cache=...)`` (see ``ditkern.cache``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TaylorCache:
    """Configuration of the Taylor block cache. Give exactly one of ``interval`` (fixed) or ``gate`` (gated).

    order:       Taylor order 0 (reuse), 1 or 2.
    interval:    fixed schedule: run the full stack every ``interval`` steps (1 = never forecast).
    gate:        gated schedule: forecast when the first block's relative forecast error is below this.
    warmup:      full steps at the start of each generation (a step without any state is always full).
    full_below:  run every step whose timestep is at most this fraction of the generation's first timestep (the
                 last steps, where detail forms; for a family whose timestep rises to 1, every step whose way left to
                 1 is at most this fraction of the first step's); 0 disables.
    max_skip:    most consecutive forecast steps per item (None: unbounded for the gate; interval - 1 for fixed).
    state_dtype: dtype of the Taylor state (None: bfloat16 on CUDA, float32 elsewhere).
    sync_batch:  gated: the batch forecasts only when every item accepts (one decision per call, so a batch with
                 classifier-free guidance inside it skips together). False: each item decides alone; the blocks run
                 if any item needs them and the items that accepted still get their forecast, so an item's output
                 does not depend on the rest of the batch (slower when items disagree). Either way each item's
                 Taylor state holds only its own features.
    """

    order: int = 1
    interval: int | None = None
    gate: float | None = None
    warmup: int = 1
    full_below: float = 0.0
    max_skip: int | None = None
    state_dtype: torch.dtype | None = None
    sync_batch: bool = True

    def __post_init__(self):
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 0 <= self.order <= 2:
            raise ValueError(f"TaylorCache.order must be 0, 1 or 2, got {self.order!r}")
        if (self.interval is None) == (self.gate is None):
            raise ValueError(
                "TaylorCache needs exactly one of interval (fixed schedule) or gate (confidence-gated), got "
                f"interval={self.interval!r}, gate={self.gate!r}"
            )
        if self.interval is not None and (isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1):
            raise ValueError(f"TaylorCache.interval must be an int >= 1, got {self.interval!r}")
        if self.gate is not None and (not isinstance(self.gate, (int, float)) or isinstance(self.gate, bool) or not self.gate >= 0):
            raise ValueError(f"TaylorCache.gate must be a threshold >= 0, got {self.gate!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"TaylorCache.warmup must be an int >= 0, got {self.warmup!r}")
        if not isinstance(self.full_below, (int, float)) or not 0 <= self.full_below <= 1:
            raise ValueError(f"TaylorCache.full_below must be in [0, 1], got {self.full_below!r}")
        if self.max_skip is not None and (isinstance(self.max_skip, bool) or not isinstance(self.max_skip, int) or self.max_skip < 1):
            raise ValueError(f"TaylorCache.max_skip must be None or an int >= 1, got {self.max_skip!r}")
        if not isinstance(self.sync_batch, bool):
            raise ValueError(f"TaylorCache.sync_batch must be True or False, got {self.sync_batch!r}")
        if self.state_dtype is not None and self.state_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"TaylorCache.state_dtype must be float32, float16 or bfloat16, got {self.state_dtype!r}")

    @property
    def mode(self) -> str:
        return "fixed" if self.interval is not None else "gated"

    def describe(self) -> str:
        sched = f"interval={self.interval}" if self.interval is not None else f"gate={self.gate:g}"
        return f"Taylor order {self.order}, {sched}, warmup={self.warmup}" + (
            f", full_below={self.full_below:g}" if self.full_below else ""
        ) + (f", max_skip={self.max_skip}" if self.max_skip else "")
