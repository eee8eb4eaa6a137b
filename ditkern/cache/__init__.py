"""Cached-block Taylor extrapolation: ``ditkern.patch(model, cache=ditkern.TaylorCache(...))``.

Two schedules share one engine (ditkern/cache/feature.py):

* fixed (TaylorSeer, arXiv 2503.06923, applied at block-stack level): every ``interval``-th step runs the whole
  block stack and refreshes the Taylor state of the stack's residual (output - input); the steps between skip every
  block and add the forecast residual to the stack's input.
* gated (confidence-gated Taylor, "Forecasting When to Forecast", arXiv 2508.02240): every step runs the first block
  and compares its residual with the Taylor forecast of it; if the relative error is below ``gate`` the rest of the
  stack is skipped and the forecast of its residual is added, otherwise everything runs and both states refresh.
  ``order=0`` forecasts by reuse: that is the FirstBlockCache rule.

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

from ditkern.cache.config import TaylorCache

__all__ = ["TaylorCache", "reset", "stats"]


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
    of block executions, and the bytes of Taylor state held now."""
    return _state(model_or_pipeline).stats()


def reset_stats(model_or_pipeline) -> None:
    _state(model_or_pipeline).reset_stats()
