"""Fidelity harness: how far does a patch move a reference pipeline's samples, and how much faster is it?

For one reference pipeline, one sampler setting and a list of seeds, :func:`compare` generates every digit with the
unpatched pipeline and again with the patched one (same seeds, same classes), timing both in the same run, and
reports the wall-time ratio, the PSNR (pooled over all images, and the worst single image) and the max abs error
of the patched samples against the unpatched ones, and the class accuracy of both sample sets as judged by a
classifier trained on real digits (:mod:`ditkern.zoo.classifier`).

    from ditkern.zoo import fidelity
    r = fidelity.compare("digits-flux", seeds=range(20), patch_options={})  # ditkern.patch(pipe) / unpatch(pipe)
    print(r)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from . import classifier

# ------------------------------------------------------------------------------------------------------------ metrics


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of images ``[N, ...]`` with values in [0, peak]; ``inf`` where they are identical."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak**2 / mse)  # 1/0 -> inf


def pooled_psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR in dB of the mean squared error over all images and pixels (``inf`` if identical)."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------------------------------------------------ results


@dataclasses.dataclass
class FidelityResult:
    """One pipeline x setting: timings, patched-vs-unpatched error and class accuracies (see :func:`compare`)."""

    pipeline: str
    setting: str
    num_images: int
    sampler: dict
    seconds_unpatched: float
    seconds_patched: float
    psnr_db: float  # pooled over all images (10 log10 1/MSE of every pixel of every image)
    psnr_worst_db: float  # the worst single image
    max_abs_err: float
    accuracy_unpatched: float
    accuracy_patched: float
    images_unpatched: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    images_patched: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    classes: list | None = dataclasses.field(default=None, repr=False)

    @property
    def speedup(self) -> float:
        """Unpatched wall time / patched wall time (> 1 means the patch is faster)."""
        return self.seconds_unpatched / self.seconds_patched if self.seconds_patched > 0 else math.inf

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}
        d["speedup"] = self.speedup
        return d

    def __str__(self) -> str:
        return str(FidelityTable([self]))


COLUMNS = [
    ("pipeline", "pipeline", "{}"),
    ("setting", "setting", "{}"),
    ("n", "num_images", "{}"),
    ("steps", None, "{}"),
    ("t ref s", "seconds_unpatched", "{:.2f}"),
    ("t patch s", "seconds_patched", "{:.2f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("PSNR dB", "psnr_db", "{:.1f}"),
    ("worst dB", "psnr_worst_db", "{:.1f}"),
    ("max|err|", "max_abs_err", "{:.2e}"),
    ("acc ref", "accuracy_unpatched", "{:.0%}"),
    ("acc patch", "accuracy_patched", "{:.0%}"),
]


@dataclasses.dataclass
class FidelityTable:
    """Several :class:`FidelityResult` rows (one per pipeline x setting), printed as one aligned table."""

    rows: list[FidelityResult] = dataclasses.field(default_factory=list)

    def append(self, row: FidelityResult) -> None:
        self.rows.append(row)

    def to_dict(self) -> list[dict]:
        return [r.to_dict() for r in self.rows]

    def __str__(self) -> str:
        head = [c[0] for c in COLUMNS]
        body = []
        for r in self.rows:
            cells = []
            for _, attr, fmt in COLUMNS:
                v = r.sampler.get("num_inference_steps", "") if attr is None else getattr(r, attr)
                cells.append("inf" if isinstance(v, float) and math.isinf(v) else fmt.format(v))
            body.append(cells)
        widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
        line = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        out = [line(head), "  ".join("-" * w for w in widths)] + [line(b) for b in body]
        return "\n".join(out)


# ------------------------------------------------------------------------------------------------------------ harness


def default_classes(n: int) -> list[int]:
    """Image i shows digit i % 10 (so 10 seeds give one of each)."""
    return [i % 10 for i in range(n)]


def _timed_generate(pipe, classes, seeds, sampler, batch_size, bar, repeats: int = 1):
    """``(images, seconds)``: the fastest of ``repeats`` identical runs (the minimum is the run least disturbed by
    whatever else the machine did; the images are the first run's - every run makes the same ones)."""
    from . import generate

    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    best, images = math.inf, None
    for r in range(repeats):
        chunks = []
        t0 = time.perf_counter()
        for i in range(0, len(seeds), batch_size):
            chunks.append(generate(pipe, classes[i : i + batch_size], seeds[i : i + batch_size], **sampler))
            if r == 0:
                bar.update(len(seeds[i : i + batch_size]))
        best = min(best, time.perf_counter() - t0)
        images = torch.cat(chunks) if images is None else images
    return images, best


def _warm_up(pipe, classes, seeds, sampler, warmup):
    """One untimed image: with the sampler's own steps (``warmup=True``) or ``warmup`` steps (an int)."""
    from . import generate

    if warmup is True:
        generate(pipe, classes[:1], seeds[:1], **sampler)
    elif warmup:
        generate(pipe, classes[:1], seeds[:1], **{**sampler, "num_inference_steps": int(warmup)})


def _patch_callables(patch_options, apply, undo):
    options = dict(patch_options or {})
    if apply is None:

        def apply(pipe):
            import ditkern

            return ditkern.patch(pipe, **options)

    if undo is None:

        def undo(pipe):
            import ditkern

            return ditkern.unpatch(pipe)

    return apply, undo


def _resolve(pipe, seeds, classes, sampler):
    """(pipe, name, seeds, classes, sampler) with the defaults filled in (a name is loaded)."""
    from . import DEFAULTS, load, name_of

    if isinstance(pipe, str):
        pipe = load(pipe)
    name = name_of(pipe)
    seeds = [int(s) for s in seeds]
    classes = default_classes(len(seeds)) if classes is None else [int(c) for c in classes]
    if len(classes) != len(seeds):
        raise ValueError(f"{len(classes)} classes but {len(seeds)} seeds")
    return pipe, name, seeds, classes, {**DEFAULTS[name], **(sampler or {})}


def unpatched_run(pipe, seeds: Iterable[int], classes: Sequence[int] | None = None, sampler: dict | None = None,
              batch_size: int = 20, warmup: bool | int = True, progress: bool = True, repeats: int = 1
              ) -> tuple[torch.Tensor, float]:  # fmt: skip
    """``(images, seconds)`` of the unpatched pipeline for ``seeds``: what :func:`compare` measures against. Pass it
    to several ``compare(..., reference=...)`` calls to time the reference once and share it across settings.
    ``repeats``: the seconds are the fastest of that many runs (give ``compare`` the same number)."""
    from tqdm.auto import tqdm

    pipe, name, seeds, classes, sampler = _resolve(pipe, seeds, classes, sampler)
    with tqdm(total=len(seeds), desc=f"{name} unpatched", disable=not progress, leave=False) as bar:
        _warm_up(pipe, classes, seeds, sampler, warmup)
        return _timed_generate(pipe, classes, seeds, sampler, batch_size, bar, repeats)


def compare(
    pipe,
    seeds: Iterable[int],
    classes: Sequence[int] | None = None,
    sampler: dict | None = None,
    patch_options: dict | None = None,
    apply: Callable | None = None,
    undo: Callable | None = None,
    setting: str | None = None,
    batch_size: int = 20,
    warmup: bool | int = True,
    keep_images: bool = True,
    progress: bool = True,
    reference: tuple[torch.Tensor, float] | None = None,
    repeats: int = 1,
) -> FidelityResult:
    """Generate ``seeds`` unpatched, then patched, and measure the difference.

    pipe: a reference pipeline or its name (``"digits-dit"``, ``"digits-flux"``; loaded with :func:`ditkern.zoo.load`).
    classes: the digit of each seed (default: seed index % 10).
    sampler: sampler settings for :func:`ditkern.zoo.generate` (default: :data:`ditkern.zoo.DEFAULTS`).
    patch_options: keyword arguments of ``ditkern.patch(pipe, **patch_options)``, used when ``apply`` is not given;
        ``ditkern.unpatch(pipe)`` undoes it unless ``undo`` is given. ``apply(pipe)`` may return anything.
    reference: ``(images, seconds)`` of the unpatched pipeline for the same seeds, classes and sampler, from
        :func:`unpatched_run` (measured once, shared by several settings); without it the unpatched run happens here.
    repeats: each side's seconds are the fastest of that many identical runs (1: one run); a shared ``reference``
        should be timed with the same number.
    The pipeline is always left unpatched (``undo`` runs even if generation fails). With ``warmup``, each variant
    first generates one image untimed, so one-off costs (kernel compilation, autotuning) stay out of the ratio; an
    int ``warmup`` is the step count of that run (where nothing compiles, e.g. the CPU's torch paths, a short one
    does: only lazy initialisation is left to absorb).
    """
    from tqdm.auto import tqdm

    pipe, name, seeds, classes, sampler = _resolve(pipe, seeds, classes, sampler)
    apply_fn, undo_fn = _patch_callables(patch_options, apply, undo)
    if setting is None:
        setting = ",".join(f"{k}={v}" for k, v in (patch_options or {}).items()) or (
            getattr(apply, "__name__", "patched") if apply is not None else "default")
    n = len(seeds)
    if reference is None:
        reference = unpatched_run(pipe, seeds, classes, sampler, batch_size, warmup, progress, repeats)
    ref, t_ref = reference
    if ref.shape[0] != n:
        raise ValueError(f"reference has {ref.shape[0]} images but {n} seeds")
    with tqdm(total=n, desc=f"{name} [{setting}]", disable=not progress, leave=False) as bar:
        apply_fn(pipe)
        try:
            _warm_up(pipe, classes, seeds, sampler, warmup)
            out, t_out = _timed_generate(pipe, classes, seeds, sampler, batch_size, bar, repeats)
        finally:
            undo_fn(pipe)
    per_image = psnr(out, ref)
    return FidelityResult(
        pipeline=name,
        setting=setting,
        num_images=n,
        sampler=sampler,
        seconds_unpatched=t_ref,
        seconds_patched=t_out,
        psnr_db=pooled_psnr(out, ref),
        psnr_worst_db=per_image.min().item(),
        max_abs_err=max_abs_error(out, ref),
        accuracy_unpatched=classifier.accuracy(ref, classes),
        accuracy_patched=classifier.accuracy(out, classes),
        images_unpatched=ref if keep_images else None,
        images_patched=out if keep_images else None,
        classes=classes,
    )


def baseline_accuracy(pipe, seeds: Iterable[int], classes: Sequence[int] | None = None, sampler: dict | None = None,
                      batch_size: int = 20, progress: bool = True) -> float:
    """Class accuracy of the unpatched pipeline's samples (what a patch should not lower)."""
    pipe, _, seeds, classes, sampler = _resolve(pipe, seeds, classes, sampler)
    images, _ = unpatched_run(pipe, seeds, classes, sampler, batch_size, warmup=False, progress=progress)
    return classifier.accuracy(images, classes)


def main(argv=None):
    """``python -m ditkern.zoo.fidelity [--seeds 100]``: baseline class accuracy and sampling time per pipeline."""
    import argparse

    from . import DEFAULTS, NAMES, generate, load

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--seeds", type=int, default=100, help="images per pipeline (image i shows digit i % 10)")
    p.add_argument("--pipelines", nargs="*", default=list(NAMES))
    args = p.parse_args(argv)
    print(f"classifier held-out accuracy on real digits: {classifier.heldout_accuracy():.2%}")
    for name in args.pipelines:
        pipe = load(name)
        generate(pipe, [0], [0])  # warm-up
        t0 = time.perf_counter()
        generate(pipe, default_classes(20), list(range(20)))
        t_grid = time.perf_counter() - t0
        acc = baseline_accuracy(pipe, range(args.seeds))
        print(f"{name}: class accuracy {acc:.1%} on {args.seeds} samples at {DEFAULTS[name]}; "
              f"20-digit grid in {t_grid:.2f} s ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
