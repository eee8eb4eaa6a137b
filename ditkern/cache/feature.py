"""The Taylor block cache as a patch feature: hooks on the model (call bookkeeping) and on each block of its stack.

On a forecast step the blocks that are skipped return their inputs unchanged, and the last block returns its input
plus the forecast residual; so the model's own forward runs as written and nothing of it is copied here. The gate
decision reads a tensor on the host: that is the one graph break per step under ``torch.compile`` (in the first
block's hook), and the reason the per-block hooks are plain Python.

What it knows of a model comes from the family's declaration (``Family.stack``): the block lists in run order, each
block class's stream signature, the chain of them it may skip (``Stack.chain``), the streams the model reads after it,
and which forward arguments hold the latents and the timestep, and which way the timestep runs.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ditkern._backend import choose
from ditkern.cache.config import REFINE_OBJECTIVES, TaylorCache
from ditkern.cache.distributed import gate_all_reduce
from ditkern.ops.taylor import BACKENDS as TAYLOR_BACKENDS
from ditkern.ops.taylor import taylor_forecast, taylor_update
from ditkern.patch.engine import Feature, Plan, device_dtype, register_feature
from ditkern.patch.family import Stack, Streams

STATE_ATTR = "_ditkern_cache_state"
CALIB_ELEMENTS = 16384  # elements per item and stream the calibration keeps of each step's features


# ----------------------------------------------------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class _Taylor:
    """Divided differences of one feature (one stream of one quantity), allocated at the first update."""

    d: list[torch.Tensor | None] = field(default_factory=lambda: [None, None, None])

    def ensure(self, like: torch.Tensor, order: int, dtype: torch.dtype) -> None:
        if self.d[0] is None or self.d[0].shape != like.shape or self.d[0].device != like.device:
            self.d = [torch.zeros(like.shape, dtype=dtype, device=like.device) if k <= order else None for k in range(3)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.d if t is not None)


@dataclass
class _Slot:
    """The state of one call slot: per batch item times, counters, and the Taylor features."""

    batch: int
    n_updates: torch.Tensor  # [B] int64, CPU
    t0: torch.Tensor  # [B] float64: time of the last full update
    t1: torch.Tensor  # [B] float64: time of the one before
    skips: torch.Tensor  # [B] int64: consecutive forecasts
    step: int = 0
    t_first: float | None = None
    off_calibration: bool = False  # this generation's timesteps left the calibrated ones: run every block
    probe: dict[str, _Taylor] = field(default_factory=dict)  # first block's residual, per stream
    rest: dict[str, _Taylor] = field(default_factory=dict)  # stack residual after the anchor, per stream
    front: _Slot | None = None  # TaylorCache.front: the front group's own times, counters and features (its rest)
    attn: dict[str, _Taylor] = field(default_factory=dict)  # level="attention": each attention's output, by "i.part"
    attn_parts: dict[int, tuple] = field(default_factory=dict)  # level="attention": attention i's output layout

    @classmethod
    def new(cls, batch: int) -> _Slot:
        z = torch.zeros(batch, dtype=torch.float64)
        return cls(batch, torch.zeros(batch, dtype=torch.int64), z.clone(), z.clone(), torch.zeros(batch, dtype=torch.int64))

    def update_coeffs(self, t: torch.Tensor, device):
        """c1 = 1/(t - t0), c2 = 1/(t - t1), zero where the point does not exist yet (or coincides)."""
        dt0, dt1 = t - self.t0, t - self.t1
        c1 = torch.where((self.n_updates >= 1) & (dt0 != 0), 1.0 / dt0.where(dt0 != 0, torch.ones_like(dt0)), 0.0)
        c2 = torch.where((self.n_updates >= 2) & (dt1 != 0), 1.0 / dt1.where(dt1 != 0, torch.ones_like(dt1)), 0.0)
        return c1.float().to(device), c2.float().to(device)

    def forecast_coeffs(self, t: torch.Tensor, device):
        """a1 = t - t0 (needs 2 updates), a2 = (t - t0)(t - t1) (needs 3)."""
        a1 = torch.where(self.n_updates >= 2, t - self.t0, 0.0)
        a2 = torch.where(self.n_updates >= 3, (t - self.t0) * (t - self.t1), 0.0)
        return a1.float().to(device), a2.float().to(device)

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in (*self.probe.values(), *self.rest.values(), *self.attn.values()))


@dataclass
class _Call:
    """What the hooks of one model call share."""

    slot: _Slot
    t: torch.Tensor  # [B] float64
    skip_all: bool = False  # fixed schedule, forecast step: every block is skipped
    skip_rest: bool = False  # gated: every item accepted; blocks after the first are skipped
    accept: torch.Tensor | None = None  # [B] bool: items that take the forecast (gated)
    anchor: dict | None = None  # the streams the stack residual is measured from, by name
    first_in: dict | None = None
    probe: dict | None = None  # calibration: the first block's residual, by stream
    front_skip: bool = False  # TaylorCache.front: the front group is forecast on this call
    front_anchor: dict | None = None  # the front group's input streams
    front_res: dict | None = None  # calibration: the front group's residual, by stream


def _calibrated_at(timesteps: tuple[float, ...], k: int, t: float) -> bool:
    """Whether step ``k`` of this generation has the timestep the calibration recorded at step ``k``."""
    return k < len(timesteps) and abs(t - timesteps[k]) <= 1e-4 * max(1.0, abs(timesteps[k]))


class CacheState:
    def __init__(self, config: TaylorCache, model: nn.Module, n_blocks: int, stack: Stack, backend, n_always: int = 0):
        self.config = config
        self.model = weakref.ref(model)  # the gate's sums are reduced over its context-parallel group
        self.n_blocks = n_blocks
        self.n_always = n_always  # blocks of the stack outside the cached chain: they run on every call
        self.front = config.front  # blocks of the chain in the front group (0: one group)
        self.out_streams = tuple(stack.reads_after)
        self.latents, self.timestep, self.rises = stack.latents, stack.timestep, stack.timestep_rises
        self.uncached_if = tuple(stack.uncached_if)
        self.backend = backend
        self.forward_sig = inspect.signature(type(model).forward)
        self.slots: dict[int, _Slot] = {}
        self.call: _Call | None = None
        self.last_t: tuple | None = None
        self.slot_index = 0
        self.recording = not config.calibrated  # an uncalibrated budget records its first generation
        self.records: list[dict] = []  # per (generation, call slot): sampled features of every step
        self._rec: dict[int, dict] = {}
        self._rec_idx: dict[str, torch.Tensor | None] = {}
        self._warned_off = False
        self._attn_refused: set[int] = set()  # level="attention": attentions whose output cannot be cached
        self.manual = False  # ditkern.cache.calibrate is recording (it solves at its end, not per generation)
        self.reset_stats()

    # ---- bookkeeping ----
    def reset(self) -> None:
        """Drop the Taylor state; the next call starts a new generation."""
        self.slots.clear()
        self.last_t = None
        self.slot_index = 0

    def reset_stats(self) -> None:
        self.calls = self.forecast_calls = self.blocks_run = self.blocks_total = 0
        self.attention_run = self.attention_total = 0  # level="attention": cached attentions computed / called
        self.generations = 0
        self._counted = False  # the generation in progress is not counted yet (counted at its next call)
        self.peak_bytes = 0
        self.signal_min = math.inf
        self._gen_reset()

    def _gen_reset(self) -> None:
        self.gen_calls = self.gen_forecasts = self.gen_compared = 0
        self.gen_signal_min = math.inf

    def stats(self) -> dict:
        """Counters since the patch (or ``reset_stats``). ``generations`` counts the generations started (the first
        one too); ``blocks_total`` is ``calls`` times the stack's blocks; ``blocks_run`` counts every block executed
        (the blocks outside the cached chain on every call); ``forecast_calls`` the calls whose cached chain was
        skipped (gated with ``sync_batch=False``: the calls where every item took the forecast); ``signal_min`` the
        lowest gate signal compared (inf when none); ``attention_fraction`` the fraction of the stack's cached
        attention calls that computed (level="attention"; the block fraction at block level, where an attention runs
        when its block does)."""
        block_fraction = self.blocks_run / self.blocks_total if self.blocks_total else 1.0
        return {
            "calls": self.calls,
            "forecast_calls": self.forecast_calls,
            "blocks_run": self.blocks_run,
            "blocks_total": self.blocks_total,
            "block_fraction": block_fraction,
            "attention_fraction": self.attention_run / self.attention_total if self.attention_total else block_fraction,
            "state_bytes": sum(s.nbytes() for s in self.slots.values()),
            "peak_state_bytes": self.peak_bytes,
            "generations": self.generations,
            "signal_min": self.signal_min,
            "calibrated": self.config.calibrated,
        }

    def _end_generation(self) -> None:
        """At a generation's end (seen when the next one starts, or by ``calibrate``): flush the calibration
        recording, solve an uncalibrated budget, and say so when a gated generation never forecast."""
        cfg = self.config
        if cfg.mode == "gated" and self.gen_compared and not self.gen_forecasts and not self.recording:
            warnings.warn(
                f"TaylorCache.gate={cfg.gate:g} never forecast in a generation of {self.gen_calls} calls: the lowest "
                f"confidence signal was {self.gen_signal_min:.4g}; a gate above it forecasts (calibrate the gate "
                "with ditkern.cache.calibrate so that one threshold means the same on every model)",
                stacklevel=4,
            )
        if self._rec:
            self.records.extend(r for r in self._rec.values() if r["t"])
            self._rec = {}
        if cfg.mode == "budget" and not cfg.calibrated and self.records and self.recording and not self.manual:
            self.config = solve_budget(self)  # the first generation was the calibration
            self.recording = False
            self.records = []
        self._gen_reset()

    def state_dtype(self, device) -> torch.dtype:
        if self.config.state_dtype is not None:
            return self.config.state_dtype
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    def bypass(self, args, kwargs) -> str | None:
        """The declared argument that makes this call run uncached (it adds residuals between the chain's blocks)."""
        if not self.uncached_if:
            return None
        bound = self.forward_sig.bind(None, *args, **kwargs).arguments
        return next((a for a in self.uncached_if if bound.get(a) is not None), None)

    def begin(self, args, kwargs) -> None:
        bound = self.forward_sig.bind(None, *args, **kwargs)
        hs = bound.arguments[self.latents]
        ts = bound.arguments.get(self.timestep)
        batch = len(hs) if isinstance(hs, (list, tuple)) else hs.shape[0]  # Z-Image: a list of latents
        if ts is None:
            raise ValueError(f"ditkern cache: the model was called without a timestep ({self.timestep!r})")
        ts = torch.as_tensor(ts).detach().to("cpu", torch.float64)
        if ts.dim() == 0:
            t = ts.repeat(batch)
        elif ts.dim() == 1:
            t = ts if ts.numel() == batch else ts[:1].repeat(batch)
        else:  # per-token timesteps (Wan 2.2 TI2V): the item's noisiest token
            ts = ts.reshape(ts.shape[0], -1)
            t = ts.amin(dim=1) if self.rises else ts.amax(dim=1)
        key = tuple(t.tolist())
        if self.last_t is not None and key == self.last_t:
            self.slot_index += 1
        else:
            # a timestep back toward its start (above the previous step's; below it where timesteps rise) means a
            # new generation started: drop the state
            if self.last_t is None or (min(key) < min(self.last_t) if self.rises else max(key) > max(self.last_t)):
                if self.gen_calls:
                    self._end_generation()
                self.reset()
                self._counted = False
            self.slot_index = 0
        if not self._counted:
            self.generations += 1
            self._counted = True
        self.last_t = key
        slot = self.slots.get(self.slot_index)
        if slot is None or slot.batch != batch:
            slot = self.slots[self.slot_index] = _Slot.new(batch)
        if slot.t_first is None:
            slot.t_first = float(t.min() if self.rises else t.max())
        self.call = call = _Call(slot=slot, t=t)
        self.calls += 1
        self.gen_calls += 1
        self.blocks_total += self.n_blocks + self.n_always
        self.blocks_run += self.n_always
        if self.config.level == "attention":  # every block runs; the chain's attentions forecast on skipped steps
            self.blocks_run += self.n_blocks
            call.skip_all = not self.fixed_is_full(call)
            if call.skip_all:
                self.forecast_calls += 1
                self.gen_forecasts += 1

    def end(self) -> None:
        if self.call is not None:
            if self.config.level == "attention":  # every attention of the call has read the times: advance them
                self._commit(self.call, torch.full((self.call.slot.batch,), not self.call.skip_all))
            self.call.slot.step += 1
            self.peak_bytes = max(self.peak_bytes, sum(s.nbytes() for s in self.slots.values()))
        self.call = None

    # ---- decisions ----
    def _eligible(self, call: _Call) -> torch.Tensor:
        """[B] bool: items that may take a forecast this step (before looking at the gate)."""
        cfg, slot = self.config, call.slot
        ok = slot.n_updates >= 1
        ok &= torch.tensor(slot.step >= cfg.warmup).expand_as(ok)
        if cfg.full_below > 0:  # the way left to the end (0 for falling timesteps, 1 for rising ones)
            if self.rises:
                ok &= (1.0 - call.t) > cfg.full_below * (1.0 - slot.t_first)
            else:
                ok &= call.t > cfg.full_below * slot.t_first
        max_skip = cfg.max_skip if cfg.max_skip is not None else (cfg.interval - 1 if cfg.interval else None)
        if max_skip is not None:
            ok &= slot.skips < max_skip
        return ok

    def fixed_is_full(self, call: _Call) -> bool:
        cfg, slot = self.config, call.slot
        if cfg.mode != "fixed":
            return self.scheduled_is_full(call)
        if not bool(self._eligible(call).all()):
            return True
        return (slot.step - max(cfg.warmup, 1)) % cfg.interval == 0

    def on_calibration(self, call: _Call) -> bool:
        """Whether this step's timestep is the calibrated one (always, for a config without timesteps). A generation
        that leaves them runs uncached from there on, and says so once."""
        cfg, slot = self.config, call.slot
        if cfg.timesteps is None or slot.off_calibration:
            return not slot.off_calibration
        t, k = float(call.t[0]), slot.step
        if _calibrated_at(cfg.timesteps, k, t):
            return True
        slot.off_calibration = True
        if not self._warned_off:
            self._warned_off = True
            want = f"{cfg.timesteps[k]:g}" if k < len(cfg.timesteps) else "none (past its last step)"
            warnings.warn(
                f"TaylorCache was calibrated on {len(cfg.timesteps)} steps (TaylorCache.timesteps); this generation's "
                f"step {k} has timestep {t:g} where the calibration has {want}: running it uncached (recalibrate for "
                "this sampler with ditkern.cache.calibrate)",
                stacklevel=5,
            )
        return False

    def scheduled_is_full(self, call: _Call) -> bool:
        """Budget / explicit schedule: the listed steps run the stack (and any step without state)."""
        cfg, slot = self.config, call.slot
        if self.recording or cfg.schedule is None or not bool((slot.n_updates >= 1).all()):
            return True
        if not self.on_calibration(call):
            return True
        return slot.step in cfg.schedule

    # ---- calibration recording ----
    def _sample(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """[B, <= CALIB_ELEMENTS] float32 on the CPU: the same random elements of this stream at every step (an
        unbiased estimate of squared norms, and bounded memory on large models)."""
        flat = x.detach().flatten(1)
        if key not in self._rec_idx:
            n = flat.shape[1]
            g = torch.Generator().manual_seed(0)
            self._rec_idx[key] = None if n <= CALIB_ELEMENTS else torch.randperm(n, generator=g)[:CALIB_ELEMENTS].sort()[0]
        idx = self._rec_idx[key]
        return (flat if idx is None else flat[:, idx.to(flat.device)]).float().cpu()

    def _record(self, call: _Call, full: dict, out: dict) -> None:
        """One step of the calibration: the stack residual (``full``, what the fixed and budget modes forecast), the
        stack output (``out``, what they forecast with ``forecast="output"``), the part after the first block
        (``rest``, what the gate forecasts) and the first block's residual (``probe``)."""
        rec = self._rec.setdefault(self.slot_index, {"t": [], "full": [], "out": [], "rest": [], "probe": [], "front": []})
        if len(rec["t"]) != call.slot.step or not full:  # a slot that skipped a step: its record stops there
            return
        probe = call.probe or {}
        rec["t"].append(call.t.clone())
        rec["full"].append(torch.cat([self._sample(s, v) for s, v in sorted(full.items())], 1))
        rec["out"].append(torch.cat([self._sample(s, out[s]) for s in sorted(full)], 1))
        rec["rest"].append(torch.cat([self._sample(s, v - probe[s] if s in probe else v) for s, v in sorted(full.items())], 1))
        rec["probe"].append(torch.cat([self._sample(s, v) for s, v in sorted(probe.items())], 1) if probe else None)
        front = {s: call.front_res[s] for s in full if call.front_res and s in call.front_res}  # same streams as full
        rec["front"].append(torch.cat([self._sample(s, v) for s, v in sorted(front.items())], 1) if len(front) == len(full) else None)

    # ---- Taylor helpers ----
    def _forecast(self, feats: dict[str, _Taylor], idx: str, base, call: _Call, gain: tuple[float, float] | None = None,
                  slot: _Slot | None = None, out_dtype: torch.dtype | None = None):  # fmt: skip
        """``base + d0 + increment``; with ``gain = (mu, lam)``: ``base + mu * d0 + lam * increment`` (``slot``: the
        group's times, default the call's; ``out_dtype``: default base's, float32 without a base)."""
        f = feats[idx]
        a1, a2 = (slot or call.slot).forecast_coeffs(call.t, f.d[0].device)
        out_dtype = out_dtype or (base.dtype if base is not None else torch.float32)
        if gain is not None:
            a1, a2 = a1 * gain[1], a2 * gain[1]
        out = taylor_forecast(*f.d, a1, a2, base=base, order=self.config.order, out_dtype=out_dtype, backend=self.backend)
        if gain is not None and gain[0] != 1.0:
            out = out.add_(f.d[0].to(out.dtype), alpha=gain[0] - 1.0)
        return out

    @property
    def residual(self) -> bool:
        """TaylorCache.forecast: the chain's residual over its fresh input (True) or the chain's output (False)."""
        return self.config.forecast != "output"

    def step_gain(self, call: _Call, front: bool = False) -> tuple[float, float] | None:
        """The calibrated forecast gains of this step (None: none, or off the calibrated timesteps)."""
        g = self.config.front_step_gain if front else self.config.step_gain
        ts, k = self.config.timesteps, call.slot.step
        if not g or k >= len(g) or (ts is not None and not _calibrated_at(ts, k, float(call.t[0]))):
            return None
        return g[k]

    def _update(self, feats: dict[str, _Taylor], idx: str, x, base, mask: torch.Tensor, call: _Call, slot: _Slot | None = None):
        f = feats.setdefault(idx, _Taylor())
        f.ensure(x, self.config.order, self.state_dtype(x.device))
        c1, c2 = (slot or call.slot).update_coeffs(call.t, x.device)
        taylor_update(x, *f.d, c1, c2, mask.to(device=x.device, dtype=torch.int32), base=base,
                      order=self.config.order, backend=self.backend)  # fmt: skip

    def _commit(self, call: _Call, updated: torch.Tensor, slot: _Slot | None = None) -> None:
        slot = slot or call.slot
        slot.t1 = torch.where(updated, slot.t0, slot.t1)
        slot.t0 = torch.where(updated, call.t, slot.t0)
        slot.n_updates = slot.n_updates + updated.long()
        slot.skips = torch.where(updated, torch.zeros_like(slot.skips), slot.skips + 1)

    # ---- the hooks' bodies (``sig``: the block's stream signature; streams are dicts by name) ----
    def first_block(self, sig: Streams, inner, args, kwargs):
        call = self.call
        if call is None:  # the block was called outside the model's forward: no caching
            return inner(*args, **kwargs)
        streams_in = sig.read(args, kwargs)
        if self.recording:  # calibration: every block runs; the first block's residual is kept for the gate scales
            out = inner(*args, **kwargs)
            self.blocks_run += 1
            first_out = sig.split(out)
            call.first_in = call.front_anchor = streams_in
            call.anchor = first_out if self.config.mode == "gated" else streams_in
            call.probe = {
                s: xo.float() - streams_in[s].float()
                for s, xo in first_out.items()
                if xo is not None and streams_in.get(s) is not None and xo.shape == streams_in[s].shape
            }
            return out
        if self.front:  # two groups: the front's and the rest's decisions (the rest's input is the front's output)
            call.first_in = call.front_anchor = streams_in
            call.front_skip = not self.front_is_full(call)
            call.skip_all = not self.fixed_is_full(call)
            if call.skip_all:
                self.forecast_calls += 1
                self.gen_forecasts += 1
            if call.front_skip:
                return sig.join(streams_in)
            self.blocks_run += 1
            return inner(*args, **kwargs)
        if self.config.mode != "gated":
            if not self.fixed_is_full(call):
                call.skip_all = True
                self.forecast_calls += 1
                self.gen_forecasts += 1
                return sig.join(streams_in)
            call.anchor = streams_in
            self.blocks_run += 1
            return inner(*args, **kwargs)
        out = inner(*args, **kwargs)
        self.blocks_run += 1
        first_out = sig.split(out)
        call.first_in, call.anchor = streams_in, first_out
        eligible = self._eligible(call)
        accept = torch.zeros_like(eligible)
        if bool(eligible.any()):
            err2 = torch.zeros(eligible.shape[0], dtype=torch.float64)
            ref2 = torch.zeros_like(err2)
            compared = False
            for s, xo in first_out.items():
                xi = streams_in.get(s)
                if xo is None or xi is None or s not in call.slot.probe:
                    continue
                compared = True
                fc = self._forecast(call.slot.probe, s, None, call)  # forecast of the first block's residual
                r = xo.float() - xi.float()
                err2 += (r - fc.float()).flatten(1).pow(2).sum(1).double().cpu()
                ref2 += r.flatten(1).pow(2).sum(1).double().cpu()
            err2, ref2 = gate_all_reduce(self.model(), torch.stack([err2, ref2]))  # one decision on every rank
            rel = (err2 / ref2.clamp_min(1e-30)).sqrt() * self.gate_scale(call)
            if compared:
                self.gen_compared += 1
                low = float(rel[eligible].min())
                self.gen_signal_min, self.signal_min = min(self.gen_signal_min, low), min(self.signal_min, low)
                accept = eligible & (rel < self.config.gate)
                if self.config.sync_batch:  # one decision for the whole call
                    accept = accept.all().expand_as(accept).clone()
        call.accept = accept
        if bool(accept.all()):
            call.skip_rest = True
            self.forecast_calls += 1
            self.gen_forecasts += 1
        return out

    def attention(self, i: int, inner, args, kwargs):
        """level="attention": the chain's i-th self-attention. On a computed step it runs and its output (a tensor,
        or a tuple of them: FLUX's image and text streams) updates its Taylor state; on a forecast step it returns
        the forecast of that output and does not run. An attention without state yet (or whose output's batch is
        not the call's) runs."""
        call = self.call
        if call is None:
            return inner(*args, **kwargs)
        slot = call.slot
        self.attention_total += 1
        layout = slot.attn_parts.get(i)
        if call.skip_all and layout is not None:
            parts = [None if dt is None else self._forecast(slot.attn, f"{i}.{j}", None, call, out_dtype=dt)
                     for j, dt in enumerate(layout[1])]  # fmt: skip
            return tuple(parts) if layout[0] else parts[0]
        out = inner(*args, **kwargs)
        self.attention_run += 1
        if call.skip_all:  # no state to forecast from (its first step ran without it): computed, not recorded
            return out
        parts = out if isinstance(out, tuple) else (out,)
        if any(p is not None and (not isinstance(p, torch.Tensor) or p.shape[0] != slot.batch) for p in parts):
            if i not in self._attn_refused:
                self._attn_refused.add(i)
                warnings.warn(f"TaylorCache(level='attention'): attention {i} of the chain returned "
                              f"{type(out).__name__} without the call's batch of {slot.batch} first: it always runs",
                              stacklevel=4)  # fmt: skip
            return out
        every = torch.ones(slot.batch, dtype=torch.bool)
        for j, p in enumerate(parts):
            if p is not None:
                self._update(slot.attn, f"{i}.{j}", p, None, every, call)
        slot.attn_parts[i] = (isinstance(out, tuple), tuple(None if p is None else p.dtype for p in parts))
        return out

    def gate_scale(self, call: _Call) -> float:
        """The calibrated factor that turns the first block's relative error into the predicted relative error of
        the rest of the stack at this step (1 uncalibrated; the median factor off the calibrated timesteps)."""
        sc = self.config.gate_scale
        if not sc:
            return 1.0
        k, ts = call.slot.step, self.config.timesteps
        if ts is not None and k < len(sc) and _calibrated_at(ts, k, float(call.t[0])):
            return sc[k]
        return sorted(sc)[len(sc) // 2]

    def middle_block(self, sig: Streams, inner, args, kwargs, i: int = -1):
        call = self.call
        if call is not None and (call.front_skip if 0 <= i < self.front else call.skip_all or call.skip_rest):
            return sig.join(sig.read(args, kwargs))
        self.blocks_run += 1
        return inner(*args, **kwargs)

    def _front_slot(self, slot: _Slot) -> _Slot:
        if slot.front is None or slot.front.batch != slot.batch:
            slot.front = _Slot.new(slot.batch)
        return slot.front

    def front_is_full(self, call: _Call) -> bool:
        """TaylorCache.front: the front group's steps (``front_schedule``, else the rest's schedule) run in full."""
        cfg, fs = self.config, self._front_slot(call.slot)
        sched = cfg.front_schedule or cfg.schedule
        if self.recording or sched is None or not bool((fs.n_updates >= 1).all()) or not self.on_calibration(call):
            return True
        return call.slot.step in sched

    def front_last_block(self, sig: Streams, inner, args, kwargs):
        """The front group's last block: its input plus the front's forecast residual, or run and update."""
        call = self.call
        if call is None:
            return inner(*args, **kwargs)
        fs = self._front_slot(call.slot)
        if call.front_skip:
            outs = dict(sig.read(args, kwargs))  # the skipped front blocks passed the front's input through
            gain = self.step_gain(call, front=True)
            for s in outs:
                if s in fs.rest and s in call.front_anchor:
                    outs[s] = self._forecast(fs.rest, s, call.front_anchor[s], call, gain, slot=fs)
            self._commit(call, torch.zeros(fs.batch, dtype=torch.bool), slot=fs)
            return sig.join(outs)
        out = inner(*args, **kwargs)
        self.blocks_run += 1
        update = torch.ones(fs.batch, dtype=torch.bool)
        call.front_res = {}
        for s, xo in sig.split(out).items():
            xi = call.front_anchor.get(s)
            if xo is None or xi is None or xo.shape != xi.shape:
                continue
            self._update(fs.rest, s, xo, xi, update, call, slot=fs)
            if self.recording:
                call.front_res[s] = xo.float() - xi.float()
        self._commit(call, update, slot=fs)
        return out

    def back_first_block(self, sig: Streams, inner, args, kwargs):
        """The first block after the front group: the rest's anchor (its input, the front's output)."""
        call = self.call
        if call is None:
            return inner(*args, **kwargs)
        if call.skip_all:
            return sig.join(sig.read(args, kwargs))
        call.anchor = sig.read(args, kwargs)
        self.blocks_run += 1
        return inner(*args, **kwargs)

    def last_block(self, sig: Streams, inner, args, kwargs):
        call = self.call
        if call is None:
            return inner(*args, **kwargs)
        streams_in = sig.read(args, kwargs)
        slot = call.slot
        if call.skip_all or call.skip_rest:
            outs = dict(streams_in)  # streams the model does not read after the stack pass through
            gain = self.step_gain(call)
            for s in self.out_streams:
                if s in slot.rest:
                    base = streams_in[s] if self.residual else None
                    outs[s] = self._forecast(slot.rest, s, base, call, gain, out_dtype=streams_in[s].dtype)
            self._commit(call, torch.zeros(slot.batch, dtype=torch.bool))
            return sig.join(outs)
        out = inner(*args, **kwargs)
        self.blocks_run += 1
        computed = sig.split(out)
        outs = dict(computed)
        accept = call.accept if call.accept is not None else torch.zeros(slot.batch, dtype=torch.bool)
        update = ~accept
        mixed = bool(accept.any())
        for s in self.out_streams:
            if computed.get(s) is None:
                continue
            base = call.anchor[s] if self.residual else None
            if mixed and s in slot.rest:  # items that accepted the forecast get it, exactly as if run alone
                fc = self._forecast(slot.rest, s, base, call, out_dtype=computed[s].dtype)
                sel = accept.to(computed[s].device).view(-1, *([1] * (computed[s].dim() - 1)))
                outs[s] = torch.where(sel, fc, computed[s])
            self._update(slot.rest, s, computed[s], base, update, call)
        if self.recording:
            kept = [s for s in self.out_streams if computed.get(s) is not None and call.first_in.get(s) is not None]
            self._record(call, {s: computed[s].float() - call.first_in[s].float() for s in kept},
                         {s: computed[s] for s in kept})  # fmt: skip
        if self.config.mode == "gated":
            for s, xo in call.anchor.items():
                xi = call.first_in.get(s)
                if xo is not None and xi is not None and xo.shape == xi.shape:
                    self._update(slot.probe, s, xo, xi, update, call)
        self._commit(call, update)
        return sig.join(outs) if mixed else out


# ----------------------------------------------------------------------------------------------------------------------
# calibration: from the recorded features of uncached generations to a schedule (budget) or gate scales (gated)
# ----------------------------------------------------------------------------------------------------------------------
def _calibration_set(state: CacheState):
    """(t [N] float64 of item 0, {"full"/"rest"/"probe": [N, I, m]}) over the recorded generations and call slots
    that have the most common step count and the same timesteps."""
    recs = [r for r in state.records if r["t"]]
    if not recs:
        raise ValueError("no calibration data: the calibration run made no call through the cached stack")
    lengths = [len(r["t"]) for r in recs]
    n = max(set(lengths), key=lengths.count)
    recs = [r for r in recs if len(r["t"]) == n]
    t = torch.stack([x[0] for x in recs[0]["t"]])
    recs = [r for r in recs if torch.allclose(torch.stack([x[0] for x in r["t"]]), t, rtol=1e-4, atol=1e-6)]
    out = {}
    for key in ("full", "out", "rest", "probe", "front"):
        if all(v is not None for r in recs for v in r[key]):
            out[key] = torch.stack([torch.cat([r[key][k] for r in recs]) for k in range(n)])
    return t, out


def _step_weights(t: torch.Tensor, rises: bool) -> torch.Tensor:
    """How much a forecast error at step k moves the sample: the timestep span to the next step (to the end of the
    schedule, 0 falling / 1 rising, for the last), normalised to sum 1. The model's output is integrated over that
    span by an ODE sampler (x_{k+1} = x_k + (t_{k+1} - t_k) v_k for flow matching)."""
    end = torch.tensor([1.0 if rises else 0.0], dtype=t.dtype)
    w = (torch.cat([t[1:], end]) - t).abs()
    return w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(w))


def _forecast_error(x: torch.Tensor, tt: torch.Tensor, a: int, b: int, ks: torch.Tensor, order: int) -> torch.Tensor:
    """[len(ks)] mean over items of the RMS error of forecasting ``x[ks]`` from the computed steps a < b (a = -1:
    b is the first one, the forecast is reuse), as the cache forecasts (order >= 1: Newton through a and b)."""
    fc = x[b].expand(len(ks), *x[b].shape)
    if order >= 1 and a >= 0:
        slope = (x[b] - x[a]) / float(tt[b] - tt[a])
        fc = fc + slope * (tt[ks] - tt[b]).float().view(-1, 1, 1)
    return (x[ks] - fc).pow(2).mean(-1).sqrt().mean(-1).double()


def plan_schedule(t: torch.Tensor, feats: torch.Tensor, n_compute: int, order: int, rises: bool = False,
                  weights: torch.Tensor | None = None, must: tuple[int, ...] = ()) -> tuple[int, ...]:  # fmt: skip
    """The ``n_compute`` steps (step 0 among them) to run in full so that the Taylor forecasts of the others are
    closest to ``feats`` [N, I, m] (the stack residual of uncached runs, I items): dynamic programming over the last
    two computed steps, each forecast step costing its weight (``weights``; default :func:`_step_weights`) times the
    mean over items of the forecast's RMS error; the steps in ``must`` are computed. Order 2 is planned with the
    order-1 error model (its three-point state would make the search N^4)."""
    n = len(t)
    if n_compute >= n:
        return tuple(range(n))
    tt = t.double()
    w = _step_weights(tt, rises) if weights is None else weights.double()
    x = feats.float()
    cost = torch.zeros(n + 1, n, n + 1, dtype=torch.float64)  # [a + 1, b, c]: forecast cost of steps b < k < c
    for b in range(n - 1):
        ks = torch.arange(b + 1, n)
        for a in range(-1, b):
            cost[a + 1, b, b + 2 :] = (_forecast_error(x, tt, a, b, ks, order) * w[ks]).cumsum(0)
    for m in must:  # a computed step may not jump over a step that must be computed
        if 0 < m < n:
            for b in range(m):
                cost[:, b, m + 1 :] = math.inf
    inf = math.inf
    f = torch.full((n + 1, n), inf, dtype=torch.float64)  # best cost with j computed steps, the last two (a, b)
    f[0, 0] = 0.0
    back = []
    for _ in range(n_compute - 1):
        g = torch.full_like(f, inf)
        arg = torch.full((n + 1, n), -1, dtype=torch.long)
        for b in range(n - 1):
            for a1 in range(b + 1):
                if f[a1, b] == inf:
                    continue
                cand = f[a1, b] + cost[a1, b, b + 1 : n]  # next computed step c = b+1 .. n-1
                row = g[b + 1, b + 1 :]
                better = cand < row
                row[better] = cand[better]
                arg[b + 1, b + 1 :][better] = a1
        back.append(arg)
        f = g
    total = f + cost[:, :, n]
    a1, b = divmod(int(torch.argmin(total)), n)
    steps = [b]
    for arg in reversed(back):
        a1, b = int(arg[a1, b]), a1 - 1
        steps.append(b)
    return tuple(sorted(steps))


def _rms(x) -> float:
    x = torch.as_tensor(x).double()
    return float(x.pow(2).mean().sqrt())


def spaced_schedule(n_steps: int, n_compute: int, power: float = 1.0) -> tuple[int, ...]:
    """End-anchored: step 0, the last step, and the others at ``(n_steps - 1) * (i / (n_compute - 1)) ** power``
    (power 1: evenly spaced; above 1 denser at the start, below 1 denser at the end), nudged apart where they meet."""
    if n_compute >= n_steps:
        return tuple(range(n_steps))
    if n_compute <= 1:
        return (0,)
    out = [0]
    for i in range(1, n_compute):
        want = round((n_steps - 1) * (i / (n_compute - 1)) ** power)
        out.append(min(max(want, out[-1] + 1), n_steps - 1 - (n_compute - 1 - i)))
    return tuple(out)


SPACINGS = (0.6, 0.8, 1.0, 1.25, 1.6)  # the powers of spaced_schedule a measured calibration tries


def candidate_schedules(state: CacheState, n_compute: int) -> dict[str, tuple]:
    """The schedules a measured calibration chooses among, each once (the first name of a repeated one is kept):
    end-anchored spacings (:data:`SPACINGS`); from 3 computed steps, two with TaylorSeer's second warm-up step (step
    1 computed too): the rest evenly spaced and end-anchored, and TaylorSeer's own schedule (0, 1 and the multiples of
    the interval whose count is the budget's, where one is) and the fixed mode's (``interval``: 0, then every interval
    from step 1, where one fits); and the schedule planned from the recorded feature
    change (:func:`plan_schedule`)."""
    t, feats = _calibration_set(state)
    n = len(t)
    cands = {f"spaced power={p:g}": spaced_schedule(n, n_compute, p) for p in SPACINGS}
    if 3 <= n_compute < n:
        cands["warm-up 2, spaced"] = (0,) + tuple(1 + k for k in spaced_schedule(n - 1, n_compute - 1))
        periodic = {  # the first interval whose schedule has the budget's count, where one has
            "warm-up 2, every {}": lambda k: tuple(sorted({0, 1, *range(0, n, k)})),  # TaylorSeer's: 0, 1, multiples
            "step 0, every {} from 1": lambda k: (0, *range(1, n, k)),  # the fixed mode's (interval=k, warmup=1)
        }
        for name, make in periodic.items():
            every = next((k for k in range(2, n) if len(make(k)) == n_compute), None)
            if every is not None:
                cands[name.format(every)] = make(every)
    cands["planned"] = plan_schedule(t, feats["full"], n_compute, state.config.order, state.rises)
    out: dict[str, tuple] = {}
    for name, sched in cands.items():
        if sched not in out.values():
            out[name] = sched
    return out


def front_candidates(state: CacheState, n_steps: int, n_compute: int) -> dict[str, tuple[tuple, tuple]]:
    """TaylorCache.front: ``{name: (front schedule, rest schedule)}``, evenly spaced and end-anchored, the front
    group on more steps than the rest, each pair costing within half a full step of the budget (the same tolerance
    as rounding a whole-stack step count)."""
    cfg, n, a, f = state.config, state.n_blocks, state.n_always, state.front
    target = n_steps * (cfg.budget * (n + a) - a)  # block executions of the cached chain
    out = {}
    for k_rest in range(max(1, n_compute - 3), n_compute + 1):
        k_front = min(n_steps, round((target - (n - f) * k_rest) / f))
        if k_front > k_rest and abs(f * k_front + (n - f) * k_rest - target) <= n / 2:
            out[f"front {k_front} steps, rest {k_rest}"] = (spaced_schedule(n_steps, k_front), spaced_schedule(n_steps, k_rest))
    return out


def _score(out, ref, worst: float = 1.0) -> float:
    """Mean plus ``worst`` times the worst per-item PSNR (peak 1) of ``out`` against ``ref`` [I, ...], each capped at
    100 dB."""
    a, b = torch.as_tensor(out).double(), torch.as_tensor(ref).double()
    mse = (a - b).pow(2).flatten(1).mean(1) if a.dim() > 1 else (a - b).pow(2).mean().view(1)
    p = (-10 * torch.log10(mse.clamp_min(1e-10))).clamp(max=100.0)
    return float(p.mean() + worst * p.min())


def fit_gains(t: torch.Tensor, feats: torch.Tensor, schedule: tuple[int, ...], order: int) -> tuple[tuple[float, float], ...]:
    """Per step ``(mu, lam)`` so that ``mu * d0 + lam * increment`` (the last computed step's feature and the Taylor
    increment through the last ``order + 1`` computed steps, as the cache forecasts) is the least-squares fit, over
    every item and element of ``feats`` [N, I, m] (uncached features), of the feature at each forecast step; (1, 1) on
    computed steps. After one computed step only ``mu`` is fitted (the forecast is reuse). Clamped to mu in
    [0.5, 1.5], lam in [0, 3] (a fit outside says the recording is not representative)."""
    tl = [float(v) for v in t]
    x = feats.double()
    out = []
    for k in range(len(tl)):
        prev = [j for j in schedule if j < k][-(order + 1) :]
        if k in schedule or not prev:
            out.append((1.0, 1.0))
            continue
        d0 = x[prev[-1]].flatten()
        y = x[k].flatten()
        inc = (_newton([tl[j] for j in prev], [x[j] for j in prev], tl[k]) - x[prev[-1]]).flatten() if len(prev) > 1 else None
        if inc is None or float(inc.abs().max()) == 0.0:
            mu, lam = float(y @ d0) / max(float(d0 @ d0), 1e-300), 1.0
        else:
            a = torch.stack([d0, inc], 1)
            gram = a.T @ a
            if float(torch.linalg.det(gram)) <= 1e-12 * float(gram.diagonal().prod()):
                mu, lam = 1.0, 1.0
            else:
                mu, lam = (float(v) for v in torch.linalg.solve(gram, a.T @ y))
        out.append((min(max(mu, 0.5), 1.5), min(max(lam, 0.0), 3.0)))
    return tuple(out)


#: how many of the best schedules (forecasting the residual) a budget calibration with ``forecast=None`` measures
#: again forecasting the output
OUTPUT_TRIES = 3


def measure_schedules(state: CacheState, run, reference, n_compute: int):
    """Run every candidate schedule (``run()`` once each; with ``correct``, once more with its fitted
    :func:`fit_gains`; with ``front``, the :func:`front_candidates` too) and keep the one whose result is closest to
    the uncached ``reference`` (mean + worst item PSNR): the offline error model ignores how errors compound through
    the sampler, a measurement does not. With ``forecast=None`` the candidates forecast the residual, and (without a
    front group) the :data:`OUTPUT_TRIES` best schedules are measured again forecasting the output (with and without
    their gains). Returns ``(the calibrated config, {candidate name: (its config, score)})``."""
    cfg = state.config
    t, feats = _calibration_set(state)
    ts = tuple(float(v) for v in t)
    cands = {name: (None, sched) for name, sched in candidate_schedules(state, n_compute).items()}
    if state.front:
        if "front" not in feats:
            raise ValueError("calibrate: the front group's residual was not recorded (TaylorCache.front)")
        cands.update(front_candidates(state, len(t), n_compute))
    target = _gain_targets(state, feats)
    scores = {}

    def measure(name, front, sched, forecast):
        tries = [(name, None, None)]
        if cfg.correct and len(sched) < len(t):
            fg = fit_gains(t, feats["front"], front or sched, cfg.order) if state.front else None
            tries.append((f"{name} corrected", fit_gains(t, target[forecast], sched, cfg.order), fg))
        for label, gains, fgains in tries:
            state.config = replace(cfg, schedule=sched, timesteps=ts, step_gain=gains, front_schedule=front,
                                   front_step_gain=fgains, forecast=forecast)  # fmt: skip
            state.reset()
            scores[label] = (_score(run(), reference), state.config, name)

    recording, state.recording = state.recording, False
    try:
        for name, (front, sched) in cands.items():
            measure(name, front, sched, cfg.forecast or "residual")
        if cfg.forecast is None and not state.front:  # a front group's rest forecasts its residual
            best = {}  # schedule name -> its best score, with or without gains
            for score, _, name in scores.values():
                best[name] = max(score, best.get(name, -math.inf))
            for name in sorted(best, key=best.get, reverse=True)[:OUTPUT_TRIES]:
                measure(f"{name}, output", None, cands[name][1], "output")
    finally:
        state.config, state.recording = cfg, recording
        state.reset()
    best = max(scores, key=lambda k: scores[k][0])
    return scores[best][1], {k: (v[1], round(v[0], 2)) for k, v in scores.items()}


#: the multipliers :func:`refine_calibration` tries on each gain coordinate, one tuple per pass: coarse passes (the
#: first tuple, at most three times, until a pass changes nothing), then one pass of each finer tuple
REFINE_PASSES = ((0.7, 0.85, 1.2, 1.4),) * 3 + ((0.9, 1.1), (0.95, 1.05))
#: how far :func:`refine_calibration` moves one computed step, and at most how many passes over the steps it makes
REFINE_MOVES, REFINE_MOVE_PASSES = (-2, -1, 1, 2), 3
#: at most how many passes the wide step search of ``TaylorCache.refine_reach`` > 2 makes
REFINE_WIDE_PASSES = 4


def _gain_targets(state: CacheState, feats: dict) -> dict[str, torch.Tensor]:
    """What the gains are fitted to, per ``forecast``: the cached chain's residual (the rest's, after a front group)
    or its output."""
    rest = feats["full"] - feats["front"] if state.front else feats["full"]
    return {"residual": rest, "output": feats["out"]}


def refine_calibration(state: CacheState, run, reference, config: TaylorCache, *, progress: bool = True):
    """Closed-loop refinement of a measured budget calibration (``TaylorCache.refine``), every change kept only where
    the measured score rises (``run()`` against the uncached ``reference``, mean + worst item PSNR, as
    :func:`measure_schedules`), so the result measures at least as close to uncached as ``config`` on the
    calibration's items:

    1. gains: one multiplier pair ``(of mu, of lam)`` of the fitted ``step_gain`` (1, 1 uncorrected) per segment (the
       forecast steps after one computed step), by coordinate search over :data:`REFINE_PASSES`. A coordinate is not
       searched where it has no effect: ``lam`` at order 0 and after the first computed step (the forecast is reuse
       there), and a gain the fit clamped to 0;
    2. steps (without a front group): each computed step but step 0 moved by :data:`REFINE_MOVES` (the gains refitted
       for the new schedule, times the segments' multipliers), the best move per step, up to
       :data:`REFINE_MOVE_PASSES` passes; the count of computed steps, so the budget, stays;
    3. if a step moved, the gains again as in 1, from the new schedule's.

    With ``refine_reach`` > 2 (no front group) a wide step search comes first: as 2, each computed step moved by
    up to ``refine_reach`` steps either way with the fitted gains (no multipliers yet), up to
    :data:`REFINE_WIDE_PASSES` passes; 1-3 then start from its schedule.

    Every step keeps a change where ``refine_objective`` rises: mean + worst item PSNR as the measured calibration
    (``"mean+worst"``), or the mean alone (``"mean"``).

    The fitted gains and the planned schedule model one step's forecast; the measurement sees how a segment's errors
    compound through the sampler. Returns ``(the refined config, its score, the start's score, runs)``."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    t, feats = _calibration_set(state)
    n = len(t)
    target = _gain_targets(state, feats)[config.forecast or "residual"]

    def fitted(sched):
        if config.step_gain is None:
            return ((1.0, 1.0),) * n
        return config.step_gain if sched == config.schedule else fit_gains(t, target, sched, config.order)

    def segments(sched):
        return [range(a + 1, b) for a, b in zip(sched, (*sched[1:], n))]

    def build(sched, mult):
        base, gains = fitted(sched), list(fitted(sched))
        for seg, (a, b) in zip(segments(sched), mult):
            for k in seg:
                gains[k] = (base[k][0] * a, base[k][1] * b)
        return replace(config, schedule=sched, step_gain=tuple(gains))

    runs = 0

    def score(sched, mult):
        nonlocal runs
        state.config = build(sched, mult)
        state.reset()
        runs += 1
        bar.update(1)
        return _score(run(), reference, worst=REFINE_OBJECTIVES[config.refine_objective])

    def search_gains(sched, mult, best):
        base = fitted(sched)
        coords = [(i, c) for i, seg in enumerate(segments(sched)) for c in (0, 1)
                  if any(base[k][c] for k in seg) and (c == 0 or (config.order and i))]  # fmt: skip
        bar.total += len(coords) * sum(len(p) for p in REFINE_PASSES)
        changed = True
        for steps in REFINE_PASSES:
            if steps == REFINE_PASSES[0] and not changed:
                bar.update(len(coords) * len(steps))  # a pass that changed nothing would measure the same again
                continue
            changed = False
            for i, c in coords:
                tried = []
                for d in steps:
                    m = [list(v) for v in mult]
                    m[i][c] *= d
                    tried.append((score(sched, m), m))
                top, m = max(tried, key=lambda v: v[0])
                if top > best:
                    best, mult, changed = top, m, True
        return mult, best

    def search_steps(sched, mult, best, moves=REFINE_MOVES, passes=REFINE_MOVE_PASSES):
        for _ in range(passes):
            changed = False
            for idx in range(1, len(sched)):
                moved = []
                for d in moves:
                    s = list(sched)
                    s[idx] += d
                    if s[idx - 1] < s[idx] < (s[idx + 1] if idx + 1 < len(s) else n):
                        moved.append(tuple(s))
                bar.total += len(moved)
                tried = [(score(s, mult), s) for s in moved]
                if tried and max(tried)[0] > best:
                    best, sched = max(tried)
                    changed = True
            if not changed:
                break
        return sched, best

    sched = config.schedule
    if len(sched) == n:  # every step computed: nothing to refine
        return config, None, None, 0
    mult = [[1.0, 1.0] for _ in sched]
    recording, state.recording = state.recording, False
    bar = tqdm(total=1, desc="refine calibration", unit="run", disable=not progress, leave=False)
    try:
        start = best = score(sched, mult)
        if config.refine_reach > 2:  # (TaylorCache refuses it with a front group)
            wide = tuple(d for r in range(1, config.refine_reach + 1) for d in (-r, r))
            sched, best = search_steps(sched, mult, best, wide, REFINE_WIDE_PASSES)
        mult, best = search_gains(sched, mult, best)
        if not state.front:
            moved, best = search_steps(sched, mult, best)
            if moved != sched:
                sched = moved
                mult, best = search_gains(sched, mult, best)
    finally:
        bar.close()
        state.config, state.recording = config, recording
        state.reset()
    return build(sched, mult), best, start, runs


def refine_starts(best: TaylorCache, scores: dict, k: int) -> list[TaylorCache]:
    """The ``k`` configs :func:`refine_calibration` starts from: the measured best, then the next best with another
    schedule (``scores``: :func:`measure_schedules`' ``{name: (config, score)}``; of one schedule only its best
    variant, with or without gains or output forecast)."""
    starts, seen = [best], {(best.schedule, best.front_schedule)}
    for cfg, _ in sorted(scores.values(), key=lambda v: v[1], reverse=True):
        if len(starts) >= k:
            break
        if (cfg.schedule, cfg.front_schedule) not in seen:
            seen.add((cfg.schedule, cfg.front_schedule))
            starts.append(cfg)
    return starts


def budget_steps(state: CacheState, n_steps: int) -> int:
    """How many of ``n_steps`` steps run in full for the config's budget (the blocks outside the cached chain run on
    every call and come out of the budget first); warns when the budget is below what the model can reach."""
    cfg, n, a = state.config, state.n_blocks, state.n_always
    n_compute = round(n_steps * (cfg.budget * (n + a) - a) / n)
    if n_compute < 1:
        warnings.warn(
            f"TaylorCache.budget={cfg.budget:g} is below what this model can reach at {n_steps} steps "
            f"({(a + n / n_steps) / (n + a):.3f}: step 0 and the {a} block(s) outside the cached chain always "
            "run): computing step 0 only",
            stacklevel=4,
        )
    return max(1, min(n_steps, n_compute))


def solve_budget(state: CacheState, run=None, reference=None):
    """The calibrated config for the budget: with a ``run`` and its uncached ``reference`` result, the candidate
    schedule that measures best (:func:`measure_schedules`); without (the self-calibration on the first generation),
    the evenly spaced end-anchored schedule, which measured best on the deep reference pipelines (docs/cache.md)."""
    cfg = state.config
    t, _ = _calibration_set(state)
    n_compute = budget_steps(state, len(t))
    if run is not None:
        best, scores = measure_schedules(state, run, reference, n_compute)
        if not cfg.refine:
            return best
        refined = [refine_calibration(state, run, reference, start)[:2] for start in
                   refine_starts(best, scores, cfg.refine_starts)]  # fmt: skip
        # the first (the measured best's) on a tie; None: every step computed, nothing was refined
        return max(refined, key=lambda r: -math.inf if r[1] is None else r[1])[0]
    if cfg.refine:
        warnings.warn("TaylorCache.refine needs a measured calibration (ditkern.cache.calibrate(pipe, run) with run() "
                      "returning the images as a tensor or array): the gains were not refined", stacklevel=4)  # fmt: skip
    return replace(cfg, schedule=spaced_schedule(len(t), n_compute), timesteps=tuple(float(v) for v in t))


def _newton(ts: list[float], vs: list[torch.Tensor], t: float) -> torch.Tensor:
    """Newton forecast at ``t`` through the points (ts, vs) (1 to 3 of them, oldest first)."""
    d = list(vs)
    coef = [d[-1]]
    for k in range(1, len(vs)):  # divided differences, the newest point last
        d = [(d[i + 1] - d[i]) / (ts[i + k] - ts[i]) for i in range(len(d) - 1)]
        coef.append(d[-1])
    out, basis = coef[0].clone(), 1.0
    for k in range(1, len(coef)):
        basis = basis * (t - ts[-k])
        out = out + coef[k] * basis
    return out


def solve_gate(state: CacheState):
    """The calibrated gate: per step the factor from the first block's relative forecast error to the rest of the
    stack's (median over items, forecasts from the previous consecutive steps at the config's order), so that
    ``gate`` reads as the predicted relative error of what is skipped. Warns when the gate is below what the model
    reaches at its best (one step after a full one)."""
    cfg = state.config
    t, feats = _calibration_set(state)
    if "probe" not in feats:
        raise ValueError("calibrate: the first block's residual was not recorded (no stream passes through it)")
    tl = [float(v) for v in t]
    scales, best = [], math.inf
    for k in range(len(tl)):
        if k == 0:
            scales.append(math.nan)
            continue
        lo = max(0, k - 1 - cfg.order)
        rel = {}
        for key in ("probe", "rest"):
            x = feats[key]
            fc = _newton(tl[lo:k], [x[i] for i in range(lo, k)], tl[k])
            rel[key] = (x[k] - fc).norm(dim=-1) / x[k].norm(dim=-1).clamp_min(1e-30)
        ratio = rel["rest"] / rel["probe"].clamp_min(1e-30)
        scales.append(float(ratio.median()))
        if k >= cfg.warmup:
            best = min(best, float(rel["rest"].min()))
    finite = sorted(v for v in scales if math.isfinite(v))
    fill = finite[len(finite) // 2] if finite else 1.0
    scales = [v if math.isfinite(v) else fill for v in scales]
    if cfg.gate < best:
        warnings.warn(
            f"TaylorCache.gate={cfg.gate:g} is below the lowest forecast error this model reaches ({best:.4g}, one "
            "step after a full one): it will never forecast",
            stacklevel=3,
        )
    return replace(cfg, gate_scale=tuple(scales), timesteps=tuple(tl))


# ----------------------------------------------------------------------------------------------------------------------
# the feature: rules for the model and its blocks
# ----------------------------------------------------------------------------------------------------------------------
def _stack_reason(stack: Stack | str, blocks: list[nn.Module] | str) -> str | None:
    """Why the cache cannot run on this stack's chain (None: it can)."""
    if isinstance(stack, str):
        return stack
    if stack.cache:
        return stack.cache
    if isinstance(blocks, str):
        return blocks
    unknown = sorted({type(b).__name__ for b in blocks} - set(stack.blocks))
    if unknown:
        return f"blocks of unknown kind {unknown}"
    if len(blocks) < 2:
        return "fewer than two blocks"
    first, last = stack.blocks[type(blocks[0]).__name__], stack.blocks[type(blocks[-1]).__name__]
    missing = [s for s in stack.reads_after if s not in first.takes or s not in last.returns]
    if missing:
        return f"stream(s) {missing} read after the stack do not enter the first block and leave the last one"
    return None


