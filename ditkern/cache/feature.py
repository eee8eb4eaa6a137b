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
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ditkern._backend import choose
from ditkern.cache.config import TaylorCache
from ditkern.cache.distributed import gate_all_reduce
from ditkern.ops.taylor import BACKENDS as TAYLOR_BACKENDS
from ditkern.ops.taylor import taylor_forecast, taylor_update
from ditkern.patch.engine import Feature, Plan, device_dtype, register_feature
from ditkern.patch.family import Stack, Streams

STATE_ATTR = "_ditkern_cache_state"


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
    probe: dict[str, _Taylor] = field(default_factory=dict)  # first block's residual, per stream
    rest: dict[str, _Taylor] = field(default_factory=dict)  # stack residual after the anchor, per stream

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
        return sum(f.nbytes() for f in (*self.probe.values(), *self.rest.values()))


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


class CacheState:
    def __init__(self, config: TaylorCache, model: nn.Module, n_blocks: int, stack: Stack, backend, n_always: int = 0):
        self.config = config
        self.model = weakref.ref(model)  # the gate's sums are reduced over its context-parallel group
        self.n_blocks = n_blocks
        self.n_always = n_always  # blocks of the stack outside the cached chain: they run on every call
        self.out_streams = tuple(stack.reads_after)
        self.latents, self.timestep, self.rises = stack.latents, stack.timestep, stack.timestep_rises
        self.uncached_if = tuple(stack.uncached_if)
        self.backend = backend
        self.forward_sig = inspect.signature(type(model).forward)
        self.slots: dict[int, _Slot] = {}
        self.call: _Call | None = None
        self.last_t: tuple | None = None
        self.slot_index = 0
        self.reset_stats()

    # ---- bookkeeping ----
    def reset(self) -> None:
        self.slots.clear()
        self.last_t = None
        self.slot_index = 0
        self.generations += 1

    def reset_stats(self) -> None:
        self.calls = self.forecast_calls = self.blocks_run = self.blocks_total = 0
        self.generations = 0
        self.peak_bytes = 0

    def stats(self) -> dict:
        return {
            "calls": self.calls,
            "forecast_calls": self.forecast_calls,
            "blocks_run": self.blocks_run,
            "blocks_total": self.blocks_total,
            "block_fraction": self.blocks_run / self.blocks_total if self.blocks_total else 1.0,
            "state_bytes": sum(s.nbytes() for s in self.slots.values()),
            "peak_state_bytes": self.peak_bytes,
            "generations": self.generations,
        }

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
            if self.last_t is not None and (
                min(key) < min(self.last_t) if self.rises else max(key) > max(self.last_t)
            ):
                self.reset()
            self.slot_index = 0
        self.last_t = key
        slot = self.slots.get(self.slot_index)
        if slot is None or slot.batch != batch:
            slot = self.slots[self.slot_index] = _Slot.new(batch)
        if slot.t_first is None:
            slot.t_first = float(t.min() if self.rises else t.max())
        self.call = _Call(slot=slot, t=t)
        self.calls += 1
        self.blocks_total += self.n_blocks + self.n_always
        self.blocks_run += self.n_always

    def end(self) -> None:
        if self.call is not None:
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
        if not bool(self._eligible(call).all()):
            return True
        return (slot.step - max(cfg.warmup, 1)) % cfg.interval == 0

    # ---- Taylor helpers ----
    def _forecast(self, feats: dict[str, _Taylor], idx: str, base, call: _Call):
        f = feats[idx]
        a1, a2 = call.slot.forecast_coeffs(call.t, f.d[0].device)
        out_dtype = base.dtype if base is not None else torch.float32
        return taylor_forecast(*f.d, a1, a2, base=base, order=self.config.order, out_dtype=out_dtype, backend=self.backend)

    def _update(self, feats: dict[str, _Taylor], idx: str, x, base, mask: torch.Tensor, call: _Call):
        f = feats.setdefault(idx, _Taylor())
        f.ensure(x, self.config.order, self.state_dtype(x.device))
        c1, c2 = call.slot.update_coeffs(call.t, x.device)
        taylor_update(x, *f.d, c1, c2, mask.to(device=x.device, dtype=torch.int32), base=base,
                      order=self.config.order, backend=self.backend)  # fmt: skip

    def _commit(self, call: _Call, updated: torch.Tensor) -> None:
        slot = call.slot
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
        if self.config.mode == "fixed":
            if not self.fixed_is_full(call):
                call.skip_all = True
                self.forecast_calls += 1
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
            rel = (err2 / ref2.clamp_min(1e-30)).sqrt()
            if compared:
                accept = eligible & (rel < self.config.gate)
                if self.config.sync_batch:  # one decision for the whole call
                    accept = accept.all().expand_as(accept).clone()
        call.accept = accept
        if bool(accept.all()):
            call.skip_rest = True
            self.forecast_calls += 1
        return out

    def middle_block(self, sig: Streams, inner, args, kwargs):
        call = self.call
        if call is not None and (call.skip_all or call.skip_rest):
            return sig.join(sig.read(args, kwargs))
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
            for s in self.out_streams:
                if s in slot.rest:
                    outs[s] = self._forecast(slot.rest, s, streams_in[s], call)
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
            if mixed and s in slot.rest:  # items that accepted the forecast get it, exactly as if run alone
                fc = self._forecast(slot.rest, s, call.anchor[s], call)
                sel = accept.to(computed[s].device).view(-1, *([1] * (computed[s].dim() - 1)))
                outs[s] = torch.where(sel, fc, computed[s])
            self._update(slot.rest, s, computed[s], call.anchor[s], update, call)
        if self.config.mode == "gated":
            for s, xo in call.anchor.items():
                xi = call.first_in.get(s)
                if xo is not None and xi is not None and xo.shape == xi.shape:
                    self._update(slot.probe, s, xo, xi, update, call)
        self._commit(call, update)
        return sig.join(outs) if mixed else out


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

        detail = f"state {'fp32/bf16' if cache.state_dtype is None else str(cache.state_dtype).replace('torch.', '')}: " \
                 f"{cache.order + 1} x [B, S, D] per cached stream{' + first-block probe' if cache.mode == 'gated' else ''}, " \
                 "allocated at the first call (ditkern.cache.stats(model) gives bytes); inference-only: under grad " \
                 "it steps aside and every block runs (exact)"  # fmt: skip
        return Plan("cache", f"Taylor cache over {len(blocks)} blocks{of} ({cache.describe()})", forward,
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
        else:
            fwd = lambda module, inner, *a, **k: state.middle_block(sig, inner, a, k)  # noqa: E731
            role = "skippable block"
        return Plan("cache", f"Taylor cache: {role}", fwd, wraps=True, backend=backend)

    rules = {model_cls: model_rule}
    for cls in {type(b).__name__ for b in blocks}:
        rules[cls] = block_rule
    return rules


register_feature(Feature("cache", _rules))
