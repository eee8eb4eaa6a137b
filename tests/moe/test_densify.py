"""ditkern.moe.densify_to_moe: top_k == num_experts reproduces the dense FFN; fewer experts keep a useful router;
bad inputs give errors naming the argument."""

import pytest
import torch
from torch import nn

from ditkern.moe import densify_to_moe
from ditkern.moe.densify import dense_parameters


def _feedforward(dim=32, mult=4):
    from diffusers.models.attention import FeedForward

    return FeedForward(dim, mult=mult, activation_fn="gelu-approximate").eval()  # DiT / PixArt / FLUX FFN


def _hidream_ffn(dim=32):
    from diffusers.models.transformers.transformer_hidream_image import HiDreamImageFeedForwardSwiGLU

    return HiDreamImageFeedForwardSwiGLU(dim, 4 * dim, multiple_of=16).eval()


FFNS = {
    "feedforward_gelu_tanh": (_feedforward, 32),
    "hidream_swiglu": (_hidream_ffn, 32),
    "sequential_gelu_F_not_multiple": (lambda: nn.Sequential(nn.Linear(24, 50), nn.GELU(), nn.Linear(50, 24)), 24),
}


@pytest.mark.parametrize("name", sorted(FFNS))
@pytest.mark.parametrize("E", [4, 8])
def test_all_experts_equal_the_dense_ffn(name, E):
    make, D = FFNS[name]
    ffn = make()
    calib = torch.randn(3, 40, D)
    moe = densify_to_moe(ffn, E, E, calib, block_m=16, backend="triton")
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        expected, got = ffn(x), moe(x)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)  # float reassociation only
    groups = torch.cat(moe.neuron_groups).sort().values
    assert torch.equal(groups, torch.arange(groups.numel()))  # every dense neuron in exactly one expert


def test_fitted_router_matches_the_oracle_and_beats_random_routing():
    """Tokens from a few clusters: the fitted router picks experts as well as an oracle that knows each expert's true
    contribution norm for every token, and much better than random routing of the same experts."""
    torch.manual_seed(0)
    D, E, K, n = 32, 8, 2, 500
    ffn = _feedforward(D)
    centers = torch.randn(6, D) * 2

    def tokens(m):
        return centers[torch.randint(0, 6, (m,))] + 0.3 * torch.randn(m, D)

    calib = tokens(2000)
    moe = densify_to_moe(ffn, E, K, calib, block_m=16, backend="torch", compensate=False)
    x = tokens(n)  # held out
    with torch.no_grad():
        dense = ffn(x)
        err = ((moe(x) - dense).norm() / dense.norm()).item()
        h = torch.nn.functional.gelu(x @ moe.w1.transpose(1, 2) + moe.b1[:, None, :], approximate="tanh")  # [E, n, F]
        contrib = torch.einsum("enf,edf->end", h, moe.w2)  # [E, n, D]
        best = contrib.norm(dim=2).t().topk(K, dim=1).indices  # [n, K]
        oracle = moe.out_bias + sum(contrib[best[:, j], torch.arange(n)] for j in range(K))
        err_oracle = ((oracle - dense).norm() / dense.norm()).item()
        moe.router.weight.copy_(torch.randn_like(moe.router.weight))
        moe.router.bias.zero_()
        err_random = ((moe(x) - dense).norm() / dense.norm()).item()
    assert err <= 1.05 * err_oracle, (err, err_oracle)
    assert err < 0.8 * err_random, (err, err_random)
    # compensating skipped experts with their mean output lowers the error further, at top_k = E exactness kept
    comp = densify_to_moe(ffn, E, K, calib, block_m=16, backend="torch", compensate=True)
    with torch.no_grad():
        err_comp = ((comp(x) - dense).norm() / dense.norm()).item()
    assert err_comp < err, (err_comp, err)


def test_activated_parameters():
    ffn = _feedforward(32)
    moe = densify_to_moe(ffn, 8, 2, torch.randn(64, 32), backend="torch", compensate=True)
    dense = dense_parameters(ffn)
    assert dense == 32 * 128 * 2 + 128 + 32
    # router (D + 1) x E, two experts (w1, b1, w2 and the compensation bias b2), the output bias
    assert moe.activated_parameters() == (32 + 1) * 8 + 2 * (2 * 32 * 16 + 16 + 32) + 32
    assert moe.activated_parameters() < 0.35 * dense


def test_errors_name_the_argument():
    ffn = _feedforward(32)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_experts=4\]"):
        densify_to_moe(ffn, 4, 5, torch.randn(10, 32))
    with pytest.raises(ValueError, match="num_experts must be an int"):
        densify_to_moe(ffn, 0, 1, torch.randn(10, 32))
    with pytest.raises(ValueError, match=r"calibration_inputs must be a tensor \[..., D=32\]"):
        densify_to_moe(ffn, 4, 2, torch.randn(10, 31))
    with pytest.raises(ValueError, match="is not a supported dense FFN"):
        densify_to_moe(nn.Linear(32, 32), 4, 2, torch.randn(10, 32))
