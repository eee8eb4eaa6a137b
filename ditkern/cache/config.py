"""``ditkern.TaylorCache``: the configuration of ``ditkern.patch(model, cache=...)`` (see ``ditkern.cache``)."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


#: ``TaylorCache.refine_objective`` -> the weight of the worst calibration image's PSNR beside the mean in what the
#: refinement maximises (``feature.refine_calibration``)
REFINE_OBJECTIVES = {"mean+worst": 1.0, "mean": 0.0}
#: ``TaylorCache.level``: what a forecast step skips
LEVELS = ("blocks", "attention")


def _int_at_least(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


@dataclass(frozen=True)
class TaylorCache:
    """Configuration of the Taylor block cache. Give exactly one of ``interval`` (fixed), ``gate`` (gated), ``budget``
    (calibrated) or ``schedule`` (explicit steps).

    order:       Taylor order 0 (reuse), 1 or 2.
    interval:    fixed schedule: run the full stack every ``interval`` steps (1 = never forecast).
    gate:        gated schedule: forecast when the confidence signal is below this. The signal is the first block's
                 relative forecast error; after :func:`ditkern.cache.calibrate` it is scaled per step (``gate_scale``)
                 into the predicted relative error of the cached stack's forecast, so one threshold means the same on
                 every model and step.
    budget:      calibrated schedule: the fraction of block executions to spend (e.g. 0.25). The first generation
                 (or :func:`ditkern.cache.calibrate`) runs uncached and measures the feature change per step; the
                 steps to compute are then chosen to minimise the predicted forecast error within the budget.
    schedule:    the steps (0-based indices within a generation) that run the full stack; every other step forecasts
                 (set by the calibration, by :meth:`end_anchored`, or by hand). Must contain step 0.
    timesteps:   the timesteps the schedule / gate scales were calibrated on (item 0's, one per step); a generation
                 whose timesteps differ runs uncached from the first mismatch on and warns.
    gate_scale:  per-step factors of the gate signal (from the calibration; None: the raw first-block error).
    correct:     budget: the calibration also fits per-step forecast gains (``step_gain``) from the recorded feature
                 change and keeps them when the measured result is closer to uncached with them than without.
    refine:      budget: after the measured calibration has chosen the schedule (and gains), refine both in closed
                 loop (``feature.refine_calibration``): one pair of multipliers of the gains (of mu, of lam) per run
                 of forecast steps, then moves of single computed steps by 1-2 (not with ``front``), by coordinate
                 search on the measured result, each change kept only where it measures closer to uncached. About
                 200-380 more runs of the calibration's ``run()`` at 28 steps, 540-710 at 50 (8-28 times its runs;
                 docs/cache.md).
    refine_starts: with ``refine``: how many of the measured calibration's best distinct schedules are refined (each
                 as above, so that many times the cost); the one that measures best after refining is kept. A
                 refinement only moves steps by 1-2, so a start further away can end higher.
    refine_reach: with ``refine``: how far a computed step may move. 2: by 1-2 steps, after the gain search (above).
                 Above 2: first a wide step search with the fitted gains (each computed step but step 0 moved by up
                 to ``refine_reach`` steps either way, the best move per step kept, until a pass moves nothing, at
                 most :data:`feature.REFINE_WIDE_PASSES` passes), then the refinement above from its result. About
                 2 * refine_reach runs per computed step and pass more.
    refine_objective: with ``refine``: what the refinement maximises on the calibration images: ``"mean+worst"``
                 (mean + worst-image PSNR, the measured calibration's score) or ``"mean"`` (the mean PSNR alone: a
                 smoother objective that one image does not dominate; docs/cache.md has both measured).
    front:       schedule / budget: the first ``front`` blocks of the cached chain are a group of their own, with their
                 own Taylor state and steps (``front_schedule``; the budget calibration chooses them, denser than the
                 rest's when that measures better); the rest forecasts its own residual from the front's output
                 (fresh or forecast). 0: one group. Needs 2 <= front <= chain blocks - 2.
    front_schedule, front_step_gain: the front group's ``schedule`` and ``step_gain`` (None: the rest's schedule,
                 no gains).
    forecast:    what a forecast step forecasts: "residual" (the chain's input at this step, fresh, plus the Taylor
                 forecast of the chain's residual) or "output" (the Taylor forecast of the chain's output, as
                 TaylorSeer and diffusers' block hooks do; measured better on dense schedules with a warm-up step,
                 worse on sparse ones, docs/cache.md). None: "residual", and a ``budget`` calibration measures both
                 and keeps the closer one (the calibrated config names it). Not with ``front``.
    step_gain:   per step ``(mu, lam)``: a forecast step returns ``base + mu * d0 + lam * (Taylor increment)`` instead
                 of ``base + d0 + increment`` (the least-squares fit over the calibration's items of the forecast to
                 the uncached feature; 1, 1 on computed steps). Used on the calibrated timesteps only.
    warmup:      full steps at the start of each generation (a step without any state is always full).
    full_below:  run every step whose timestep is at most this fraction of the generation's first timestep (the
                 last steps, where detail forms; for a family whose timestep rises to 1, every step whose way left to
                 1 is at most this fraction of the first step's); 0 disables.
    max_skip:    most consecutive forecast steps per item (None: unbounded for the gate; interval - 1 for fixed;
                 0 never forecasts and warns).
    state_dtype: dtype of the Taylor state (None: bfloat16 on CUDA, float32 elsewhere).
    level:       what a forecast step forecasts: ``"blocks"`` (the cached chain of blocks is skipped, its residual or
                 output forecast) or ``"attention"`` (every block runs; the self-attention modules of the chain's
                 blocks, as the family declares them, return the Taylor forecast of their own output while the MLPs,
                 norms and the rest of each block compute: what FasterCache, PyramidAttentionBroadcast and diffusers'
                 default TaylorSeer hooks skip). Attention-level needs ``interval`` or ``schedule`` (the budget and
                 gate calibrations read block features); its state is ``order + 1`` tensors of every cached
                 attention's output per call slot, the block count times the block-level state.
    sync_batch:  gated: the batch forecasts only when every item accepts (one decision per call, so a batch with
                 classifier-free guidance inside it skips together). False: each item decides alone; the blocks run
                 if any item needs them and the items that accepted still get their forecast, so an item's output
                 does not depend on the rest of the batch (slower when items disagree). Either way each item's
                 Taylor state holds only its own features.
    """

    order: int = 1
    interval: int | None = None
    gate: float | None = None
    budget: float | None = None
    schedule: tuple[int, ...] | None = None
    timesteps: tuple[float, ...] | None = None
    gate_scale: tuple[float, ...] | None = None
    correct: bool = True
    refine: bool = False
    refine_starts: int = 1
    refine_reach: int = 2
    refine_objective: str = "mean+worst"
    step_gain: tuple[tuple[float, float], ...] | None = None
    front: int = 0
    front_schedule: tuple[int, ...] | None = None
    front_step_gain: tuple[tuple[float, float], ...] | None = None
    forecast: str | None = None
    warmup: int = 1
    full_below: float = 0.0
    max_skip: int | None = None
    state_dtype: torch.dtype | None = None
    sync_batch: bool = True
    level: str = "blocks"

    def __post_init__(self):
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 0 <= self.order <= 2:
            raise ValueError(f"TaylorCache.order must be 0, 1 or 2, got {self.order!r}")
        given = [n for n in ("interval", "gate", "budget") if getattr(self, n) is not None]
        if self.schedule is not None and self.budget is None:
            given.append("schedule")
        if len(given) != 1:
            raise ValueError(
                "TaylorCache needs exactly one of interval (fixed schedule), gate (confidence-gated), budget "
                f"(calibrated) or schedule (explicit steps), got interval={self.interval!r}, gate={self.gate!r}, "
                f"budget={self.budget!r}, schedule={self.schedule!r}"
            )
        if self.interval is not None and (isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1):
            raise ValueError(f"TaylorCache.interval must be an int >= 1, got {self.interval!r}")
        if self.gate is not None and (not isinstance(self.gate, (int, float)) or isinstance(self.gate, bool) or not self.gate >= 0):
            raise ValueError(f"TaylorCache.gate must be a threshold >= 0, got {self.gate!r}")
        if self.budget is not None and (
            not isinstance(self.budget, (int, float)) or isinstance(self.budget, bool) or not 0 < self.budget <= 1
        ):
            raise ValueError(f"TaylorCache.budget must be a fraction of block executions in (0, 1], got {self.budget!r}")
        for name in ("schedule", "front_schedule"):
            if getattr(self, name) is not None:
                sched = tuple(getattr(self, name))
                if not sched or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sched):
                    raise ValueError(f"TaylorCache.{name} must be step indices >= 0, got {getattr(self, name)!r}")
                if list(sched) != sorted(set(sched)) or sched[0] != 0:
                    raise ValueError(f"TaylorCache.{name} must be increasing and start at step 0, got {getattr(self, name)!r}")
                object.__setattr__(self, name, sched)
        if isinstance(self.front, bool) or not isinstance(self.front, int) or self.front < 0:
            raise ValueError(f"TaylorCache.front must be an int >= 0 (blocks), got {self.front!r}")
        if self.front and self.mode not in ("schedule", "budget"):
            raise ValueError(f"TaylorCache.front={self.front} needs a schedule or a budget (mode {self.mode!r})")
        if (self.front_schedule is not None or self.front_step_gain is not None) and not self.front:
            raise ValueError("TaylorCache.front_schedule / front_step_gain need front > 0")
        if self.forecast not in (None, "residual", "output"):
            raise ValueError(f"TaylorCache.forecast must be 'residual', 'output' or None, got {self.forecast!r}")
        if self.forecast == "output" and self.front:
            raise ValueError("TaylorCache.forecast='output' cannot be used with front: the rest forecasts its residual "
                             "from the front group's output (use forecast='residual' or front=0)")
        for name in ("timesteps", "gate_scale"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(float(x) for x in v)
                if not all(math.isfinite(x) for x in v):
                    raise ValueError(f"TaylorCache.{name} must be finite numbers, got {getattr(self, name)!r}")
                object.__setattr__(self, name, v)
        for name in ("correct", "refine"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TaylorCache.{name} must be True or False, got {getattr(self, name)!r}")
        for name, valid, what in (  # the refinement's own settings: each valid, and off its default only with refine
            ("refine_starts", lambda v: _int_at_least(v, 1), "a positive int"),
            ("refine_reach", lambda v: _int_at_least(v, 2), "an int >= 2"),
            ("refine_objective", lambda v: isinstance(v, str) and v in REFINE_OBJECTIVES,
             " or ".join(map(repr, REFINE_OBJECTIVES))),
        ):  # fmt: skip
            v = getattr(self, name)
            if not valid(v):
                raise ValueError(f"TaylorCache.{name} must be {what}, got {v!r}")
            if v != self.__dataclass_fields__[name].default and not self.refine:
                raise ValueError(f"TaylorCache.{name}={v!r} needs refine=True")
        if self.refine_reach > 2 and self.front:
            raise ValueError(f"TaylorCache.refine_reach={self.refine_reach} needs front=0 (a front group's steps are not moved)")
        if self.refine and self.budget is None:
            raise ValueError(f"TaylorCache.refine needs a budget (it refines a measured calibration), mode {self.mode!r}")
        for name, sched in (("step_gain", self.schedule), ("front_step_gain", self.front_schedule or self.schedule)):
            if getattr(self, name) is not None:
                try:
                    gains = tuple((float(m), float(g)) for m, g in getattr(self, name))
                except (TypeError, ValueError):
                    raise ValueError(f"TaylorCache.{name} must be (mu, lam) pairs, one per step, got {getattr(self, name)!r}") from None
                if not all(math.isfinite(x) for pair in gains for x in pair):
                    raise ValueError(f"TaylorCache.{name} must be finite numbers, got {getattr(self, name)!r}")
                if sched is None:
                    raise ValueError(f"TaylorCache.{name} needs a schedule (budget or explicit): the gains are per step")
                object.__setattr__(self, name, gains)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"TaylorCache.warmup must be an int >= 0, got {self.warmup!r}")
        if not isinstance(self.full_below, (int, float)) or not 0 <= self.full_below <= 1:
            raise ValueError(f"TaylorCache.full_below must be in [0, 1], got {self.full_below!r}")
        if self.max_skip is not None and (isinstance(self.max_skip, bool) or not isinstance(self.max_skip, int) or self.max_skip < 0):
            raise ValueError(f"TaylorCache.max_skip must be None or an int >= 0, got {self.max_skip!r}")
        if not isinstance(self.sync_batch, bool):
            raise ValueError(f"TaylorCache.sync_batch must be True or False, got {self.sync_batch!r}")
        if self.state_dtype is not None and self.state_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"TaylorCache.state_dtype must be float32, float16 or bfloat16, got {self.state_dtype!r}")
        if self.level not in LEVELS:
            raise ValueError(f"TaylorCache.level must be {' or '.join(map(repr, LEVELS))}, got {self.level!r}")
        if self.level == "attention":
            refused = [f"{n}={getattr(self, n)!r}" for n, ok in (
                ("gate", self.gate is None), ("budget", self.budget is None), ("front", not self.front),
                ("forecast", self.forecast is None), ("step_gain", self.step_gain is None),
            ) if not ok]  # fmt: skip
            if refused:
                raise ValueError(f"TaylorCache.level='attention' takes interval or schedule only (it forecasts each "
                                 f"attention's own output, with no calibration), got {', '.join(refused)}")  # fmt: skip
        # configurations that can never forecast: legal (an exact reference run), but never silent
        if self.max_skip == 0 and self.mode in ("fixed", "gated"):
            warnings.warn("TaylorCache.max_skip=0 never forecasts: every step runs every block", stacklevel=3)
        if self.gate == 0:
            warnings.warn("TaylorCache.gate=0 never forecasts: the confidence signal is never below 0", stacklevel=3)
        if self.full_below == 1 and self.mode in ("fixed", "gated"):
            warnings.warn("TaylorCache.full_below=1 never forecasts: every step is at or below it", stacklevel=3)

    @property
    def mode(self) -> str:
        if self.interval is not None:
            return "fixed"
        if self.gate is not None:
            return "gated"
        return "budget" if self.budget is not None else "schedule"

    @property
    def calibrated(self) -> bool:
        """True when the schedule this config runs is known (every mode but an uncalibrated ``budget``)."""
        return self.budget is None or self.schedule is not None

    def describe(self) -> str:
        sched = {
            "fixed": lambda: f"interval={self.interval}",
            "gated": lambda: f"gate={self.gate:g}" + (", calibrated" if self.gate_scale else ""),
            "budget": lambda: f"budget={self.budget:g}"
            + (f", {len(self.schedule)} of {len(self.timesteps or ())} steps" if self.schedule else ", uncalibrated")
            + (", corrected" if self.step_gain else "") + (", refined" if self.refine else "")
            + (f" from {self.refine_starts} starts" if self.refine_starts > 1 else "")
            + (f", steps moved up to {self.refine_reach}" if self.refine_reach > 2 else "")
            + (f", {self.refine_objective} objective" if self.refine_objective != "mean+worst" else ""),
            "schedule": lambda: f"schedule={list(self.schedule)}" + (", corrected" if self.step_gain else ""),
        }[self.mode]()
        return f"Taylor order {self.order}, {sched}, warmup={self.warmup}" + (
            ", attention-level" if self.level == "attention" else ""
        ) + (
            ", output forecast" if self.forecast == "output" else ""
        ) + (
            f", full_below={self.full_below:g}" if self.full_below else ""
        ) + (f", max_skip={self.max_skip}" if self.max_skip is not None else "") + (
            f", front {self.front} blocks" + (f" on {len(self.front_schedule)} steps" if self.front_schedule else "")
            if self.front else ""
        )

    @classmethod
    def end_anchored(cls, num_steps: int, interval: int, *, warmup: int = 1, **kwargs) -> TaylorCache:
        """A fixed schedule counted back from the last step: steps ``0 .. warmup-1`` and ``num_steps-1``,
        ``num_steps-1-interval``, ... run the full stack (the last step is always computed)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"end_anchored: num_steps must be an int >= 1, got {num_steps!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"end_anchored: interval must be an int >= 1, got {interval!r}")
        steps = set(range(min(max(warmup, 1), num_steps))) | set(range(num_steps - 1, -1, -interval))
        return cls(schedule=tuple(sorted(steps)), warmup=warmup, **kwargs)

    # ---- JSON (a calibration is made once per pipeline and reloaded) ----
    def to_dict(self) -> dict:
        d = asdict(self)
        d["state_dtype"] = None if self.state_dtype is None else str(self.state_dtype).replace("torch.", "")
        for k in ("schedule", "front_schedule", "timesteps", "gate_scale"):
            if d[k] is not None:
                d[k] = list(d[k])
        for k in ("step_gain", "front_step_gain"):
            if d[k] is not None:
                d[k] = [list(g) for g in d[k]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TaylorCache:
        d = dict(d)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"TaylorCache.from_dict: unknown field(s) {unknown}")
        dt = d.get("state_dtype")
        if dt is not None:
            if dt not in _DTYPES:
                raise ValueError(f"TaylorCache.from_dict: state_dtype must be one of {sorted(_DTYPES)}, got {dt!r}")
            d["state_dtype"] = _DTYPES[dt]
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump({"ditkern.TaylorCache": self.to_dict()}, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaylorCache:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or "ditkern.TaylorCache" not in data:
            raise ValueError(f"{os.fspath(path)!r} is not a saved ditkern.TaylorCache (no 'ditkern.TaylorCache' key)")
        return cls.from_dict(data["ditkern.TaylorCache"])
