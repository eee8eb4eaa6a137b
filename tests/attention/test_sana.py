"""The Sana family: linear attention through ditkern's kernel + fused adaLN, patched == unpatched within the
STYLE.md rule, unpatch bit-exact, and windowed attention is reported as unavailable (Sana has no softmax attention
over the image)."""

import copy
from collections import Counter

import torch

import ditkern


def tiny_sana(batch=2):
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        sample_size=8, patch_size=1,
    )  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 8, 8),
        encoder_hidden_states=torch.randn(batch, 5, 24),
        timestep=torch.tensor([300, 700][:batch]),
    )
    return model.eval(), inputs


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_sana_patch_matches_unpatched_and_unpatch_is_exact():
    model, inputs = tiny_sana()
    ref64 = _run(copy.deepcopy(model).double(), {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    before = _run(model, inputs)
    procs = [b.attn1.processor for b in model.transformer_blocks]
    assert "SanaTransformer2DModel" in ditkern.supported_models()
    report = ditkern.patch(model, backend="triton")
    assert Counter(r.cls for r in report.patched) == {"SanaTransformerBlock": 2, "Attention": 2}, str(report)
    assert not report.skipped, str(report)
    out = _run(model, inputs)
    err_unpatched = (before.double() - ref64).abs().max().item()
    assert (out.double() - ref64).abs().max().item() <= 2 * err_unpatched + 1e-5
    ditkern.unpatch(model)
    assert [b.attn1.processor for b in model.transformer_blocks] == procs
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in model.modules())
    assert torch.equal(_run(model, inputs), before)


def test_sana_window_attention_is_reported_unavailable():
    model, _ = tiny_sana()
    report = ditkern.patch(model, attention=ditkern.WindowAttention(window=3), backend="torch")
    assert any("not available for family 'sana'" in r.reason for r in report.skipped), str(report)
    ditkern.unpatch(model)
