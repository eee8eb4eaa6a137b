"""Train ditkern's reference pipelines on scikit-learn's digits, on the CPU, reproducibly.

    python -m ditkern.zoo.train vae     # the shared AutoencoderKL          (~ minutes)
    python -m ditkern.zoo.train dit     # digits-dit  (needs the VAE)
    python -m ditkern.zoo.train flux    # digits-flux (needs the VAE)
    python -m ditkern.zoo.train all     # the three above
    python -m ditkern.zoo.train dit-deep    # digits-dit-deep  (16 DiT blocks, narrower)
    python -m ditkern.zoo.train flux-deep   # digits-flux-deep (4 double + 12 single blocks, narrower)

Everything runs on one CPU thread with fixed seeds. The VAE is saved to ``pipelines/_vae`` (float32, not shipped
with the package, see ``.gitignore``); each pipeline is saved with ``save_pretrained`` into
``pipelines/<name>`` (``digits-dit``, ``digits-flux``, ``digits-dit-deep``, ``digits-flux-deep``) with float16
weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from . import data

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINES = os.path.join(HERE, "pipelines")
VAE_DIR = os.path.join(PIPELINES, "_vae")

SEED = 0

# ----------------------------------------------------------------------------------------------------------------- VAE

VAE_CONFIG = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=data.IMAGE_SIZE,
    mid_block_add_attention=False,
)
VAE_STEPS = 1800
VAE_BATCH = 64
VAE_LR = 1e-3
VAE_KL_WEIGHT = 1e-3


def _log(f, msg):
    print(msg, flush=True)
    if f is not None:
        f.write(msg + "\n")
        f.flush()


def _cosine(step, total, warmup=100):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(steps: int = VAE_STEPS, log=None):
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    x_all, _ = data.digits()
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps))
    t0 = time.time()
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (VAE_BATCH,), generator=g)
        x = data.augment(x_all[idx], g, max_shift=1)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = mse + VAE_KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            _log(log, f"vae step {step:5d} mse {mse.item():.5f} kl {kl.item():.3f} t {time.time() - t0:.0f}s")
    vae.eval()
    # Latent statistics set the diffusion-side normalisation: FluxPipeline decodes latents / scaling + shift,
    # DiTPipeline decodes latents / scaling (and ignores shift_factor).
    with torch.no_grad():
        post = vae.encode(x_all).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        shift = z.mean().item()
        scale = 1.0 / (z - shift).std().item()
        rec = vae.decode(post.mean).sample
        rec_mse = F.mse_loss(rec, x_all).item()
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    vae.save_pretrained(VAE_DIR)
    stats = dict(steps=steps, seconds=time.time() - t0, recon_mse=rec_mse, scaling_factor=scale, shift_factor=shift)
    with open(os.path.join(VAE_DIR, "train_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    _log(log, f"vae done {stats}")
    _save_grid(torch.cat([x_all[:32], rec[:32]]), os.path.join(PIPELINES, "_vae_recon.png"), nrow=16)
    return vae


def load_vae():
    """The float32 VAE from ``train vae``; without it, the float16 copy shipped in digits-dit (upcast; retraining
    then is not bit-identical to the shipped weights, which came from the float32 VAE)."""
    from diffusers import AutoencoderKL

    if not os.path.isdir(VAE_DIR):
        print(f"{VAE_DIR} not found (run `train vae`); using the VAE shipped in digits-dit", flush=True)
        return AutoencoderKL.from_pretrained(os.path.join(PIPELINES, "digits-dit", "vae"), torch_dtype=torch.float32).eval()
    return AutoencoderKL.from_pretrained(VAE_DIR).eval()



def _encoded_digits(vae):
    """Posterior mean and std of every digit's latent, and the labels (for resampling latents every step)."""
    x_all, y_all = data.digits()
    with torch.no_grad():
        post = vae.encode(x_all).latent_dist
    return post.mean, post.std, y_all


def _fp16_copy(module):
    import copy

    return copy.deepcopy(module).to(torch.float16)


# ----------------------------------------------------------------------------------------------------------------- DiT

