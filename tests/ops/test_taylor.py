"""ditkern.ops.taylor: fused Taylor state update and forecast, Triton (interpreter) and CUDA (GPU) vs reference."""

import pytest
import torch

from ditkern.ops.taylor import BACKENDS as BACKENDS_OF_OP
from ditkern.ops.taylor import taylor_forecast, taylor_forecast_ref, taylor_update, taylor_update_ref
from tests.ops._poison import assert_all_written, nan_like, poison_empty

GPU = torch.cuda.is_available()
# Every backend, the torch one too, is checked against the float64 oracle below, written here from the formulas and
# independent of taylor_update_ref / taylor_forecast_ref (the torch backend *is* the reference, so comparing it with
# the reference would check nothing). The reference itself is held to the same oracle.
BACKENDS = ["triton", "torch"] + (["cuda"] if GPU else [])
# STYLE.md rule: err(backend) <= 2 * err(eager torch in the same dtype) + FLOOR * max|oracle|. The floor is about one
# rounding of the largest value to the state dtype, for cases where the eager chain happens to round exactly.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _state(shape, dtype, device):
    return [torch.randn(shape, device=device).to(dtype) for _ in range(3)]


def _col64(v, like):
    return v.double().view(-1, *([1] * (like.dim() - 1)))


def _oracle_update(x, d0, d1, d2, c1, c2, mask, base, order):
    """Newton divided differences in float64. The new sample f = x - base at t_new enters the table; with
    c1 = 1 / (t_new - t_k) and c2 = 1 / (t_new - t_{k-1}):  f[t_new] = f,  f[t_new, t_k] = (f - f[t_k]) c1,
    f[t_new, t_k, t_{k-1}] = (f[t_new, t_k] - f[t_k, t_{k-1}]) c2. Items with mask == 0 keep their table."""
    f = x.double() - (base.double() if base is not None else 0.0)
    first = (f - d0.double()) * _col64(c1, x)
    second = (first - d1.double()) * _col64(c2, x) if order >= 2 else None
    keep = (mask == 0).view(-1, *([1] * (x.dim() - 1)))
    new = [f, first, second][: order + 1]
    return [torch.where(keep, old.double(), n) for old, n in zip((d0, d1, d2), new)]


def _eager_update(x, d0, d1, d2, c1, c2, mask, base, order):
    """The unfused chain of torch ops in the state dtype (what a TaylorSeer-style cache computes)."""
    dt = d0.dtype
    f = x.to(dt) - base.to(dt) if base is not None else x.to(dt)
    first = (f - d0) * c1.to(dt).view(-1, *([1] * (x.dim() - 1)))
    new = [f, first]
    if order >= 2:
        new.append((first - d1) * c2.to(dt).view(-1, *([1] * (x.dim() - 1))))
    keep = (mask == 0).view(-1, *([1] * (x.dim() - 1)))
    return [torch.where(keep, old, n) for old, n in zip((d0, d1, d2), new[: order + 1])]


def _oracle_forecast(d0, d1, d2, a1, a2, base, order):
    """The Newton form of the interpolating polynomial at t: f[t_k] + (t - t_k) f[t_k, ...] + ..., float64."""
    out = d0.double()
    if order >= 1:
        out = out + _col64(a1, d0) * d1.double()
    if order >= 2:
        out = out + _col64(a2, d0) * d2.double()
    return out + base.double() if base is not None else out


def _err(a, oracle, rows=None):
    a, oracle = (a, oracle) if rows is None else (a[rows], oracle[rows])
    return (a.double() - oracle).abs().max().item()


def _check_update(backend, order, dtype, shape, device, update=None):
    """One masked update, backend vs the float64 oracle; write-only state (d0 at order 0, d2 at order 2: the
    update never reads them) starts as NaN, so an element the kernel skips stays NaN and fails."""
    update = update or (lambda *a, **k: taylor_update(*a, backend=backend, **k))
    x, base = torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)
    state = _state(shape, dtype, device)
    write_only = {0: 0, 2: 2}.get(order)
    if write_only is not None:
        state[write_only] = nan_like(state[write_only])
    orig = [t.clone() for t in state]
    B = shape[0]
    c1, c2 = torch.rand(B, device=device) + 0.5, torch.rand(B, device=device) + 0.5
    mask = torch.tensor([1, 0, 1][:B], device=device)
    oracle = _oracle_update(x, *orig, c1, c2, mask, base, order)
    eager = _eager_update(x, *orig, c1, c2, mask, base, order)
    update(x, *state, c1, c2, mask, base=base, order=order)
    on = mask.bool().cpu()
    for k in range(order + 1):
        assert_all_written(state[k][on], f"d{k} (updated items)")
        bound = 2 * _err(eager[k], oracle[k], on) + FLOOR[dtype] * oracle[k][on].abs().max().item()
        assert _err(state[k], oracle[k], on) <= bound, f"d{k}: {_err(state[k], oracle[k], on):.3g} > {bound:.3g}"
    # the masked-out item (index 1) keeps its values exactly, NaN included: batch items are isolated. Values, not
    # bits: the torch reference rewrites masked-out items through fp32 (torch.where + copy_), which keeps every
    # number but may change a NaN's payload (seen on CPU: fp16 0x7e00 -> 0x7fff)
    for a, o in zip(state, orig):
        torch.testing.assert_close(a[1], o[1], atol=0, rtol=0, equal_nan=True)
    assert not torch.equal(state[0][0], orig[0][0])


