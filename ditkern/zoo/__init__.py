"""Reference pipelines trained by ditkern on scikit-learn's digits, and the fidelity harness that judges patches.

Real diffusers latent-diffusion pipelines ship inside the package (float16 safetensors, diffusers layout):

* ``digits-dit``: a class-conditional :class:`~diffusers.DiTTransformer2DModel` (4 blocks, width 128, 16x16 token
  grid) run as a :class:`~diffusers.DiTPipeline` with classifier-free guidance (null class 1000).
* ``digits-flux``: a :class:`~diffusers.FluxTransformer2DModel` (2 joint text-image double blocks, 4 single blocks,
  width 128, RoPE) trained with flow matching, run as a :class:`~diffusers.FluxPipeline` without text encoders; the
  digit class is given as fixed per-class ``prompt_embeds`` / ``pooled_prompt_embeds`` (see :func:`class_embeds`).
* ``digits-flux-deep``: the FLUX architecture at realistic depth, narrower so that it trains on one CPU thread in
  about 18 minutes: 4 double + 12 single blocks (16), width 64 (4 heads x 16, RoPE axes 4 + 6 + 6), the same class
  table as ``digits-flux``. Its block count is closer to what caching and block skipping meet on real models (FLUX.1:
  19 + 38 blocks); the shallow pair stays for the fast tests (:data:`FAST_NAMES`).

All three decode with the same small :class:`~diffusers.AutoencoderKL` (32x32 images, 4x16x16 latents)::

    import ditkern.zoo as zoo
    pipe = zoo.load("digits-flux")
    images = zoo.generate(pipe, classes=[3, 1, 4], seeds=[0, 1, 2])  # [3, 1, 32, 32] in [0, 1]
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

import torch

NAMES = ("digits-dit", "digits-flux", "digits-dit-deep", "digits-flux-deep")

#: The shallow pipelines (4-6 blocks), for the fast per-pipeline tests and checks.
FAST_NAMES = ("digits-dit", "digits-flux")

#: The deep pipelines (16 blocks, narrower), where caching and block skipping meet realistic depth.
DEEP_NAMES = ("digits-dit-deep", "digits-flux-deep")

#: Default sampler settings per pipeline (what :func:`generate` uses unless told otherwise).
DEFAULTS = {
    "digits-dit": dict(num_inference_steps=12, guidance_scale=3.0),
    "digits-flux": dict(num_inference_steps=12, true_cfg_scale=3.0),
    "digits-dit-deep": dict(num_inference_steps=12, guidance_scale=3.0),
    "digits-flux-deep": dict(num_inference_steps=12, true_cfg_scale=3.0),
}

#: Class accuracy of the unpatched pipelines at :data:`DEFAULTS` (seeds 0-99, image i shows digit i % 10), as judged
#: by :mod:`ditkern.zoo.classifier` (98.9% held-out accuracy on real digits); measured on the CPU, float32, 1 thread
#: (``python -m ditkern.zoo.fidelity``, i.e. :func:`ditkern.zoo.fidelity.baseline_accuracy`).
BASELINE_ACCURACY = {"digits-dit": 1.00, "digits-flux": 1.00, "digits-dit-deep": 0.95, "digits-flux-deep": 1.00}

_HERE = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """Directory of the named reference pipeline (diffusers layout; load it with ``from_pretrained``)."""
    if name not in NAMES:
        raise ValueError(f"unknown reference pipeline {name!r}; choose one of {NAMES}")
    return os.path.join(_HERE, "pipelines", name)


def _dtype_kwarg(dtype):
    """diffusers >= 0.42 names the from_pretrained dtype argument ``dtype`` (``torch_dtype`` is deprecated)."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def load(name: str, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """Load a reference pipeline offline: ``load("digits-dit")`` -> DiTPipeline, ``load("digits-flux")`` -> FluxPipeline
    (``load("digits-flux-deep")`` -> FluxPipeline too).

    Weights are stored in float16 and upcast to ``torch_dtype`` (float32 by default, as the CPU wants).
    """
    # low_cpu_mem_usage=False: these pipelines are a few MB, so accelerate's meta-device loading saves nothing, and
    # without accelerate installed diffusers falls back to False anyway, warning on every load that it did
    opts = dict(local_files_only=True, low_cpu_mem_usage=False, **_dtype_kwarg(torch_dtype))
    with _quiet_load():
        if architecture(name) == "dit":
            from diffusers import DiTPipeline

            pipe = DiTPipeline.from_pretrained(path(name), **opts)
        else:
            from diffusers import FluxPipeline

            pipe = FluxPipeline.from_pretrained(
                path(name), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, **opts)
    pipe._ditkern_zoo_name = name
    if device is not None:
        pipe = pipe.to(device)
    return pipe


@contextlib.contextmanager
def _quiet_load():
    """A zoo load prints nothing a user must act on, so it prints nothing:

    * importing diffusers' pipeline modules makes transformers resolve ``CLIPImageProcessor`` and
      ``SiglipImageProcessor`` (IP-adapter feature extractors), and without torchvision it warns once per process
      that it falls back to their PIL versions; the zoo's pipelines have no image processor, so that one logger is
      quietened while the pipeline loads (other transformers loggers, and errors, still print);
    * diffusers' "Loading pipeline components" bar, for three components that load in a fraction of a second
      (switched off for the load, then back to what it was).
    """
    from diffusers.utils import logging as dlog

    log = logging.getLogger("transformers.utils.import_utils")
    level, bars = log.level, dlog.is_progress_bar_enabled()
    log.setLevel(logging.ERROR)
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        log.setLevel(level)
        if bars:
            dlog.enable_progress_bar()


def architecture(name: str) -> str:
    """``"dit"`` (a :class:`~diffusers.DiTPipeline`) or ``"flux"`` (a :class:`~diffusers.FluxPipeline`)."""
    path(name)  # checks the name
    return "dit" if name.startswith("digits-dit") else "flux"


def name_of(pipe) -> str:
    """Which reference pipeline ``pipe`` is: the name it was loaded under by :func:`load`, else (a pipeline loaded
    with ``from_pretrained``) ``"digits-dit"`` or ``"digits-flux"``, judged by its class."""
    name = getattr(pipe, "_ditkern_zoo_name", None)
    if name is not None:
        return name
    from diffusers import DiTPipeline, FluxPipeline

    if isinstance(pipe, FluxPipeline):
        return "digits-flux"
    if isinstance(pipe, DiTPipeline):
        return "digits-dit"
    raise TypeError(f"not a ditkern.zoo pipeline: {type(pipe).__name__}")


_CLASS_TABLE = {}


def class_embeds(classes: Sequence[int], dtype: torch.dtype = torch.float32, device=None, name: str = "digits-flux"):
    """The conditioning of Flux pipeline ``name`` for ``classes``: ``(prompt_embeds [N, T, D], pooled_prompt_embeds
    [N, P])`` (digits-flux-deep ships the same table as digits-flux).

    Class ``10`` (or ``None``) is the null class that classifier-free guidance uses as the negative prompt.
    """
    if name not in _CLASS_TABLE:
        from safetensors.torch import load_file

        _CLASS_TABLE[name] = load_file(os.path.join(path(name), "class_embeds.safetensors"))
    t = _CLASS_TABLE[name]
    null = t["pooled_prompt_embeds"].shape[0] - 1
    idx = torch.tensor([null if c is None else int(c) for c in classes], dtype=torch.long)
    if ((idx < 0) | (idx > null)).any():
        raise ValueError(f"digit classes must be in 0..{null - 1} (or {null} / None for the null class)")
    return (t["prompt_embeds"][idx].to(device=device, dtype=dtype),
            t["pooled_prompt_embeds"][idx].to(device=device, dtype=dtype))


def generate(pipe, classes: Sequence[int], seeds: Sequence[int], num_inference_steps: int | None = None,
             progress: bool = False, **kwargs) -> torch.Tensor:
    """Generate one digit per ``(class, seed)`` pair; returns a float32 CPU tensor ``[N, 1, 32, 32]`` in [0, 1].

    Every image's initial noise comes from its own ``torch.Generator`` seeded with its seed, so an image does not
    depend on what else is in the batch. Unset sampler settings come from :data:`DEFAULTS`; other ``kwargs`` go to
    the pipeline call (e.g. ``guidance_scale`` for DiT, ``true_cfg_scale`` for Flux).
    """
    classes, seeds = list(classes), list(seeds)
    if len(classes) != len(seeds):
        raise ValueError(f"{len(classes)} classes but {len(seeds)} seeds")
    if not classes:
        raise ValueError("nothing to generate")
    name = name_of(pipe)
    opts = dict(DEFAULTS[name])
    if num_inference_steps is not None:
        opts["num_inference_steps"] = num_inference_steps
    opts.update(kwargs)
    device = pipe._execution_device
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=not progress)
    try:
        if architecture(name) == "dit":
            out = pipe(class_labels=[int(c) for c in classes], generator=generators, output_type="pt", **opts).images
        else:
            from .data import IMAGE_SIZE

            dtype = pipe.transformer.dtype
            prompt, pooled = class_embeds(classes, dtype=dtype, device=device, name=name)
            if opts.get("true_cfg_scale", 1.0) > 1.0 and "negative_prompt_embeds" not in opts:
                opts["negative_prompt_embeds"], opts["negative_pooled_prompt_embeds"] = class_embeds(
                    [None] * len(classes), dtype=dtype, device=device, name=name)
            opts.setdefault("height", IMAGE_SIZE)
            opts.setdefault("width", IMAGE_SIZE)
            out = pipe(prompt_embeds=prompt, pooled_prompt_embeds=pooled, generator=generators, output_type="pt",
                       **opts).images
    finally:
        pipe._progress_bar_config = saved
    return out.float().cpu().clamp(0, 1)


def __getattr__(name):  # lazy: ``ditkern.zoo.fidelity`` / ``ditkern.zoo.demo`` pull in matplotlib, scikit-learn
    if name in ("fidelity", "demo", "classifier", "data", "train"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)
