"""The shipped reference pipelines load offline, reproduce stored samples, and draw the digits they are asked for."""

import json
import os

import pytest
import torch

import ditkern.zoo as zoo
from ditkern.zoo import classifier, make_refs

REFS = os.path.join(os.path.dirname(__file__), "data", "reference_samples.safetensors")

# Max abs difference allowed against the stored samples (images in [0, 1]). The stored samples were made on one
# machine (float32, CPU, 1 thread); another BLAS, CPU or thread count changes matmul summation order, i.e. float32
# rounding (~1e-7 relative), which 8 sampler steps and the VAE decoder amplify (measured, 2 threads against the
# stored 1-thread samples: 1.9e-6 for digits-dit, 7e-7 for digits-flux). Other CPUs and torch versions (other kernels)
# can differ more, so the tolerance leaves a wide margin; 1e-2 is still far below what a wrong weight, config or
# scheduler does (> 0.1 on these images).
REF_ATOL = 1e-2

# Class accuracy (per the digit classifier) of 10 samples (seeds 0-9, one of each digit) at the default sampler
# settings must reach the 100-sample baseline (zoo.BASELINE_ACCURACY, 100% for both) less a margin of 1 of the 10
# images, so a borderline digit flipped by another machine's float rounding does not fail the suite.
MIN_ACCURACY = {name: zoo.BASELINE_ACCURACY[name] - 0.10 for name in zoo.NAMES}


def test_paths_hold_diffusers_layout():
    for name in zoo.NAMES:
        p = zoo.path(name)
        with open(os.path.join(p, "model_index.json")) as f:
            index = json.load(f)
        assert index["_class_name"] == {"dit": "DiTPipeline", "flux": "FluxPipeline"}[zoo.architecture(name)]
        assert os.path.exists(os.path.join(p, "transformer", "diffusion_pytorch_model.safetensors"))
        assert os.path.exists(os.path.join(p, "vae", "diffusion_pytorch_model.safetensors"))


def test_plain_diffusers_loading_offline():
    from diffusers import DiTPipeline, FluxPipeline

    dit = DiTPipeline.from_pretrained(zoo.path("digits-dit"), local_files_only=True)
    assert dit.transformer.config.num_embeds_ada_norm >= 1000  # null class 1000 has a row
    assert dit.transformer.config.out_channels == 2 * dit.transformer.config.in_channels
    flux = FluxPipeline.from_pretrained(zoo.path("digits-flux"), text_encoder=None, tokenizer=None,
                                        text_encoder_2=None, tokenizer_2=None, local_files_only=True)
    cfg = flux.transformer.config
    assert cfg.num_layers >= 1 and cfg.num_single_layers >= 1 and not cfg.guidance_embeds
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert flux.vae.config.shift_factor is not None


def test_token_grids():
    dit, flux = zoo.load("digits-dit"), zoo.load("digits-flux")
    c = dit.transformer.config
    assert c.sample_size // c.patch_size >= 16  # DiT: a 16x16 image-token grid
    assert flux.transformer.config.in_channels == 4 * flux.vae.config.latent_channels  # 2x2 packing


def test_generate_shape_range_and_batch_independence(pipe):
    a = zoo.generate(pipe, [1, 5], [3, 4], num_inference_steps=4)
    b = zoo.generate(pipe, [5], [4], num_inference_steps=4)
    assert a.shape == (2, 1, 32, 32) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert (a[1:] - b).abs().max() < 1e-4  # per-image generators: an image does not depend on its batch


def test_reproduces_reference_samples(pipe):
    from safetensors import safe_open
    from safetensors.torch import load_file

    refs = load_file(REFS)
    with safe_open(REFS, "pt") as f:
        meta = f.metadata()
    name = zoo.name_of(pipe)
    settings = json.loads(meta["settings"])[name]
    out = zoo.generate(pipe, json.loads(meta["classes"]), json.loads(meta["seeds"]), **settings)
    assert json.loads(meta["classes"]) == make_refs.REF_CLASSES
    err = (out - refs[name]).abs().max().item()
    assert err <= REF_ATOL, f"{name}: max abs error {err:.2e} against the stored reference samples"


def test_class_accuracy_at_default_settings(pipe):
    name = zoo.name_of(pipe)
    seeds = list(range(10))
    classes = [s % 10 for s in seeds]
    acc = classifier.accuracy(zoo.generate(pipe, classes, seeds), classes)
    assert acc >= MIN_ACCURACY[name], f"{name}: class accuracy {acc:.0%}"


def test_every_pipeline_has_defaults_and_a_baseline():
    assert set(zoo.FAST_NAMES) | set(zoo.DEEP_NAMES) == set(zoo.NAMES)
    assert set(zoo.NAMES) == set(zoo.DEFAULTS) == set(zoo.BASELINE_ACCURACY)


@pytest.mark.parametrize("name", zoo.DEEP_NAMES)
def test_deep_pipelines_load_and_generate(name):
    """The deep pipelines (kept out of the per-pipeline tests for CI time): realistic depth, one image at 2 steps."""
    pipe = zoo.load(name)
    cfg = pipe.transformer.config
    if zoo.architecture(name) == "dit":
        assert len(pipe.transformer.transformer_blocks) == cfg.num_layers >= 16
    else:
        assert cfg.num_layers >= 1 and cfg.num_single_layers >= 1  # FLUX-style: double and single blocks
        assert len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks) >= 16
        assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    out = zoo.generate(pipe, [7], [0], num_inference_steps=2)
    assert out.shape == (1, 1, 32, 32) and 0 <= out.min() and out.max() <= 1 and out.std() > 0


def test_flux_class_embeds():
    p, q = zoo.class_embeds([0, 9, None])
    assert p.shape[0] == q.shape[0] == 3
    assert not torch.equal(p[0], p[1]) and not torch.equal(p[1], p[2])
    with pytest.raises(ValueError):
        zoo.class_embeds([11])
    deep = zoo.class_embeds([0, 9, None], name="digits-flux-deep")  # the deep pipeline ships the same table
    assert torch.equal(deep[0], p) and torch.equal(deep[1], q)



def test_load_is_quiet(capfd):
    """A zoo load prints nothing: no accelerate advice, no loading bar (checked here on a load in this process), and
    transformers' once-per-process torchvision fallback warning is quietened while it loads (its logger at ERROR)."""
    import logging

    log = logging.getLogger("transformers.utils.import_utils")
    level = log.level
    with zoo._quiet_load():
        assert log.getEffectiveLevel() == logging.ERROR
    assert log.level == level
    capfd.readouterr()
    zoo.load("digits-dit")
    out, err = capfd.readouterr()
    assert out == "" and err == "", err
