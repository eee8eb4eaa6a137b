"""ditkern.ops.taylor: fused Taylor state update and forecast, Triton (interpreter) and CUDA (GPU) vs reference."""

import pytest
import torch

from ditkern.ops.taylor import taylor_forecast, taylor_forecast_ref, taylor_update, taylor_update_ref

GPU = torch.cuda.is_available()
BACKENDS = ["triton", "torch"] + (["cuda"] if GPU else [])


def _state(shape, dtype, device):
    return [torch.randn(shape, device=device).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1030)], ids=str)
def test_update_matches_reference(backend, order, dtype, shape, device):
    x, base = torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)
    state = _state(shape, dtype, device)
    ref = [t.clone() for t in state]
    orig = [t.clone() for t in state]
    B = shape[0]
    c1, c2 = torch.rand(B, device=device) + 0.5, torch.rand(B, device=device) + 0.5
    mask = torch.tensor([1, 0, 1][:B], device=device)
    taylor_update(x, *state, c1, c2, mask, base=base, order=order, backend=backend)
    taylor_update_ref(x, *ref, c1, c2, mask, base=base, order=order)
    for k, (a, b) in enumerate(zip(state, ref)):
        if k > order:
            continue
        # fp32 arithmetic on both sides; the only difference is the final rounding to the state dtype
        torch.testing.assert_close(a, b, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-3)
    # the masked-out item (index 1) is untouched, bit for bit: batch items are isolated
    for a, o in zip(state, orig):
        assert torch.equal(a[1], o[1])
    assert not torch.equal(state[0][0], orig[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [0, 1, 2])
def test_forecast_matches_reference(backend, order, device):
    shape = (2, 3, 333)
    d = _state(shape, torch.float32, device)
    base = torch.randn(shape, device=device, dtype=torch.float16)
    a1, a2 = torch.randn(2, device=device), torch.randn(2, device=device)
    out = taylor_forecast(*d, a1, a2, base=base, order=order, backend=backend)
    ref = taylor_forecast_ref(*d, a1, a2, base=base, order=order)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_polynomial_trajectory_is_recovered_exactly_on_nonuniform_steps(backend, device):
    """f(t) = p0 + p1 t + p2 t^2 sampled at non-uniform (shifted, FLUX-like) timesteps: after 3 updates the order-2
    forecast equals f anywhere; order 1 after 2 updates recovers a linear trajectory."""
    g = torch.Generator().manual_seed(3)
    p = [torch.randn(2, 64, generator=g, dtype=torch.float64) for _ in range(3)]
    f = lambda t: (p[0] + p[1] * t + p[2] * t * t)  # noqa: E731
    ts = [1.0, 0.93, 0.71, 0.40]  # non-uniform spacing
    d0, d1, d2 = (torch.zeros(2, 64, device=device) for _ in range(3))
    ones = torch.ones(2, dtype=torch.int32, device=device)
    hist = []
    for t in ts[:3]:
        c1 = 1 / (t - hist[-1]) if len(hist) >= 1 else 0.0
        c2 = 1 / (t - hist[-2]) if len(hist) >= 2 else 0.0
        taylor_update(f(t).float().to(device), d0, d1, d2, torch.full((2,), c1, device=device),
                      torch.full((2,), c2, device=device), ones, order=2, backend=backend)  # fmt: skip
        hist.append(t)
    t = ts[3]
    a1 = torch.full((2,), t - hist[-1], device=device)
    a2 = torch.full((2,), (t - hist[-1]) * (t - hist[-2]), device=device)
    pred = taylor_forecast(d0, d1, d2, a1, a2, order=2, backend=backend)
    torch.testing.assert_close(pred.double().cpu(), f(t), atol=1e-4, rtol=1e-4)
    # the divided differences are the polynomial's: d2 == p2 exactly (up to fp32 rounding)
    torch.testing.assert_close(d2.double().cpu(), p[2], atol=1e-3, rtol=1e-3)


def test_bad_arguments_name_the_argument():
    d = [torch.zeros(2, 8) for _ in range(3)]
    c = torch.zeros(2)
    m = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="order must be an int in 0..2"):
        taylor_update(torch.zeros(2, 8), *d, c, c, m, order=3)
    with pytest.raises(ValueError, match=r"x must have shape \(2, 8\)"):
        taylor_update(torch.zeros(2, 9), *d, c, c, m, order=1)
    with pytest.raises(ValueError, match=r"c1 must be a \[B\]=2 tensor"):
        taylor_update(torch.zeros(2, 8), *d, torch.zeros(3), c, m, order=1)
    with pytest.raises(TypeError, match="base must be float32"):
        taylor_forecast(*d, c, c, base=torch.zeros(2, 8, dtype=torch.int64), order=0)


def test_compile_fullgraph_through_ops():
    d = [torch.randn(2, 40) for _ in range(3)]
    c = torch.rand(2) + 0.5
    m = torch.ones(2, dtype=torch.int32)

    def step(x, d0, d1, d2):
        taylor_update(x, d0, d1, d2, c, c, m, order=2, backend="triton")
        return taylor_forecast(d0, d1, d2, c, c, base=x, order=2, backend="triton")

    x = torch.randn(2, 40)
    eager_state = [t.clone() for t in d]
    expected = step(x, *eager_state)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, *d)
    torch.testing.assert_close(got, expected)
    for a, b in zip(d, eager_state):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bf16_state_on_gpu(backend):
    shape = (2, 4608, 3072)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    d = _state(shape, torch.bfloat16, "cuda")
    ref = [t.clone() for t in d]
    c = torch.rand(2, device="cuda") + 0.5
    m = torch.ones(2, dtype=torch.int32, device="cuda")
    taylor_update(x, *d, c, c, m, order=2, backend=backend)
    taylor_update_ref(x, *ref, c, c, m, order=2)
    for a, b in zip(d, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=1e-2)
    out = taylor_forecast(*d, c, c, base=x, order=2, backend=backend)
    torch.testing.assert_close(out.float(), taylor_forecast_ref(*d, c, c, base=x, order=2).float(), atol=0.1, rtol=1e-2)
