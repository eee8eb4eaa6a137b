"""End-to-end transformer benchmark: ``python -m bench.e2e [--models flux,...] [--steps N] [--rows ...] [--out DIR]``.

Each model is a full-size diffusers transformer with random weights built from the published config of FLUX.1-dev,
SD3.5-large, Wan 2.1 14B and Qwen-Image (:data:`MODELS`, numbers with their source; nothing is downloaded), run for
``--steps`` denoising steps at the real token counts (one image: FLUX/SD3.5/Qwen-Image 1024x1024, Wan 720p x 81
frames). Only the transformer's denoising loop is timed (no text encoders, no VAE decode, no classifier-free
guidance pass: one transformer call per step), in bf16 on a GPU, synchronised, after one untimed image (compilation,
autotuning and the cache's first generation stay out of it). Rows (:data:`ROWS`): unpatched bf16 eager,
``torch.compile``, ditkern lossless, lossless + compile, + W4A8, + Taylor cache (fixed schedule: the block fraction
is deterministic), + window attention, + all compatible together (every feature whose own row ran, compiled if the
compile row ran and the cache is not among them: under torch.compile the cache recompiles at every generation).
Columns: seconds per image, speedup over eager and over ``torch.compile``, peak GPU memory. A row that cannot run on
this device says why instead of a number.

On a CPU the same code runs at a scaled-down geometry (:func:`scaled`: 2+2 blocks, width 32, an 8x8 token grid) and
every output says so: it tests the harness (CI runs it in seconds), the numbers are no claim. Results: JSON + a
markdown table under ``bench/results/<device>/e2e_<date>_<sha>``, rewritten after every row (a run cut short keeps
what it measured; never overwritten by another run; CPU runs go to the git-ignored ``bench/results/cpu/``); the paths
are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.run import claim_stem, default_out, environment

# Published transformer configs (transformer/config.json of each model's Hugging Face repository, as published; not
# fetched here, there is no hub access at run time). Cross-checked against copies in public code: Open-Sora
# configs/diffusion/inference/plugins/t2i2v.py and sglang's FluxArchConfig (FLUX.1-dev), ml-explore/mlx-examples
# video/Wan2.1/wan/configs/wan_t2v_14B.py (Wan 2.1 14B: dim 5120, ffn 13824, 40 heads, 40 layers), exo's
# models/qwen/config.py (Qwen-Image: 60 blocks, 24 x 128, patch 2) and the diffusers class defaults.
FLUX_DEV = dict(  # https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
SD35_LARGE = dict(  # https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
WAN21_14B = dict(  # https://huggingface.co/Wan-AI/Wan2.1-T2V-14B-Diffusers/blob/main/transformer/config.json
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6,
)  # fmt: skip
QWEN_IMAGE = dict(  # https://huggingface.co/Qwen/Qwen-Image/blob/main/transformer/config.json
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Model:
    """One benchmark model: its diffusers class, config, geometry and how a pipeline calls it."""

    name: str
    cls: str  # diffusers class name
    config: dict
    grid: tuple[int, ...]  # token grid after patchify: (h, w) or (frames, h, w)
    text: int  # text tokens
    t_scale: float  # the timestep the pipeline passes at t = 1 (1 for FLUX / Qwen-Image: sigma; 1000 otherwise)
    geometry: str  # what one image is

    def tokens(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n + self.text


MODELS = {
    # FluxPipeline 1024x1024: VAE /8 -> 128x128 latents, 2x2 packed -> 64x64 tokens; T5 max_sequence_length 512
    "flux": Model("flux", "FluxTransformer2DModel", FLUX_DEV, (64, 64), 512, 1.0, "FLUX.1-dev 1024x1024"),
    # SD3 pipeline 1024x1024: 128x128 latents, patch 2 -> 64x64 tokens; 77 CLIP + 256 T5 text tokens
    "sd35": Model("sd35", "SD3Transformer2DModel", SD35_LARGE, (64, 64), 333, 1000.0, "SD3.5-large 1024x1024"),
    # WanPipeline 1280x720, 81 frames: VAE /4 in time, /8 in space -> 21x90x160 latents, patch (1,2,2) -> 21x45x80
    "wan": Model("wan", "WanTransformer3DModel", WAN21_14B, (21, 45, 80), 512, 1000.0, "Wan 2.1 14B 720p 81 frames"),
    # QwenImagePipeline 1024x1024: 128x128 latents, 2x2 packed -> 64x64 tokens; the prompt's length (here 128)
    "qwen": Model("qwen", "QwenImageTransformer2DModel", QWEN_IMAGE, (64, 64), 128, 1.0, "Qwen-Image 1024x1024"),
}

# The scaled-down CPU geometry: the same classes and forward code, tiny (what CI can run in seconds).
_SCALED = {
    "flux": dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
    "sd35": dict(sample_size=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16),
    "wan": dict(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2),
    "qwen": dict(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
}  # fmt: skip
_SCALED_GRID = {"flux": (8, 8), "sd35": (8, 8), "wan": (2, 8, 8), "qwen": (8, 8)}


def scaled(model: Model) -> Model:
    """The CPU stand-in of ``model``: 2 (+2) blocks, width 32, an 8x8 grid (2x8x8 for Wan), 8 text tokens."""
    grid = _SCALED_GRID[model.name]
    where = f"SCALED DOWN for the CPU (2+2 blocks, width 32, {'x'.join(map(str, grid))} grid, 8 text tokens)"
    return dataclasses.replace(model, config={**model.config, **_SCALED[model.name]}, grid=grid, text=8,
                               geometry=f"{model.geometry}, {where}")


def build(model: Model, device, dtype) -> torch.nn.Module:
    """The transformer with random weights, made directly on ``device`` in ``dtype`` (no fp32 copy of a 14B model)."""
    import diffusers

    old = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return getattr(diffusers, model.cls)(**model.config).eval()
    finally:
        torch.set_default_dtype(old)


def inputs(model: Model, device, dtype) -> Callable[[float], dict]:
    """``call(t)`` -> the keyword arguments of one transformer call at timestep fraction ``t`` (1 = noise), as the
    model's pipeline builds them (random latents and text states of the real shapes)."""
    c, g = model.config, torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    if model.name in ("flux", "qwen"):
        h, w = model.grid
        fixed = dict(hidden_states=rnd(1, h * w, c["in_channels"]),
                     encoder_hidden_states=rnd(1, model.text, c["joint_attention_dim"]))  # fmt: skip
        if model.name == "flux":
            ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h * 1.0), torch.arange(w * 1.0),
                                             indexing="ij"), -1).reshape(-1, 3)  # fmt: skip
            fixed.update(pooled_projections=rnd(1, c["pooled_projection_dim"]), img_ids=ids.to(device),
                         txt_ids=torch.zeros(model.text, 3, device=device))  # fmt: skip
            if c.get("guidance_embeds"):
                fixed["guidance"] = torch.full((1,), 3.5, device=device, dtype=torch.float32)
        else:
            fixed["img_shapes"] = [[(1, h, w)]]
    elif model.name == "sd35":
        h, w = model.grid
        p = c["patch_size"]
        fixed = dict(hidden_states=rnd(1, c["in_channels"], h * p, w * p),
                     encoder_hidden_states=rnd(1, model.text, c["joint_attention_dim"]),
                     pooled_projections=rnd(1, c["pooled_projection_dim"]))  # fmt: skip
    elif model.name == "wan":
        f, h, w = model.grid
        _, ph, pw = c["patch_size"]
        fixed = dict(hidden_states=rnd(1, c["in_channels"], f, h * ph, w * pw),
                     encoder_hidden_states=rnd(1, model.text, c["text_dim"]))  # fmt: skip
    else:
        raise ValueError(f"no input builder for model {model.name!r}")

    def call(t: float) -> dict:
        return {**fixed, "timestep": torch.full((1,), t * model.t_scale, device=device, dtype=torch.float32)}

    return call


