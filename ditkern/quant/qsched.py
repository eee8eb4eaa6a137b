"""Q-Sched: quantization-aware scheduling, per-step scalar pre-conditioning of the sampler for a quantized model.

What is taken from the paper (N. Frumkin, D. Marculescu, "Q-Sched: Pushing the Boundaries of Few-Step Diffusion
Models with Quantization-Aware Scheduling", arXiv:2509.01624, 2025; the formulation as read in its text and its
public release github.com/enyac-group/q-sched, no code copied):

* The weights stay as quantized; the scheduler update changes. At step ``i`` the sampler's update receives
  ``c_x[i] * x_t`` in place of the latent ``x_t`` and ``c_eps[i] * eps_theta(x_t, t)`` in place of the (quantized)
  model's prediction, then does what it always does; for flow matching (Euler) that is
  ``x_next = c_x[i] * x_t + (sigma_next - sigma) * c_eps[i] * v_theta``. Identity coefficients (all 1) are the
  unmodified sampler. The model is called on the unscaled ``x_t``; only the update sees the scaled one.
* The paper searches coefficients that ramp linearly over the steps to 1 at the last step,
  ``c[i] = c0 + (1 - c0) * i / (n - 1)``, with one start value ``c0`` for each of ``c_x`` and ``c_eps`` on a grid in
  [0.8, 1.1]; that 2-D grid is the first stage here (:func:`ramp`).
* The objective is reference-free (no full-precision model at calibration time) and has the form of the paper's
  Joint Alignment-Quality (JAQ) score, ``log(alignment) + k * quality`` maximised over the calibration prompts (the
  paper: CLIP score of image and prompt, CLIP-IQA as quality, ``k = 2`` by default).

What is ours (the reference pipelines have no text prompts and no CLIP):

* alignment: the digit classifier's (:mod:`ditkern.zoo.classifier`) confidence in the requested class, the mean over
  images of ``log softmax(d)[class]`` of its one-vs-rest decision values ``d``;
* quality: a no-reference realism score, minus the mean pixel distance (RMS over the 32x32 image) of each generated
  image to its nearest real digit of the classes' training images (the scikit-learn digits the pipelines were trained
  on, :func:`ditkern.zoo.data.digits`): the k-NN "realism" idea of Kynkaenniemi et al. 2019 (arXiv:1904.06991), no
  model involved; and
* a second stage after the paper's ramp grid: coordinate search over the per-step coefficients of every step but
  the last (each moved by +-delta, kept if the objective improves, delta halved after a sweep without improvement),
  within ``max_evals`` generations. The last step's pair stays at 1, where the paper's ramps end (there ``c_x``
  scales the output image itself);
* in both stages a candidate replaces the best so far only if it wins by more than ``significance`` (2) standard
  errors of the per-image score differences (paired: the same seeds). The objective of a dozen images is noisy:
  with a plain comparison, runs on digits-dit (int4 GPTQ, 4 steps, 12-20 calibration images) picked coefficients
  that raised the objective on the calibration seeds, lowered it on the measured seeds, and cost 7.4-7.7 dB PSNR.

Why gradient-free: the objective's alignment term is a scikit-learn SVM (no autograd), and one evaluation is one
batch of few-step samples from a few-MB pipeline on the CPU (seconds), so a few dozen evaluations cost less than
making the pipeline differentiable end to end. The search is deterministic: the calibration seeds are fixed
(common random numbers), so two coefficient settings are compared on the same initial noise.

    from ditkern.quant.qsched import calibrate
    sched = calibrate(pipe, classes=range(10), steps=4)       # pipe: a ditkern-quantized zoo pipeline
    pipe.scheduler = sched                                     # every call at 4 steps now uses the coefficients
    sched.save("qsched.json"); sched = load("qsched.json", pipe.scheduler.base)
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

FORMAT = "ditkern-qsched-1"

#: Scheduler classes (exact names) whose ``step(model_output, timestep, sample)`` is called once per timestep
#: (``order == 1``), so that coefficient ``i`` belongs to the ``i``-th call after ``set_timesteps``; checked by the
#: identity test for each.
SUPPORTED = ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler",
             "EulerDiscreteScheduler")

#: The paper's weight of the quality term (its code's default ``k``).
QUALITY_WEIGHT = 2.0

_OWN = ("base", "c_x", "c_eps", "meta", "_calls", "set_timesteps")


def ramp(c0: float, n: int) -> list[float]:
    """The paper's linear ramp: ``n`` coefficients from ``c0`` at the first step to 1 at the last."""
    if n == 1:
        return [1.0]
    return [c0 + (1.0 - c0) * i / (n - 1) for i in range(n)]