def _backend(model: nn.Module, state: CacheState, config) -> str:
    """The backend taylor_update / taylor_forecast run on for this model (its device and dtype, the state dtype)."""
    device, dtype = device_dtype(model)
    x = torch.empty(1, 4096, device=device, dtype=dtype)
    d0 = torch.empty(1, 4096, device=device, dtype=state.state_dtype(device))
    return choose("taylor_update", TAYLOR_BACKENDS, d0, x, x, backend=config.backend)


def _rules(family, model: nn.Module, config):
    cache = config.cache
    if cache is None:
        return None
    if not isinstance(cache, TaylorCache):
        raise TypeError(f"cache must be a ditkern.TaylorCache, got {type(cache).__name__}")
    model_cls = type(model).__name__
    stack = family.stack
    blocks = [] if not isinstance(stack, Stack) else stack.chain(model) if not stack.cache else []
    if not isinstance(blocks, str):
        blocks = [b for _, b in blocks]
    why = _stack_reason(stack, blocks)
    if not why and cache.front and not 2 <= cache.front <= len(blocks) - 2:
        raise ValueError(f"TaylorCache.front={cache.front} needs 2 <= front <= {len(blocks) - 2} on {model_cls} (its "
                         f"cached chain has {len(blocks)} blocks)")  # fmt: skip
    attentions: dict[int, int] = {}  # level="attention": id(attention module) -> its index along the chain
    attention_classes: set[str] = set()
    if not why and cache.level == "attention":
        layout = family.attention
        if isinstance(layout, str):
            why = f"level='attention' needs the family's self-attention modules: {layout}"
        else:
            for b in blocks:
                names = layout.self_attention.get(type(b).__name__, ())
                for m in (getattr(b, n, None) for n in names):
                    if isinstance(m, nn.Module):
                        attentions.setdefault(id(m), len(attentions))
                        attention_classes.add(type(m).__name__)
            if not attentions:
                why = "level='attention': no self-attention module declared for the chain's blocks"
    if why:
        return {model_cls: lambda m, cfg: f"Taylor cache not applied: {why}"}
    n_stack = len(stack.modules(model))
    state = CacheState(cache, model, len(blocks), stack, config.backend, n_always=n_stack - len(blocks))
    of = "" if len(blocks) == n_stack else f" (of {n_stack}; the others always run)"
    backend = _backend(model, state, config)
    index = {id(b): i for i, b in enumerate(blocks)}

    def model_rule(m, cfg):
        if m is not model:
            return None

        def forward(module, inner, *args, **kwargs):
            if torch.is_grad_enabled() and (
                any(isinstance(t, torch.Tensor) and t.requires_grad for t in (*args, *kwargs.values()))
                or any(p.requires_grad for p in module.parameters())
            ):  # inference-only: under grad no forecast, every block runs exactly and the state is left untouched
                return inner(*args, **kwargs)
            if state.bypass(args, kwargs):  # residuals added between the chain's blocks: run it all, state untouched
                return inner(*args, **kwargs)
            state.begin(args, kwargs)
            try:
                return inner(*args, **kwargs)
            finally:
                state.end()

        def apply(module):
            module.__dict__[STATE_ATTR] = state

        def undo(module):
            module.__dict__.pop(STATE_ATTR, None)

        per = f"per cached attention's output ({len(attentions)})" if attentions else "per cached stream"
        detail = f"state {'fp32/bf16' if cache.state_dtype is None else str(cache.state_dtype).replace('torch.', '')}: " \
                 f"{cache.order + 1} x [B, S, D] {per}{' + first-block probe' if cache.mode == 'gated' else ''}, " \
                 "allocated at the first call (ditkern.cache.stats(model) gives bytes); inference-only: under grad " \
                 "it steps aside and every block runs (exact)"  # fmt: skip
        what = f"{len(attentions)} self-attentions of {len(blocks)} blocks" if attentions else f"{len(blocks)} blocks"
        return Plan("cache", f"Taylor cache over {what}{of} ({cache.describe()})", forward,
                    apply=apply, undo=undo, detail=detail, wraps=True, backend=backend)  # fmt: skip

    def block_rule(b, cfg):
        i = index.get(id(b))
        if i is None:
            return None  # a block class outside the stack (not executed by the stack loop)
        sig = stack.blocks[type(b).__name__]
        if i == 0:
            fwd = lambda module, inner, *a, **k: state.first_block(sig, inner, a, k)  # noqa: E731
            role = "first block (probe)" if cache.mode == "gated" else "first block"
        elif i == len(blocks) - 1:
            fwd = lambda module, inner, *a, **k: state.last_block(sig, inner, a, k)  # noqa: E731
            role = "last block (forecast)"
        elif i == cache.front - 1:
            fwd = lambda module, inner, *a, **k: state.front_last_block(sig, inner, a, k)  # noqa: E731
            role = "front group's last block (forecast)"
        elif i == cache.front and i:
            fwd = lambda module, inner, *a, **k: state.back_first_block(sig, inner, a, k)  # noqa: E731
            role = "first block after the front group"
        else:
            fwd = lambda module, inner, *a, **k: state.middle_block(sig, inner, a, k, i)  # noqa: E731
            role = "skippable block"
        return Plan("cache", f"Taylor cache: {role}", fwd, wraps=True, backend=backend)

    def attention_rule(m, cfg):
        i = attentions.get(id(m))
        if i is None:
            return None  # an attention outside the chain's blocks (or not a self-attention): not cached
        fwd = lambda module, inner, *a, **k: state.attention(i, inner, a, k)  # noqa: E731
        return Plan("cache", "Taylor cache: self-attention (forecast on skipped steps)", fwd, wraps=True, backend=backend)

    rules = {model_cls: model_rule}
    if attentions:  # level="attention": the blocks run as written, their attentions are wrapped
        return rules | dict.fromkeys(attention_classes, attention_rule)
    for cls in {type(b).__name__ for b in blocks}:
        rules[cls] = block_rule
    return rules


register_feature(Feature("cache", _rules))