# ------------------------------------------------------------------------------------------------------------ rows


def _features(model: Model, steps: int) -> dict[str, dict]:
    """The ditkern.patch options of each opt-in feature row."""
    import ditkern

    # a window over half of each image axis (a quarter of the image); Wan: every frame, half of height and width
    odd = lambda n: max(1, n // 2) | 1  # noqa: E731
    window = tuple(odd(n) if i >= len(model.grid) - 2 else (n | 1) for i, n in enumerate(model.grid))
    return {
        "w4a8": {"quant": "w4a8"},
        # fixed schedule: the steps that run every block are known in advance, so the block fraction is deterministic
        "cache": {"cache": ditkern.TaylorCache(order=2, interval=3, warmup=min(3, max(1, steps // 4)))},
        "window": {"attention": ditkern.WindowAttention(window=window)},
    }


ROWS = ("eager", "compile", "lossless", "lossless+compile", "+w4a8", "+cache", "+window", "+all")
LABELS = {
    "eager": "unpatched eager",
    "compile": "torch.compile (unpatched)",
    "lossless": "ditkern lossless",
    "lossless+compile": "ditkern lossless + compile",
    "+w4a8": "+ W4A8 (fp4 weights, fp8 activations)",
    "+cache": "+ Taylor cache (fixed: order 2, interval 3)",
    "+window": "+ window attention (half of each image axis)",
    "+all": "+ all compatible together",
}


def _peak_reset(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_image(fn, call, steps: int, device, images: int) -> float:
    """Median seconds of one image (``steps`` calls at falling timesteps), after one untimed image."""
    timesteps = [1.0 - i / steps for i in range(steps)]

    def image():
        for t in timesteps:
            fn(**call(t))

    with torch.no_grad():  # not inference_mode: W4A8 packs its weights on the first call (version counters)
        image()  # compile, autotune, the cache's first generation
        _sync(device)
        samples = []
        for _ in range(images):
            t0 = time.perf_counter()
            image()
            _sync(device)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def run_model(model: Model, steps: int, rows=ROWS, images: int = 1, backend: str | None = None,
              compile_on_cpu: bool = False, progress: bool = True, on_row: Callable | None = None) -> list[dict]:
    """Every row of ``rows`` for one model: {row, label, seconds, speedup_vs_eager, speedup_vs_compile, peak_GiB,
    block_fraction, note}. ``on_row(rows so far)`` after each timed row (so that a run cut short keeps them)."""
    import ditkern

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    net = build(model, device, dtype)
    call = inputs(model, device, dtype)
    feats = _features(model, steps)
    base = {"backend": backend} if backend else {}
    results: dict[str, dict] = {}
    ran: set[str] = set()
    for row in rows:
        label = LABELS[row] + (f" ({str(dtype).replace('torch.', '')})" if row == "eager" else "")
        out = {"model": model.name, "geometry": model.geometry, "tokens": model.tokens(), "steps": steps, "row": row,
               "label": label, "seconds": None, "peak_GiB": None, "block_fraction": None, "note": ""}
        results[row] = out
        compiled = row.endswith("compile") or (row == "+all" and "compile" in ran)
        if compiled and device == "cpu" and not compile_on_cpu:
            out["note"] = "skipped on CPU (inductor compile time; --compile-on-cpu runs it)"
            continue
        if row in ("eager", "compile"):
            opts = None
        elif row in ("lossless", "lossless+compile"):
            opts = dict(base)
        elif row == "+all":
            chosen = [f for f in ("w4a8", "cache", "window") if f"+{f}" in ran]
            if not chosen:
                out["note"] = "no feature row ran here"
                continue
            opts = {**base, **{k: v for f in chosen for k, v in feats[f].items()}}
            if compiled and "cache" in chosen:
                # not compatible: dynamo guards on the cache's Python step state (calls, last timestep, slots), so
                # every generation recompiles (TORCH_LOGS=recompiles on the scaled FLUX model: 7-10 s per image)
                compiled = False
                out["note"] = "without torch.compile: the Taylor cache recompiles at every generation under it"
            out["label"] = f"{LABELS[row]} ({' + '.join(chosen)}{' + compile' if compiled else ''})"
        else:
            opts = {**base, **feats[row[1:]]}
        if progress:
            print(f"bench.e2e: {model.name} [{out['label']}] ...", file=sys.stderr, flush=True)
        _peak_reset(device)
        try:
            if opts is not None:
                report = ditkern.patch(net, **opts)
                if not report:  # e.g. lossless on a CPU: every module keeps its native ops (timed all the same)
                    out["note"] = f"nothing patched here: {report.summary()}"
            fn = torch.compile(net) if compiled else net
            out["seconds"] = time_image(fn, call, steps, device, images)
            if device == "cuda":
                out["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if "cache" in (opts or {}):
                out["block_fraction"] = round(ditkern.cache.stats(net)["block_fraction"], 3)
            ran.add(row)
        except Exception as exc:  # a row that cannot run on this device says why, the others go on
            out["note"] = _reason(exc)
        finally:
            ditkern.unpatch(net)
            if compiled:
                torch._dynamo.reset()
        if on_row is not None:
            on_row(_with_speedups(results))
    rows_out = _with_speedups(results)
    del net
    _peak_reset(device)
    return rows_out


def _with_speedups(results: dict[str, dict]) -> list[dict]:
    for out in results.values():
        for b in ("eager", "compile"):
            bs = results.get(b, {}).get("seconds")
            out[f"speedup_vs_{b}"] = round(bs / out["seconds"], 3) if bs and out["seconds"] else None
    return list(results.values())


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# bench.e2e: {env['gpu']}, {env['date']}, {env['git_sha']}", ""]
    if env["device"] == "cpu":
        lines += ["**CPU run at a SCALED-DOWN geometry: tests the harness; these numbers are no claim.**", ""]
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    model = None
    for r in result["rows"]:
        if r["model"] != model:
            model = r["model"]
            lines += [f"## {r['geometry']}: {r['tokens']} tokens, {r['steps']} steps, seconds per image", "",
                      "| row | s / image | vs eager | vs compile | peak GiB | blocks run | note |",
                      "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines.append(f"| {r['label']} | "
                     f"{fmt(r['seconds'], '{:.3f}')} | {fmt(r['speedup_vs_eager'], '{:.2f}x')} | "
                     f"{fmt(r['speedup_vs_compile'], '{:.2f}x')} | {fmt(r['peak_GiB'], '{:.1f}')} | "
                     f"{fmt(r['block_fraction'], '{:.0%}')} | {r['note']} |")  # fmt: skip
        if r is result["rows"][-1] or result["rows"][result["rows"].index(r) + 1]["model"] != model:
            lines.append("")
    return "\n".join(lines) + "\n"


def run(models=("flux",), steps: int | None = None, rows=ROWS, images: int = 1, out=None, backend=None,
        compile_on_cpu: bool = False, progress: bool = True) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = steps or (28 if device == "cuda" else 3)
    env = environment(device)
    env["geometry"] = "full size (published configs)" if device == "cuda" else "SCALED DOWN for the CPU (not a claim)"
    result = {"env": env, "rows": []}
    out_dir = None if out is False else Path(out) if out else default_out(device)
    stem = None if out_dir is None else claim_stem(out_dir, env, prefix="e2e_")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    threads = torch.get_num_threads()
    if device == "cpu":
        # the scaled models' tensors are tiny: on a shared CPU the intra-op threads' synchronisation costs far more
        # than they compute (measured on 2 busy cores: the scaled FLUX call 12 ms on one thread, ~1 s on two)
        torch.set_num_threads(1)
    try:
        for name in models:
            model = MODELS[name] if device == "cuda" else scaled(MODELS[name])
            done = list(result["rows"])

            def partial(rows_so_far, done=done):
                if stem is not None:
                    _write({**result, "rows": done + rows_so_far}, out_dir, stem)

            result["rows"] = done + run_model(model, steps, rows, images, backend, compile_on_cpu, progress, partial)
    finally:
        torch.set_num_threads(threads)
    if stem is not None:
        result["paths"] = [str(p) for p in _write(result, out_dir, stem)]
    return result


def _write(result: dict, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1, default=str))
    paths[1].write_text(markdown(result))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--models", default="flux", help=f"comma-separated, of: {', '.join(MODELS)}, or all (default: flux)")
    p.add_argument("--steps", type=int, help="denoising steps per image (default: 28 on a GPU, 3 on the CPU)")
    p.add_argument("--rows", help=f"comma-separated, of: {', '.join(ROWS)} (default: all)")
    p.add_argument("--images", type=int, default=1, help="timed images per row, median reported (default: 1)")
    p.add_argument("--backend", choices=["auto", "cuda", "triton", "torch"], help="force the fused ops' backend")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the compile rows on the CPU too (slow)")
    p.add_argument("--out", help="output folder (default: bench/results/<gpu>/, or the git-ignored bench/results/cpu/)")
    a = p.parse_args(argv)
    models = list(MODELS) if a.models == "all" else [m.strip() for m in a.models.split(",") if m.strip()]
    rows = ROWS if not a.rows else tuple(r.strip() for r in a.rows.split(","))
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"--rows: unknown {bad}; choose from {', '.join(ROWS)}")
    result = run(models, a.steps, rows, a.images, a.out, a.backend, a.compile_on_cpu)
    print(markdown(result))
    for path in result.get("paths", []):
        print(f"bench.e2e: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
