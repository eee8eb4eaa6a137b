"""``python -m ditkern demo``: the README's main job.

It loads the reference pipelines (ditkern.zoo), patches each pipeline object with every setting of
:data:`SETTINGS`, generates digits with and without the patch (the unpatched run timed once per pipeline and shared
by all its rows), prints the patch report, the fidelity/speed table and what this machine can show, and writes a PNG
with every setting's samples beside the unpatched ones and a speed-vs-PSNR plot. ``--quick`` runs a tiny random
FLUX transformer instead: patch, report, check and time one forward each way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

#: The demo's settings: ``--settings`` key -> (row label, what ``ditkern.patch`` gets). The default rows are
#: :data:`DEFAULT_SETTINGS`; ``all`` combines every opt-in feature in one patch.
SETTINGS = {
    "lossless": "fused adaLN (lossless)",
    "cache": "+ Taylor cache (calibrated budget 0.5, order 1)",
    "int4": "+ int4 weights (g32, bf16 scales, absmax)",
    "window": "+ window attention (5x5 + text)",
    "all": "+ cache + int4 + window",
}
DEFAULT_SETTINGS = ("lossless", "cache", "int4", "window")
#: The demo's denoising steps (the pipelines' own default is 12): keeps ``make demo`` under 3 minutes on 2 cores, where
#: the int4 row's CPU path (dequantize per call) is the slowest; both pipelines still draw every digit class.
DEMO_STEPS = 8


def quick_demo() -> dict:
    import ditkern  # noqa: PLC0415
    from diffusers import FluxTransformer2DModel  # noqa: PLC0415

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12),
    ).eval()  # fmt: skip
    side, text = 16, 16
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij"), -1)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 16),
        encoder_hidden_states=torch.randn(1, text, 64),
        pooled_projections=torch.randn(1, 32),
        timestep=torch.tensor([0.5]),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
    )

    def forward():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    def timed():
        forward()
        t0 = time.perf_counter()
        for _ in range(5):
            out = forward()
        return out, (time.perf_counter() - t0) / 5 * 1e3

    before, ms_before = timed()
    report = ditkern.patch(model)
    print(report)
    after, ms_after = timed()
    ditkern.unpatch(model)
    restored = forward()
    err = (after - before).abs().max().item()
    print(
        f"\ntiny FLUX transformer ({side}x{side} image + {text} text tokens, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params)"
        f"\n  unpatched {ms_before:.1f} ms/forward, patched {ms_after:.1f} ms/forward ({ms_before / ms_after:.2f}x) on "
        f"{'GPU' if torch.cuda.is_available() else 'CPU (no fused kernel runs here: the adaLN modules keep their native ops, no speedup is expected)'}"
        f"\n  max |patched - unpatched| = {err:.2e}; after unpatch bit-identical: {torch.equal(restored, before)}"
    )
    return {"report": report, "max_abs_err": err, "restored_exact": torch.equal(restored, before)}


def demo_settings(keys: Sequence[str] = DEFAULT_SETTINGS, steps: int | None = DEMO_STEPS) -> dict[str, dict]:
    """The rows of the demo table for ``keys`` (of :data:`SETTINGS`): {label: ditkern.patch options}, for a run of
    ``steps`` denoising steps (None: the pipelines' default, 12; no row depends on it now: the cache row is calibrated
    by the demo for the sampler it runs).

    The cache row is a compute budget, ``TaylorCache(order=1, budget=0.5)``, calibrated per pipeline on two seeds
    apart from the shown ones (zoo.demo.CALIB_SEEDS, untimed): the row nearest the caching goal measured at the demo's
    8 steps (10 seeds, same run, A-B-A, 2026-12-02, ``bench.cache_sweep.run_case``): 0.50 of the block executions,
    digits-dit 34.5 dB mean / 31.1 dB worst, digits-flux 36.5 / 31.4 dB, against 31.7 / 25.9 and 40.4 / 37.4 dB at
    0.62 for the end-anchored every-2nd-step schedule it replaces (budget 0.62: 35.7 / 32.5 and 40.4 / 37.4; 0.4:
    24.1 / 22.8 and 27.9 / 23.1). bench/results/cache/ has the sweep at 28 and 50 steps."""
    from ditkern.attention import WindowAttention  # noqa: PLC0415
    from ditkern.cache import TaylorCache  # noqa: PLC0415
    from ditkern.quant import QuantConfig  # noqa: PLC0415

    unknown = [k for k in keys if k not in SETTINGS]
    if unknown or not keys:
        raise ValueError(f"settings: unknown {unknown or 'empty list'}; choose from {', '.join(SETTINGS)}")
    features = {
        "cache": {"cache": TaylorCache(order=1, budget=0.5)},
        "int4": {"quant": QuantConfig(format="int4", group_size=32, scale_dtype="bf16")},
        "window": {"attention": WindowAttention(window=5)},
    }
    features["all"] = {k: v for f in ("cache", "int4", "window") for k, v in features[f].items()}
    return {SETTINGS[k]: dict(features.get(k, {})) for k in keys}


def main(out: str = "out/ditkern_demo.png", quick: bool = False, settings: Sequence[str] = DEFAULT_SETTINGS,
         seeds: int = 10, steps: int | None = DEMO_STEPS, pipelines: Sequence[str] | None = None) -> None:
    if quick:
        quick_demo()
        return
    from ditkern.zoo import FAST_NAMES  # noqa: PLC0415
    from ditkern.zoo.demo import run_demo  # noqa: PLC0415

    run_demo(out_path=out, settings=demo_settings(settings, steps), seeds=range(seeds),
             pipelines=pipelines or FAST_NAMES,
             sampler=None if steps is None else {"num_inference_steps": steps})