def _skip_if_cannot_run(backend, *tensors):
    """The CUDA kernel takes whole 16-byte vectors per item and one dtype; shapes or dtype mixes it refuses are
    skipped with its own reason (the Triton kernel covers them)."""
    reason = BACKENDS_OF_OP[backend](*tensors)
    if reason:
        pytest.skip(f"{backend}: {reason}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1030), (2, 3, 344)], ids=str)  # 3*344: 16-byte vectors, odd blocks
def test_update_matches_float64_oracle(backend, order, dtype, shape, device):
    if backend == "cuda":
        _skip_if_cannot_run(backend, torch.empty(shape, dtype=dtype, device=device))
    _check_update(backend, order, dtype, shape, device)


def _check_forecast(backend, order, device, monkeypatch, forecast=None, state_dtype=torch.float32, shape=(2, 3, 333)):
    """Backend vs the float64 oracle; the output is NaN-poisoned before the kernel writes it."""
    forecast = forecast or (lambda *a, **k: taylor_forecast(*a, backend=backend, **k))
    poison_empty(monkeypatch)
    d = _state(shape, state_dtype, device)
    base = torch.randn(shape, device=device, dtype=torch.float16)
    a1, a2 = torch.randn(2, device=device), torch.randn(2, device=device)
    out = forecast(*d, a1, a2, base=base, order=order)
    assert out.dtype == torch.float16
    assert_all_written(out, "forecast")
    oracle = _oracle_forecast(*d, a1, a2, base, order)
    terms = [d[0].half(), *(c.half()[:, None, None] * t.half() for c, t in zip((a1, a2), d[1:3]))]
    eager = base + sum(terms[: order + 1])  # the unfused chain in the output dtype
    bound = 2 * _err(eager, oracle) + FLOOR[torch.float16] * oracle.abs().max().item()
    assert _err(out, oracle) <= bound, f"{_err(out, oracle):.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize(
    "state_dtype,shape", [(torch.float32, (2, 3, 333)), (torch.float16, (2, 3, 344))], ids=["fp32-state", "fp16-state"]
)
def test_forecast_matches_float64_oracle(backend, order, state_dtype, shape, device, monkeypatch):
    if backend == "cuda":
        t = torch.empty(shape, dtype=state_dtype, device=device)
        _skip_if_cannot_run(backend, t, torch.empty(shape, dtype=torch.float16, device=device))
    _check_forecast(backend, order, device, monkeypatch, state_dtype=state_dtype, shape=shape)


def test_oracle_catches_a_wrong_reference(monkeypatch):
    """The oracle has teeth where the old self-comparison had none: a reference with c1 and c2 swapped, or one that
    drops the a2 term, fails it (comparing the torch backend with the reference would pass either)."""

    def swapped(x, d0, d1, d2, c1, c2, mask, *, base=None, order):
        return taylor_update_ref(x, d0, d1, d2, c2, c1, mask, base=base, order=order)

    with pytest.raises(AssertionError):
        _check_update("torch", 2, torch.float32, (3, 5, 7), "cpu", update=swapped)

    def no_a2(d0, d1, d2, a1, a2, *, base=None, order):
        return taylor_forecast_ref(d0, d1, d2, a1, a2, base=base, order=min(order, 1))

    with pytest.raises(AssertionError):
        _check_forecast("torch", 2, "cpu", monkeypatch, forecast=no_a2)


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


def test_compile_fullgraph_through_ops(device):
    d = [torch.randn(2, 40, device=device) for _ in range(3)]  # the device fixture: on a GPU, Triton needs cuda
    c = torch.rand(2, device=device) + 0.5
    m = torch.ones(2, dtype=torch.int32, device=device)

    def step(x, d0, d1, d2):
        taylor_update(x, d0, d1, d2, c, c, m, order=2, backend="triton")
        return taylor_forecast(d0, d1, d2, c, c, base=x, order=2, backend="triton")

    x = torch.randn(2, 40, device=device)
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
