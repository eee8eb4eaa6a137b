"""The fidelity metrics on inputs whose answer is known, and the result table."""

import math

import torch

from ditkern.zoo import fidelity


def test_identical_images_have_infinite_psnr_and_zero_error():
    a = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(fidelity.psnr(a, a.clone())).all()
    assert math.isinf(fidelity.pooled_psnr(a, a.clone()))
    assert fidelity.max_abs_error(a, a.clone()) == 0.0


def test_known_noise_level_gives_expected_psnr():
    # A +-sigma checkerboard has MSE sigma^2 exactly, so PSNR = -20 log10(sigma) for a peak of 1.
    a = torch.full((3, 1, 32, 32), 0.5, dtype=torch.float64)  # float64 so b - a is exactly +-sigma
    for sigma in (0.1, 0.01, 1e-3):
        sign = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 2 - 1
        b = a + sigma * sign
        expected = -20 * math.log10(sigma)
        assert torch.allclose(fidelity.psnr(b, a), torch.full((3,), expected, dtype=torch.float64), atol=1e-6)
        assert abs(fidelity.pooled_psnr(b, a) - expected) < 1e-6
        assert abs(fidelity.max_abs_error(b, a) - sigma) < 1e-6


def test_gaussian_noise_psnr_close_to_theory():
    g = torch.Generator().manual_seed(0)
    a = torch.full((10, 1, 64, 64), 0.5)
    b = a + 0.05 * torch.randn(a.shape, generator=g)
    assert abs(fidelity.pooled_psnr(b, a) - (-20 * math.log10(0.05))) < 0.1  # 26.02 dB


def test_worst_image_is_the_noisiest():
    a = torch.zeros(3, 1, 8, 8, dtype=torch.float64)
    b = a.clone()
    b[1] += 0.1
    b[2] += 0.01
    p = fidelity.psnr(b, a)
    assert math.isinf(p[0]) and abs(p[1] - 20) < 1e-9 and abs(p[2] - 40) < 1e-9
    assert p.min().item() == p[1].item()


def test_table_formats_rows():
    r = fidelity.FidelityResult(
        pipeline="digits-dit", setting="x", num_images=10, sampler={"num_inference_steps": 20},
        seconds_unpatched=2.0, seconds_patched=1.0, psnr_db=math.inf, psnr_worst_db=math.inf, max_abs_err=0.0,
        accuracy_unpatched=0.9, accuracy_patched=0.9,
    )
    t = fidelity.FidelityTable([r, r])
    text = str(t)
    assert "speedup" in text and "2.00x" in text and "inf" in text and "90%" in text
    assert len(text.splitlines()) == 4
    d = r.to_dict()
    assert d["speedup"] == 2.0 and "images_patched" not in d
