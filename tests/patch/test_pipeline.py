"""ditkern.patch on a real diffusers pipeline object (a tiny DiTPipeline built from config with random weights)."""

import torch

import ditkern


def _tiny_dit_pipeline():
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1001, norm_type="ada_norm_zero",
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=4, norm_num_groups=4, sample_size=8,
    ).eval()  # fmt: skip
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DPMSolverMultistepScheduler())


def _sample(pipe):
    g = torch.Generator().manual_seed(1)
    return pipe(class_labels=[1, 7], num_inference_steps=3, generator=g, output_type="np").images


def test_patch_pipeline_object():
    pipe = _tiny_dit_pipeline()
    before = _sample(pipe)
    report = ditkern.patch(pipe, backend="triton")
    assert {r.module.split(".")[0] for r in report.patched} == {"transformer"}
    assert any(r.cls == "BasicTransformerBlock" for r in report.patched)
    assert ditkern.is_patched(pipe)
    patched = _sample(pipe)
    assert abs(patched - before).max() < 1e-3  # fp32 model: the fused path differs only by fp32 rounding
    ditkern.unpatch(pipe)
    assert not ditkern.is_patched(pipe)
    assert (_sample(pipe) == before).all()