class QSchedScheduler:
    """A diffusers scheduler with per-step scalar pre-conditioning: ``step(eps, t, x)`` runs
    ``base.step(c_eps[i] * eps, t, c_x[i] * x)`` at the ``i``-th step after ``set_timesteps``.

    Everything else (``timesteps``, ``sigmas``, ``order``, ``init_noise_sigma``, ``config``, ``scale_model_input``,
    ``set_begin_index``, ...) is the wrapped scheduler's, read and written through. ``set_timesteps`` keeps the wrapped
    method's signature (diffusers' ``retrieve_timesteps`` inspects it for ``sigmas=`` / ``timesteps=``) and raises if
    the schedule it makes does not have the calibrated number of steps. A coefficient of exactly 1 leaves the tensor
    untouched, so all-ones coefficients reproduce the wrapped scheduler bit for bit.
    """

    def __init__(self, base, c_x: Sequence[float], c_eps: Sequence[float], meta: dict | None = None):
        _check_scheduler(base)
        c_x, c_eps = [float(v) for v in c_x], [float(v) for v in c_eps]
        if len(c_x) != len(c_eps) or not c_x:
            raise ValueError(f"c_x and c_eps need one coefficient per step each, got {len(c_x)} and {len(c_eps)}")
        bad = [v for v in c_x + c_eps if not math.isfinite(v)]
        if bad:
            raise ValueError(f"coefficients must be finite, got {bad}")
        d = object.__getattribute__(self, "__dict__")
        d.update(base=base, c_x=c_x, c_eps=c_eps, meta=dict(meta or {}), _calls=0)

        @functools.wraps(base.set_timesteps)  # inspect.signature follows __wrapped__: sigmas=/timesteps= are seen
        def set_timesteps(*args, **kwargs):
            out = base.set_timesteps(*args, **kwargs)
            n = self._schedule_len()
            if n != self.num_steps:
                raise ValueError(f"Q-Sched coefficients were calibrated for num_inference_steps={self.num_steps}, "
                                 f"but the scheduler was set to {n} steps; calibrate for {n} steps (or load a "
                                 f"file calibrated for it)")  # fmt: skip
            d["_calls"] = 0
            return out

        d["set_timesteps"] = set_timesteps

    # ------------------------------------------------------------------------------------------ delegation
    def __getattr__(self, name):  # only called for names not found on the wrapper itself
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __setattr__(self, name, value):
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.base, name, value)

    def __repr__(self) -> str:
        fmt = lambda c: "[" + ", ".join(f"{v:.4f}" for v in c) + "]"  # noqa: E731
        return (f"QSchedScheduler({type(self.base).__name__}, steps={self.num_steps}, c_x={fmt(self.c_x)}, "
                f"c_eps={fmt(self.c_eps)})")  # fmt: skip

    @property
    def num_steps(self) -> int:
        return len(self.c_x)

    def _schedule_len(self) -> int:
        n = getattr(self.base, "num_inference_steps", None)
        return int(n) if n is not None else len(self.base.timesteps)

    # ------------------------------------------------------------------------------------------ the update
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, **kwargs):
        i = self._calls
        if i >= self.num_steps:
            raise RuntimeError(f"step() called {i + 1} times since set_timesteps, but the Q-Sched coefficients cover "
                               f"{self.num_steps} steps; call set_timesteps before each sampling run")  # fmt: skip
        cx, ce = self.c_x[i], self.c_eps[i]
        if ce != 1.0:
            model_output = model_output * ce
        if cx != 1.0:
            sample = sample * cx
        out = self.base.step(model_output, timestep, sample, *args, **kwargs)
        object.__getattribute__(self, "__dict__")["_calls"] = i + 1
        return out

    # ------------------------------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return dict(format=FORMAT, scheduler_class=type(self.base).__name__, num_inference_steps=self.num_steps,
                    c_x=self.c_x, c_eps=self.c_eps, meta=self.meta)  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write the coefficients (and how they were found) as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def load(path: str | Path, scheduler) -> QSchedScheduler:
    """The coefficients saved at ``path`` around ``scheduler`` (the same class as at calibration; a
    :class:`QSchedScheduler` is unwrapped first)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Q-Sched file at {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a Q-Sched JSON file: {exc}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: format {got!r}, expected {FORMAT!r}")
    base = scheduler.base if isinstance(scheduler, QSchedScheduler) else scheduler
    if type(base).__name__ != d["scheduler_class"]:
        raise TypeError(f"{path} was calibrated for a {d['scheduler_class']}, not a {type(base).__name__}")
    return QSchedScheduler(base, d["c_x"], d["c_eps"], d.get("meta"))


def _check_scheduler(base) -> None:
    if isinstance(base, QSchedScheduler):
        raise TypeError("scheduler is already a QSchedScheduler; wrap its .base")
    name = type(base).__name__
    if name not in SUPPORTED:
        raise TypeError(f"scheduler type {name} is not supported by Q-Sched (supported: {', '.join(SUPPORTED)}): "
                        "its step() must be called once per timestep with (model_output, timestep, sample)")
    if getattr(base, "order", 1) != 1:
        raise TypeError(f"scheduler {name} has order {base.order}; Q-Sched needs one step() call per timestep")


# ---------------------------------------------------------------------------------------------------- objective


@functools.lru_cache(maxsize=1)
def _real_digits():
    from ditkern.zoo import data

    x, y = data.digits()
    return ((x.flatten(1) + 1) / 2).double(), y  # [N, 1024] in [0, 1], as the pipelines output them


def alignment(images: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Per image: log of the classifier's softmax confidence (over its one-vs-rest decision values) in its class."""
    from ditkern.zoo import classifier, data

    clf = classifier._fit()[0]
    d = torch.from_numpy(clf.decision_function(data.to_8x8(images).numpy())).double()
    idx = torch.as_tensor(list(classes), dtype=torch.long)
    return torch.log_softmax(d, dim=1).gather(1, idx[:, None])[:, 0]