DIT_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=VAE_CONFIG["latent_channels"],
    out_channels=2 * VAE_CONFIG["latent_channels"],  # learned-sigma layout; the second half stays zero (see below)
    num_layers=4,
    sample_size=data.IMAGE_SIZE // 2,
    patch_size=1,  # 16x16 latent -> a 16x16 token grid
    num_embeds_ada_norm=1000,  # 1000 labels + the null label 1000 that DiTPipeline uses for guidance
)
DIT_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
DIT_STEPS = 2200
DIT_BATCH = 32
DIT_LR = 5e-4
DIT_LABEL_DROPOUT = 0.1  # class labels dropped to the null label 1000 while training (classifier-free guidance)

#: digits-dit-deep: the same recipe at realistic depth (16 blocks), narrower (4 heads x 16) and with 2x2 patches (an
#: 8x8 token grid, like DiT-XL/2 and like Flux's packing) so that it trains on one CPU thread in about 20 minutes.
#: Trained 2000 steps (887 s on one thread): 95% class accuracy at the default sampler (1100 steps gave 77%).
DIT_DEEP_CONFIG = dict(DIT_CONFIG, num_layers=16, attention_head_dim=16, patch_size=2)
DIT_DEEP_STEPS = 2000

#: Each DiT pipeline: its transformer config, default training steps, batch and learning rate.
DIT_PIPELINES = {
    "digits-dit": dict(config=DIT_CONFIG, steps=DIT_STEPS, batch=DIT_BATCH, lr=DIT_LR),
    "digits-dit-deep": dict(config=DIT_DEEP_CONFIG, steps=DIT_DEEP_STEPS, batch=DIT_BATCH, lr=DIT_LR),
}


