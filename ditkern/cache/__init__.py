"""Cached-block Taylor extrapolation: ``ditkern.patch(model, cache=ditkern.TaylorCache(...))``.

Four schedules share one engine (ditkern/cache/feature.py; the user's guide is docs/cache.md):

* fixed (TaylorSeer, arXiv 2503.06923, applied at block-stack level): every ``interval``-th step runs the whole
  block stack and refreshes the Taylor state of the stack's residual (output - input); the steps between skip every
  block and add the forecast residual to the stack's input.
* gated (confidence-gated Taylor, "Forecasting When to Forecast", arXiv 2508.02240): every step runs the first block
  and compares its residual with the Taylor forecast of it; if the relative error is below ``gate`` the rest of the
  stack is skipped and the forecast of its residual is added, otherwise everything runs and both states refresh.
  ``order=0`` forecasts by reuse: that is the FirstBlockCache rule. :func:`calibrate` scales the signal per step
  into the predicted relative error of the skipped blocks, so one threshold means the same on every model.
* schedule: the listed steps run the whole stack (``TaylorCache.end_anchored`` counts them back from the last step).
* budget: a fraction of the block executions; :func:`calibrate` (or the first generation) chooses the schedule.

Derivatives are Newton divided differences over the real timesteps the model receives, so non-uniform schedules (FLUX's
shifted sigmas) are handled exactly for polynomial trajectories. State is kept per call slot (the k-th call with the
same timestep within a step: a pipeline that runs the conditional and unconditional passes as two calls gets two
states), per batch item (by default one gate decision per call; with ``sync_batch=False`` each item decides for itself,
a batch runs the blocks if any item needs them and the items that accepted still get the forecast), and per stream; it
is reset when the timestep goes back toward its start (up; down for a family whose Stack declares ``timestep_rises``: a
new generation), by :func:`reset`, and dropped by ``ditkern.unpatch``. The cache skips the chain of blocks the family's
``Stack`` declares (``Stack.cached``: FLUX.2's and Chroma's single-stream blocks, Wan VACE's blocks after the last hint;
the blocks outside it always run) and reads the latents and the timestep from the forward arguments it names
(``Stack.latents``, ``Stack.timestep``). """

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ditkern.cache.config import TaylorCache

__all__ = ["TaylorCache", "calibrate", "reset", "reset_stats", "stats"]


def _state(model_or_pipeline):
    from ditkern.cache.feature import STATE_ATTR  # noqa: PLC0415
    from ditkern.patch.engine import targets  # noqa: PLC0415

    for _, m in targets(model_or_pipeline):
        st = m.__dict__.get(STATE_ATTR)
        if st is not None:
            return st
    raise ValueError("this model has no ditkern cache: patch it with ditkern.patch(model, cache=ditkern.TaylorCache(...))")


def reset(model_or_pipeline) -> None:
    """Drop the Taylor state now (it is also dropped automatically when a new generation starts)."""
    _state(model_or_pipeline).reset()


def stats(model_or_pipeline) -> dict:
    """Counters since the patch (or the last ``reset_stats``): calls, forecast calls, blocks run / total, the fraction
    of block executions (and of attention computations, for ``level="attention"``), the bytes of Taylor state held
    now (and at most), the generations started (the first one counts: 1 after one generation), the lowest gate signal
    compared, and whether the schedule is calibrated."""
    return _state(model_or_pipeline).stats()


def reset_stats(model_or_pipeline) -> None:
    _state(model_or_pipeline).reset_stats()


def calibrate(model_or_pipeline, run: Callable[[], object], *, measure: bool = True) -> TaylorCache:
    """Calibrate the cache patched on this model from the generations ``run()`` makes (a few seeds, the sampler and
    step count to be used): they run uncached while the feature change of every step is recorded. A ``budget`` cache
    gets a schedule of as many full steps as its budget pays for; a ``gate`` cache gets per-step
    scales that make its threshold the predicted relative error of the skipped blocks. When ``run()`` returns its
    result as a tensor or array (the images) and ``measure`` is true, a budget calibration runs each candidate
    schedule once more (about five runs) and keeps the one whose result is closest to the uncached one. The
    calibrated config is installed on the model and returned: ``.save(path)`` it, and later ``ditkern.patch(pipe,
    cache=TaylorCache.load(path))``. ::

        ditkern.patch(pipe, cache=ditkern.TaylorCache(budget=0.25))
        cache = ditkern.cache.calibrate(pipe, lambda: pipe(..., num_inference_steps=28))
        cache.save("cache.json")
    """
    from ditkern.cache.feature import solve_budget, solve_gate  # noqa: PLC0415

    st = _state(model_or_pipeline)
    cfg = st.config
    if cfg.mode not in ("budget", "gated"):
        raise ValueError(f"calibrate needs a TaylorCache with budget= or gate=, this model's runs mode {cfg.mode!r}")
    st.config = replace(cfg, schedule=None, timesteps=None, step_gain=None) if cfg.mode == "budget" else replace(cfg, gate_scale=None, timesteps=None)
    st.reset()
    st.records, st._rec, st.recording, st.manual = [], {}, True, True
    try:
        ref = run()
        st._end_generation()
        if cfg.mode == "budget":
            arr = measure and (isinstance(ref, torch.Tensor) or type(ref).__name__ == "ndarray")
            st.config = solve_budget(st, run, ref) if arr else solve_budget(st)
        else:
            st.config = solve_gate(st)
    except BaseException:
        st.config = cfg
        raise
    finally:
        st.recording, st.manual, st.records = False, False, []
        st.reset()
        st._gen_reset()
    return st.config