def quality(images: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Per image: minus the RMS pixel distance to the nearest real training digit of its class (higher is better)."""
    real, labels = _real_digits()
    x = images.detach().double().flatten(1).cpu()
    out = torch.empty(len(x), dtype=torch.float64)
    for c in set(int(c) for c in classes):
        sel = torch.as_tensor([int(k) == c for k in classes])
        dist = torch.cdist(x[sel], real[labels == c])  # [n_c, N_c] L2 over 1024 pixels
        out[sel] = -dist.min(1).values / math.sqrt(x.shape[1])
    return out


def jaq_per_image(images: torch.Tensor, classes: Sequence[int], k: float = QUALITY_WEIGHT) -> torch.Tensor:
    """Per image: ``log alignment + k * quality`` (the terms of :func:`jaq`)."""
    classes = list(classes)
    return alignment(images, classes) + k * quality(images, classes)


def jaq(images: torch.Tensor, classes: Sequence[int], k: float = QUALITY_WEIGHT) -> float:
    """The paper's JAQ form, ``mean log(alignment) + k * mean quality``, with this module's two terms (higher is
    better). Reference-free: only the generated images, their classes, the classifier and the real digits."""
    return float(jaq_per_image(images, classes, k).mean())


# ---------------------------------------------------------------------------------------------------- search


def _default_generate(pipe, classes, seeds, steps):
    from ditkern import zoo

    return zoo.generate(pipe, classes, seeds, num_inference_steps=steps)


def calibrate(pipe, prompts_or_classes: Iterable[int], steps: int, seeds: Sequence[int] | None = None,
              max_evals: int = 30, grid: Sequence[float] = (0.98, 1.0, 1.02), delta: float = 0.01, bound: float = 0.1,
              significance: float = 2.0, k: float = QUALITY_WEIGHT, objective: Callable | None = None,
              generate: Callable | None = None, progress: bool = True) -> QSchedScheduler:
    """Learn per-step ``c_x``, ``c_eps`` for ``pipe`` (already quantized) at ``steps`` inference steps.

    prompts_or_classes: the calibration conditions; for the reference pipelines the digit classes (e.g.
        ``range(10)``), one image per class and seed.
    seeds: the calibration seeds (default ``2000, 2001, ...``, one per condition; keep them disjoint from the seeds
        you measure on).
    max_evals: generations of the calibration set the search may spend (the paper's ramp grid ``len(grid)**2`` of
        them, minus one shared identity point, then coordinate search over the coefficients of every step but the
        last with ``delta``, halved per sweep, every coefficient kept within ``1 +- bound``). The paper's grid spans
        [0.8, 1.1] for its distilled models; the reference pipelines' samples change much faster with the
        coefficients (a ramp from 0.95 already costs several dB), hence the narrow default grid.
    significance: with per-image scores, a candidate replaces the best so far only if the mean of the per-image
        differences exceeds this many standard errors (paired comparison on the same seeds; 0: any improvement).
    objective: ``objective(images, classes)`` to maximise, a float or one score per image (default
        :func:`jaq_per_image` with weight ``k``; the search maximises its mean);
        generate: ``generate(pipe, classes, seeds, steps) -> images`` (default :func:`ditkern.zoo.generate`).
    Returns a :class:`QSchedScheduler` around ``pipe.scheduler`` (not installed: ``pipe.scheduler = result``); its
    ``meta`` records the objective at identity and at the result, the evaluations spent and the seeds.
    """
    from tqdm.auto import tqdm

    classes = [int(c) for c in prompts_or_classes]
    if not classes:
        raise ValueError("prompts_or_classes is empty: calibration needs at least one condition")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if bound <= 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    if max_evals < 1:
        raise ValueError(f"max_evals must be >= 1, got {max_evals}")
    seeds = list(range(2000, 2000 + len(classes))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(classes):
        raise ValueError(f"{len(seeds)} seeds for {len(classes)} conditions; give one seed per condition")
    base = pipe.scheduler.base if isinstance(pipe.scheduler, QSchedScheduler) else pipe.scheduler
    _check_scheduler(base)
    objective_name = "jaq" if objective is None else getattr(objective, "__name__", "custom")
    objective = objective or functools.partial(jaq_per_image, k=k)
    generate = generate or _default_generate
    cache: dict[tuple, float] = {}
    bar = tqdm(total=max_evals, desc=f"Q-Sched calibration ({steps} steps)", disable=not progress, leave=False)

    def score(c_x, c_eps) -> torch.Tensor | None:
        key = tuple(round(v, 6) for v in c_x + c_eps)
        if key in cache:
            return cache[key]
        if len(cache) >= max_evals:
            return None
        pipe.scheduler = QSchedScheduler(base, c_x, c_eps)
        try:
            s = torch.as_tensor(objective(generate(pipe, classes, seeds, steps), classes), dtype=torch.float64)
        finally:
            pipe.scheduler = base
        if s.dim() > 1 or (s.dim() == 1 and len(s) != len(classes)):
            raise ValueError(f"objective must return a float or one score per image ({len(classes)}), "
                             f"got shape {tuple(s.shape)}")  # fmt: skip
        cache[key] = s
        bar.update(1)
        bar.set_postfix(best=f"{best[0].mean().item():.4f}" if best else f"{s.mean().item():.4f}")
        return s

    def better(s, than) -> bool:
        """Higher mean; with per-image scores (paired: the same seeds) by more than ``significance`` standard
        errors of the per-image differences, so that the noise of a few calibration images is not fitted."""
        if s is None:
            return False
        if s.dim() == 0 or len(s) < 2:
            return bool(s.mean() > than.mean())
        diff = s - than
        return bool(diff.mean() > significance * diff.std() / math.sqrt(len(diff)))

    ones = [1.0] * steps
    best = None
    s0 = score(ones, ones)
    best = (s0, ones, ones)
    try:
        for a in grid:  # stage 1: the paper's ramps
            for b in grid:
                cx, ce = ramp(a, steps), ramp(b, steps)
                s = score(cx, ce)
                if better(s, best[0]):
                    best = (s, cx, ce)
        d = delta
        while len(cache) < max_evals and d >= delta / 8:  # stage 2: per-step coordinate search
            improved = False
            for which in [w for w in range(2 * steps) if w % steps != steps - 1]:  # the last step stays at 1
                for sign in (1, -1):
                    cx, ce = list(best[1]), list(best[2])
                    vec, j = (cx, which) if which < steps else (ce, which - steps)
                    vec[j] += sign * d
                    if abs(vec[j] - 1.0) > bound + 1e-12:
                        continue
                    s = score(cx, ce)
                    if s is None:
                        break
                    if better(s, best[0]):
                        best, improved = (s, cx, ce), True
                        break
            if not improved:
                d /= 2
    finally:
        bar.close()
    meta = dict(objective=objective_name, quality_weight=k, objective_identity=s0.mean().item(),
                objective_best=best[0].mean().item(), significance=significance,
                evals=len(cache), seeds=seeds, classes=classes, steps=steps)
    return QSchedScheduler(base, best[1], best[2], meta)