def train_dit(steps: int | None = None, log=None, name: str = "digits-dit"):
    from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    spec = DIT_PIPELINES[name]
    DIT_CONFIG, DIT_BATCH, DIT_LR = spec["config"], spec["batch"], spec["lr"]  # noqa: N806 (the shallow names)
    steps = spec["steps"] if steps is None else steps
    vae = load_vae()
    sf = vae.config.scaling_factor
    mean, std, labels = _encoded_digits(vae)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    model = DiTTransformer2DModel(**DIT_CONFIG)
    # adaLN-Zero initialisation (each block starts as the identity) and a zero output layer. Only the first
    # `in_channels` outputs (epsilon) get a loss, so the learned-sigma half keeps its zero weights: it stays 0.
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.norm1.linear.weight.zero_()
            block.norm1.linear.bias.zero_()
            # The table has the null row 1000 (built with dropout > 0), but each block's embedder would drop labels
            # independently in train mode; the loop below drops them once, consistently for all blocks.
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        model.proj_out_2.weight.zero_()
        model.proj_out_2.bias.zero_()
    noise_sched = DDPMScheduler(**DIT_SCHEDULER)
    opt = torch.optim.AdamW(model.parameters(), lr=DIT_LR, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps))
    c = DIT_CONFIG["in_channels"]
    t0 = time.time()
    model.train()  # LabelEmbedding drops labels to the null index only in train mode
    for step in range(steps):
        idx = torch.randint(0, len(mean), (DIT_BATCH,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, DIT_SCHEDULER["num_train_timesteps"], (DIT_BATCH,), generator=g)
        zt = noise_sched.add_noise(z, noise, t)
        y = labels[idx].clone()
        y[torch.rand(DIT_BATCH, generator=g) < DIT_LABEL_DROPOUT] = DIT_CONFIG["num_embeds_ada_norm"]
        out = model(zt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(out[:, :c], noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        if step % 100 == 0 or step == steps - 1 or step in (10, 25, 50):
            _log(log, f"{name} step {step:5d} loss {loss.item():.4f} t {time.time() - t0:.0f}s")
    seconds = time.time() - t0
    model.eval()
    scheduler = DPMSolverMultistepScheduler(**DIT_SCHEDULER)
    pipe = DiTPipeline(transformer=_fp16_copy(model), vae=_fp16_copy(vae), scheduler=scheduler)
    out_dir = os.path.join(PIPELINES, name)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _write_stats(out_dir, dict(steps=steps, batch=DIT_BATCH, lr=DIT_LR, train_seconds=round(seconds, 1),
                               **_arch_stats(name, DIT_CONFIG), vae=_vae_stats()))
    _log(log, f"{name} done in {seconds:.0f}s -> {out_dir}")
    _preview(name)


# ---------------------------------------------------------------------------------------------------------------- Flux

FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=4 * VAE_CONFIG["latent_channels"],  # FluxPipeline packs 2x2 latent patches into channels
    num_layers=2,  # double-stream (joint text-image) blocks
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,  # no guidance distillation: FluxPipeline then passes guidance=None
    axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim
)
FLUX_TEXT_TOKENS = 4
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
FLUX_STEPS = 2500
FLUX_BATCH = 48
FLUX_LR = 5e-4
FLUX_LABEL_DROPOUT = 0.1  # labels dropped to the null row 10 of the class table (true classifier-free guidance)
FLUX_EMBED_SEED = 1234
CLASS_EMBEDS_FILE = "class_embeds.safetensors"

#: digits-flux-deep: 4 double + 12 single blocks (16), narrower (4 heads x 16, RoPE axes 4 + 6 + 6); the same
#: conditioning widths, so the same class table as digits-flux.
FLUX_DEEP_CONFIG = dict(FLUX_CONFIG, num_layers=4, num_single_layers=12, attention_head_dim=16,
                        axes_dims_rope=(4, 6, 6))
FLUX_DEEP_STEPS = 900
FLUX_DEEP_BATCH = 32  # 48: ~2.3 s a step on one thread (beside the DiT run), only ~800 steps in the half-hour budget

#: Each Flux pipeline: its transformer config, default training steps, batch and learning rate.
FLUX_PIPELINES = {
    "digits-flux": dict(config=FLUX_CONFIG, steps=FLUX_STEPS, batch=FLUX_BATCH, lr=FLUX_LR),
    "digits-flux-deep": dict(config=FLUX_DEEP_CONFIG, steps=FLUX_DEEP_STEPS, batch=FLUX_DEEP_BATCH, lr=FLUX_LR),
}


def flux_class_table():
    """The fixed random per-class conditioning: rows 0-9 are the digits, row 10 the null (unconditional) class."""
    g = torch.Generator().manual_seed(FLUX_EMBED_SEED)
    n = data.NUM_CLASSES + 1
    prompt = torch.randn(n, FLUX_TEXT_TOKENS, FLUX_CONFIG["joint_attention_dim"], generator=g)
    pooled = torch.randn(n, FLUX_CONFIG["pooled_projection_dim"], generator=g)
    return prompt, pooled


def train_flux(steps: int | None = None, log=None, name: str = "digits-flux"):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from safetensors.torch import save_file

    spec = FLUX_PIPELINES[name]
    FLUX_CONFIG, FLUX_BATCH, FLUX_LR = spec["config"], spec["batch"], spec["lr"]  # noqa: N806 (the shallow names)
    assert (FLUX_CONFIG["joint_attention_dim"], FLUX_CONFIG["pooled_projection_dim"]) == (
        FLUX_PIPELINES["digits-flux"]["config"]["joint_attention_dim"],
        FLUX_PIPELINES["digits-flux"]["config"]["pooled_projection_dim"]), "flux_class_table uses the shallow widths"
    steps = spec["steps"] if steps is None else steps
    vae = load_vae()
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor
    mean, std, labels = _encoded_digits(vae)
    prompt_table, pooled_table = flux_class_table()
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    model = FluxTransformer2DModel(**FLUX_CONFIG)
    with torch.no_grad():
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    c, h = VAE_CONFIG["latent_channels"], data.IMAGE_SIZE // 2
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, h // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(FLUX_TEXT_TOKENS, 3)
    # The same exponential time shift FluxPipeline applies at inference for this many image tokens.
    mu = calculate_shift((h // 2) ** 2, FLUX_SCHEDULER["base_image_seq_len"], FLUX_SCHEDULER["max_image_seq_len"],
                         FLUX_SCHEDULER["base_shift"], FLUX_SCHEDULER["max_shift"])
    opt = torch.optim.AdamW(model.parameters(), lr=FLUX_LR, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps))
    t0 = time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(mean), (FLUX_BATCH,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g) - shift) * sf
        x0 = FluxPipeline._pack_latents(z, FLUX_BATCH, c, h, h)
        noise = torch.randn(x0.shape, generator=g)
        u = torch.rand(FLUX_BATCH, generator=g).clamp(1e-4, 1 - 1e-4)
        sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        y = labels[idx].clone()
        y[torch.rand(FLUX_BATCH, generator=g) < FLUX_LABEL_DROPOUT] = data.NUM_CLASSES
        v = model(hidden_states=xt, encoder_hidden_states=prompt_table[y], pooled_projections=pooled_table[y],
                  timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        if step % 100 == 0 or step == steps - 1 or step in (10, 25, 50):
            _log(log, f"{name} step {step:5d} loss {loss.item():.4f} t {time.time() - t0:.0f}s")
    seconds = time.time() - t0
    model.eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=_fp16_copy(vae),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=_fp16_copy(model))
    out_dir = os.path.join(PIPELINES, name)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    save_file({"prompt_embeds": prompt_table.contiguous(), "pooled_prompt_embeds": pooled_table.contiguous()},
              os.path.join(out_dir, CLASS_EMBEDS_FILE))
    _write_stats(out_dir, dict(steps=steps, batch=FLUX_BATCH, lr=FLUX_LR, train_seconds=round(seconds, 1),
                               **_arch_stats(name, FLUX_CONFIG), vae=_vae_stats()))
    _log(log, f"{name} done in {seconds:.0f}s -> {out_dir}")
    _preview(name)


def _arch_stats(name, config):
    """The architecture of the deep pipelines in their ditkern_train.json (the shallow ones keep their old record)."""
    if not name.endswith("-deep"):
        return {}
    keys = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "axes_dims_rope")
    return dict(config={k: config[k] for k in keys if k in config}, threads=torch.get_num_threads())


