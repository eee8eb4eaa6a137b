"""Fit a rank-4 LoRA on digits-flux that mirrors the digits, on the CPU, in about a minute; save it in diffusers' LoRA
format (the file ``tests/quant/test_lora.py`` loads into a quantized pipeline).

    python -m ditkern.zoo.fit_lora                       # -> tests/quant/data/digits_flux_mirror_lora.safetensors
    python -m ditkern.zoo.fit_lora --out DIR --steps 300 # + DIR/digits_flux_mirror_lora.json (what it measured)

The task: the base model was trained on the digits as they are; the LoRA is fitted with the same flow-matching loss
(:func:`ditkern.zoo.train.train_flux`: ``v = noise - x0`` at the pipeline's shifted timesteps, the class as its fixed
conditioning) on the digits flipped left to right, for 80% of them; the other 20% (a fixed permutation) are held
out. What it measures, base model vs base + LoRA: the loss on the held-out flipped digits (fixed noise and timesteps),
and, on images generated at the default sampler, how often the classifier (trained on unflipped digits) reads the
asked-for class in the image flipped back (a mirrored digit is read correctly once flipped back).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "..", "tests", "quant", "data")
WEIGHT_NAME = "digits_flux_mirror_lora.safetensors"
#: attention projections of both streams and the single blocks' MLP input: 38,912 parameters at rank 4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp"]
RANK = 4
STEPS = 300
BATCH = 32
LR = 2e-3
SEED = 0
HELD_OUT = 0.2


def _flow_batch(z, labels, gen, mu):
    """(packed noisy latents, targets, sigmas, labels) of one flow-matching batch of the latents ``z [B, C, H, W]``."""
    from diffusers import FluxPipeline

    b, c, h, w = z.shape
    x0 = FluxPipeline._pack_latents(z, b, c, h, w)
    noise = torch.randn(x0.shape, generator=gen)
    u = torch.rand(b, generator=gen).clamp(1e-4, 1 - 1e-4)
    sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # the pipeline's exponential time shift of u
    xt = torch.lerp(x0, noise, sigma[:, None, None])
    return xt, noise - x0, sigma, labels


def _velocity(model, xt, sigma, labels, tables, ids):
    prompt, pooled = tables
    return model(hidden_states=xt, encoder_hidden_states=prompt[labels], pooled_projections=pooled[labels],
                 timestep=sigma, img_ids=ids[0], txt_ids=ids[1], return_dict=False)[0]  # fmt: skip


def mirror_accuracy(pipe, seeds=range(20)) -> dict[str, float]:
    """Class accuracy of generated digits (image ``i`` asked for class ``i % 10``) as they are and flipped back."""
    from . import classifier, generate

    classes = [s % data.NUM_CLASSES for s in seeds]
    images = generate(pipe, classes, list(seeds))
    return {"as_generated": classifier.accuracy(images, classes),
            "flipped_back": classifier.accuracy(images.flip(-1), classes)}  # fmt: skip


def fit(steps: int = STEPS, out_dir: str = DEFAULT_OUT) -> dict:
    import peft
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from peft.utils import get_peft_model_state_dict

    from . import load, train

    pipe = load("digits-flux")
    model = pipe.transformer
    vae = train.load_vae()
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor
    x, y = data.digits()
    with torch.no_grad():
        post = vae.encode(x.flip(-1)).latent_dist  # the mirrored digits
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    n_test = int(HELD_OUT * len(x))
    test, tr = perm[:n_test], perm[n_test:]
    tables = train.flux_class_table()
    h = data.IMAGE_SIZE // 2
    ids = (FluxPipeline._prepare_latent_image_ids(1, h // 2, h // 2, "cpu", torch.float32),
           torch.zeros(train.FLUX_TEXT_TOKENS, 3))  # fmt: skip
    cfg = train.FLUX_SCHEDULER
    mu = calculate_shift((h // 2) ** 2, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"],
                         cfg["max_shift"])  # fmt: skip
    held_out = _flow_batch((post.mean[test] - shift) * sf, y[test], torch.Generator().manual_seed(SEED + 1), mu)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            xt, target, sigma, labels = held_out
            return F.mse_loss(_velocity(model, xt, sigma, labels, tables, ids), target).item()

    result = {"base": {"held_out_loss": held_out_loss(), **mirror_accuracy(pipe)}}
    torch.manual_seed(SEED)
    model.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS), adapter_name="mirror")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    model.train()
    bar = tqdm(range(steps), desc="fit LoRA (mirrored digits)")
    for step in bar:
        idx = tr[torch.randint(0, len(tr), (BATCH,), generator=gen)]
        z = (post.mean[idx] + post.std[idx] * torch.randn(post.mean[idx].shape, generator=gen) - shift) * sf
        xt, target, sigma, labels = _flow_batch(z, y[idx], gen, mu)
        loss = F.mse_loss(_velocity(model, xt, sigma, labels, tables, ids), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:  # linear decay to 0
            g["lr"] = LR * (1 - (step + 1) / steps)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = time.time() - t0
    result["lora"] = {"held_out_loss": held_out_loss(), **mirror_accuracy(pipe)}
    sd = {k: v.detach().to(torch.float16).contiguous()
          for k, v in get_peft_model_state_dict(model, adapter_name="mirror").items()}  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    FluxPipeline.save_lora_weights(out_dir, transformer_lora_layers=sd, weight_name=WEIGHT_NAME)
    result.update(steps=steps, batch=BATCH, lr=LR, rank=RANK, targets=TARGETS, seconds=round(seconds, 1),
                  threads=torch.get_num_threads(), parameters=sum(v.numel() for v in sd.values()),
                  file_bytes=os.path.getsize(os.path.join(out_dir, WEIGHT_NAME)))  # fmt: skip
    with open(os.path.join(out_dir, WEIGHT_NAME.replace(".safetensors", ".json")), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="directory of the .safetensors and its .json")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(fit(args.steps, os.path.abspath(args.out)), indent=1))


if __name__ == "__main__":
    main()
