"""The lossless ``ditkern.patch`` against unpatched on a device where no fused kernel can run (CPU).

``python -m bench.cpu_lossless --pipeline digits-flux [--patch [--backend torch]] [--steps 12] [--images 2]``

Loads a reference pipeline (``ditkern.zoo``), optionally patches it with the default (lossless) options, and
generates ``--images`` digits with ``--steps`` denoising steps at the pipeline's real token count (16x16 latent
tokens, plus the class tokens for FLUX), after one untimed warm-up generation. It prints the patch report and the
CPU seconds of the process per generation (one torch thread unless ``--threads``). Time it as a whole process
(``/usr/bin/time -v``), the patched run against the unpatched one in alternation, or pass ``--ab``: the same
process then times unpatched and patched generations in turn
(``--repeats`` pairs, the order alternating within them) and prints the median ratio, a same-run baseline.

``--pipeline tiny-flux`` / ``tiny-dit`` / ``tiny-nucleusmoe`` / ``tiny-hidream`` / ``tiny-sana`` use the random tiny
transformers of the tests (``tests/patch/tiny.py``, ``tiny_image.py``, ``tests/moe/tiny_hidream.py``,
``tests/attention/test_sana.py`` geometry, rebuilt here so the benchmark does not import the tests), one forward per
step; ``--wide`` builds the MoE / Sana ones at width 512 (8-16 heads, 256-1024 image tokens, batch 1) instead.
``--dtype bfloat16`` casts the tiny models (the dtype a DiT is served in).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TINY = ("tiny-flux", "tiny-dit", "tiny-nucleusmoe", "tiny-hidream", "tiny-sana")


def _nucleusmoe(wide: bool):
    from diffusers import NucleusMoEImageTransformer2DModel  # noqa: PLC0415

    heads, head_dim, kv, text, rope, experts, hidden, ratio = (
        (8, 64, 2, 64, (16, 24, 24), 8, 512, 4.0) if wide else (2, 16, 1, 24, (4, 6, 6), 4, 16, 8.0)
    )  # fmt: skip
    model = NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=16, num_layers=2 if wide else 3, attention_head_dim=head_dim,
        num_attention_heads=heads, num_key_value_heads=kv, joint_attention_dim=text, axes_dims_rope=rope,
        mlp_ratio=ratio, dense_moe_strategy="leave_first_block_dense", num_experts=experts,
        moe_intermediate_dim=hidden, capacity_factors=2.0,
    )  # fmt: skip
    for p in model.parameters():  # SwiGLUExperts' packed weights are allocated with torch.empty
        if p.dim() == 3:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    (h, w, T), B = ((16, 16, 16), 1) if wide else ((3, 5, 6), 2)
    inputs = dict(
        hidden_states=torch.randn(B, h * w, 16), img_shapes=[(1, h, w)] * B,
        encoder_hidden_states=torch.randn(B, T, text), encoder_hidden_states_mask=torch.ones(B, T, dtype=torch.bool),
        timestep=torch.tensor([0.3, 0.7][:B]),
    )  # fmt: skip
    return model, inputs


def _hidream(wide: bool):
    from diffusers import HiDreamImageTransformer2DModel  # noqa: PLC0415

    heads, head_dim, t5, llama, temb, rope, size, B = (
        (8, 64, 64, 64, 64, (32, 16, 16), 32, 1) if wide else (2, 16, 24, 20, 16, (8, 4, 4), 8, 2)
    )  # fmt: skip
    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, caption_channels=[t5, llama], text_emb_dim=temb, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=rope, max_resolution=(2 * size, 2 * size), llama_layers=[0, 1],
    )  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(B, 4, size, size), timesteps=torch.tensor([300.0, 700.0][:B]),
        encoder_hidden_states_t5=torch.randn(B, 5, t5), encoder_hidden_states_llama3=torch.randn(2, B, 3, llama),
        pooled_embeds=torch.randn(B, temb),
    )  # fmt: skip
    return model, inputs


def _sana(wide: bool):
    from diffusers import SanaTransformer2DModel  # noqa: PLC0415

    heads, head_dim, cross, caption, size, B = (16, 32, 512, 64, 32, 1) if wide else (2, 16, 32, 24, 8, 2)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=2,
        num_cross_attention_heads=heads, cross_attention_head_dim=head_dim, cross_attention_dim=cross,
        caption_channels=caption, sample_size=size, patch_size=1,
    )  # fmt: skip
    inputs = dict(hidden_states=torch.randn(B, 4, size, size), encoder_hidden_states=torch.randn(B, 5, caption),
                  timestep=torch.tensor([300, 700][:B]))  # fmt: skip
    return model, inputs


def _tiny(name: str, wide: bool = False):
    """A random tiny transformer and one call's inputs (the geometry of the tests' tiny models, or ``wide``)."""
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel  # noqa: PLC0415

    torch.manual_seed(0)
    families = {"tiny-nucleusmoe": _nucleusmoe, "tiny-hidream": _hidream, "tiny-sana": _sana}
    if name in families:
        model, inputs = families[name](wide)
        return model.eval(), inputs
    if name == "tiny-flux":
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
        ).eval()  # fmt: skip
        grid = torch.meshgrid(torch.zeros(1), torch.arange(6.0), torch.arange(6.0), indexing="ij")
        inputs = dict(
            hidden_states=torch.randn(2, 36, 8), encoder_hidden_states=torch.randn(2, 5, 24),
            pooled_projections=torch.randn(2, 16), timestep=torch.tensor([0.3, 0.7]),
            img_ids=torch.stack(grid, -1).reshape(-1, 3), txt_ids=torch.zeros(5, 3),
        )  # fmt: skip
        return model, inputs
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1001, norm_type="ada_norm_zero",
    ).eval()  # fmt: skip
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([300, 700]),
                  class_labels=torch.tensor([3, 1000]))  # fmt: skip
    return model, inputs


def build(name: str, steps: int, images: int, wide: bool = False, dtype: torch.dtype = torch.float32):
    """``(target to patch, run())``: ``run`` does one timed unit of work (a generation, or ``steps`` forwards)."""
    if name in TINY:
        model, inputs = _tiny(name, wide)
        model = model.to(dtype)
        inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}

        def run():
            with torch.no_grad():
                for _ in range(steps):
                    model(**inputs, return_dict=False)

        return model, run
    import ditkern.zoo as zoo  # noqa: PLC0415

    pipe = zoo.load(name)
    classes, seeds = [i % 10 for i in range(images)], list(range(images))

    def run():
        zoo.generate(pipe, classes, seeds, num_inference_steps=steps)

    return pipe, run


def _seconds(run) -> float:
    """CPU seconds of this process for one ``run()`` (one torch thread by default: compute time, less disturbed by
    other processes on a shared machine than wall time)."""
    t0 = time.process_time()
    run()
    return time.process_time() - t0


def main(argv=None) -> None:
    import ditkern  # noqa: PLC0415
    import ditkern.zoo as zoo  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m bench.cpu_lossless", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="digits-flux", choices=(*zoo.NAMES, *TINY))
    ap.add_argument("--patch", action="store_true", help="patch with the default (lossless) options")
    ap.add_argument("--backend", default=None, help="the patch's backend (default: auto; 'torch': the fp32 reference, "
                    "what the lossless patch ran on CPU before it kept the native ops)")
    ap.add_argument("--ab", action="store_true", help="time unpatched and patched in turn in this process")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--images", type=int, default=2, help="digits per generation (zoo pipelines)")
    ap.add_argument("--repeats", type=int, default=5, help="timed generations (--ab: pairs)")
    ap.add_argument("--wide", action="store_true", help="tiny-nucleusmoe / tiny-hidream / tiny-sana at width 512")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the tiny models' dtype")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the zoo's measured setting)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if (args.wide or args.dtype != "float32") and args.pipeline not in TINY:
        ap.error(f"--wide / --dtype apply to the tiny models ({', '.join(TINY)}), not --pipeline {args.pipeline}")
    if args.wide and args.pipeline in ("tiny-flux", "tiny-dit"):
        ap.error("--wide applies to tiny-nucleusmoe / tiny-hidream / tiny-sana")
    target, run = build(args.pipeline, args.steps, args.images, args.wide, getattr(torch, args.dtype))
    if args.ab:
        report = ditkern.patch(target, backend=args.backend)
        print(report)
        ditkern.unpatch(target)
        run()  # warm-up
        ratios, base, fused = [], [], []

        def patched_run():
            with ditkern.patched(target, backend=args.backend):
                run()  # a patched warm-up: the first call of a patched forward pays its one-off costs
                return _seconds(run)

        for i in range(args.repeats):  # the order alternates within the pairs, so neither side always goes first
            if i % 2:
                fused.append(patched_run())
                base.append(_seconds(run))
            else:
                base.append(_seconds(run))
                fused.append(patched_run())
            ratios.append(base[-1] / fused[-1])
        print(f"{args.pipeline}: unpatched {statistics.median(base):.3f} s, patched {statistics.median(fused):.3f} s "
              f"CPU per run (median of {args.repeats}); speed ratio unpatched/patched median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")  # fmt: skip
        return
    if args.patch:
        print(ditkern.patch(target, backend=args.backend))
    run()  # warm-up
    times = [_seconds(run) for _ in range(args.repeats)]
    print(f"{args.pipeline} {'patched' if args.patch else 'unpatched'}: {statistics.median(times):.3f} s CPU per run "
          f"(median of {args.repeats})")  # fmt: skip


if __name__ == "__main__":
    main()