def _vae_stats():
    """The VAE's training record: from ``pipelines/_vae`` when it was trained here, else the one digits-dit ships."""
    own = os.path.join(VAE_DIR, "train_stats.json")
    if os.path.exists(own):
        return json.load(open(own))
    return dict(json.load(open(os.path.join(PIPELINES, "digits-dit", "ditkern_train.json")))["vae"],
                source="digits-dit/vae (float16, upcast)")


def _write_stats(out_dir, stats):
    with open(os.path.join(out_dir, "ditkern_train.json"), "w") as f:
        json.dump(stats, f, indent=1)


def _preview(name):
    """Four samples of every class at the default sampler settings, saved as pipelines/_<name>.png."""
    from . import NAMES, generate, load

    if name not in NAMES:
        print(f"{name} is not a shipped pipeline (ditkern.zoo.NAMES): no preview", flush=True)
        return
    pipe = load(name)
    classes = [c for c in range(data.NUM_CLASSES) for _ in range(4)]
    images = generate(pipe, classes, list(range(len(classes))))
    _save_grid(images * 2 - 1, os.path.join(PIPELINES, f"_{name}.png"), nrow=20)


def _save_grid(x, path, nrow=10):
    """Save ``[N, 1, H, W]`` images in [-1, 1] as one PNG grid (for looking at)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = (x.detach().float().clamp(-1, 1) + 1) / 2
    n, _, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.ones(rows * (h + 2), nrow * (w + 2))
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = x[i, 0]
    plt.imsave(path, canvas.numpy(), cmap="gray", vmin=0, vmax=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["vae", "dit", "flux", "dit-deep", "flux-deep", "all"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(PIPELINES, exist_ok=True)
    with open(os.path.join(PIPELINES, f"_train_{args.what}.log"), "a") as log:
        todo = ["vae", "dit", "flux"] if args.what == "all" else [args.what]
        for what in todo:
            arch, _, deep = what.partition("-")
            fn = globals()[f"train_{arch}"]
            kw = {} if args.steps is None else {"steps": args.steps}
            if arch != "vae":
                kw["name"] = f"digits-{what}"
            fn(log=log, **kw)


if __name__ == "__main__":
    main()
