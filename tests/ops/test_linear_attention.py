"""ditkern.ops.linear_attention: Triton (interpreter on CPU) and torch against the fp32/fp64 reference and against
diffusers' SanaLinearAttnProcessor2_0 itself, plus validation."""

import pytest
import torch

from ditkern.ops.linear_attention import linear_attention, linear_attention_ref

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _qkv(B, H, S, D, dtype, device, S_kv=None):
    # the [B, S, H, D] projections viewed as [B, H, S, D], as the processor hands them over (non-contiguous)
    q = torch.randn(B, S, H, D, device=device).to(dtype).transpose(1, 2)
    k, v = (torch.randn(B, S_kv or S, H, D, device=device).to(dtype).transpose(1, 2) for _ in range(2))
    return q, k, v


def _sana_eager(q, k, v):
    """Sana's processor arithmetic in the same dtype (relu, then fp32 matmuls on a ones-padded value)."""
    qf, kf, vf = torch.relu(q).float(), torch.relu(k).float(), v.float()
    vpad = torch.nn.functional.pad(vf.transpose(2, 3), (0, 0, 0, 1), value=1.0)  # [B, H, D+1, S]
    scores = vpad @ kf  # [B, H, D+1, D]
    out = scores @ qf.transpose(2, 3)  # [B, H, D+1, S]
    out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
    return out.transpose(2, 3).to(q.dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,S,D", [(2, 3, 77, 32), (1, 2, 130, 24), (1, 1, 5, 16)], ids=str)
def test_matches_reference(backend, dtype, B, H, S, D, device):
    q, k, v = _qkv(B, H, S, D, dtype, device)
    out = linear_attention(q, k, v, backend=backend)
    ref = linear_attention_ref(q.double(), k.double(), v.double())
    eager = _sana_eager(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert _err(out, ref) <= 2 * _err(eager, ref) + FLOOR[dtype], (_err(out, ref), _err(eager, ref))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cross_lengths(backend, device):
    q, k, v = _qkv(2, 2, 19, 16, torch.float32, device, S_kv=45)
    out = linear_attention(q, k, v, backend=backend)
    assert _err(out, linear_attention_ref(q.double(), k.double(), v.double())) <= 1e-5


def test_equals_sanas_processor():
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

    from ditkern.patch.families.sana import LinearAttnProcessor

    attn = Attention(query_dim=48, heads=3, dim_head=16, bias=True, processor=SanaLinearAttnProcessor2_0()).eval()
    x = torch.randn(2, 37, 48)
    with torch.no_grad():
        expected = attn(x)
        attn.set_processor(LinearAttnProcessor("triton"))
        out = attn(x)
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(feature_map="elu"), "feature_map"),
        (dict(eps=-1.0), "eps"),
    ],
)
def test_bad_arguments(kwargs, match):
    q, k, v = _qkv(1, 2, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="k and v"):
        linear_attention(q, k[..., :8], v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("S", [1000, 4096, 16384])
def test_gpu_matches_reference(dtype, S):
    q, k, v = _qkv(2, 70, S, 32, dtype, "cuda")
    out = linear_attention(q, k, v, backend="triton")
    ref = linear_attention_ref(q.double(), k.double(), v.double())
    assert _err(out, ref) <= 2 * _err(_sana_eager(q, k, v), ref) + FLOOR[dtype]
