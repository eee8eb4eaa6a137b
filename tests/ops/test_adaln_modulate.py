"""ditkern.ops.adaln_modulate: Triton (interpreter on CPU) and CUDA (GPU only) against the fp32 reference."""

import ctypes

import importlib

import pytest
import torch

import ditkern.kernels.adaln_modulate as adaln_kernels
from ditkern.ops.adaln_modulate import (
    BACKENDS,
    adaln_modulate,
    adaln_modulate_ref,
    gated_residual_adaln,
    gated_residual_adaln_ref,
)

from tests.ops._poison import assert_all_written, poison_empty

adaln_op = importlib.import_module("ditkern.ops.adaln_modulate")  # the module; ditkern.ops.adaln_modulate is the op

HAS_GPU = torch.cuda.is_available()
# The flash-attention rule (STYLE.md): err(kernel) <= 2 * err(torch in the same dtype) + FLOOR. The floor absorbs a
# single rounding of the output in the low-precision dtype where the eager error happens to be ~0.
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _eager_same_dtype(x, shift, scale, norm, weight, bias, eps, y=None, gate=None):
    """What an unfused model computes in the low-precision dtype (diffusers' own op sequence)."""
    if y is not None:
        g = gate if gate is None or gate.dim() == 3 else gate[:, None]
        x = x + (y if g is None else g.to(x.dtype) * y)
    D = x.shape[-1]
    if norm == "layer":
        n = torch.nn.functional.layer_norm(x, (D,), weight, bias, eps)
    else:
        n = (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        n = n * weight if weight is not None else n
        n = n + bias if bias is not None else n
    sc = scale if scale is None or scale.dim() == 3 else scale[:, None]
    sh = shift if shift is None or shift.dim() == 3 else shift[:, None]
    if sc is not None:
        n = n * (1 + sc.to(n.dtype))
    if sh is not None:
        n = n + sh.to(n.dtype)
    return (x, n) if y is not None else n


def _inputs(B, S, D, dtype, device, per_token=False, mod_dtype=None, chunked=True):
    mod_dtype = mod_dtype or dtype
    x = torch.randn(B, S, D, dtype=torch.float32, device=device).to(dtype)
    if per_token:
        emb = torch.randn(B, S, 6 * D, device=device).to(mod_dtype)
        chunks = emb.chunk(6, dim=-1)  # strided [B, S, D] views, read in place
    elif chunked:
        emb = torch.randn(B, 6 * D, device=device).to(mod_dtype)
        chunks = emb.chunk(6, dim=1)  # the [B, 6*D] modulation chunk of AdaLayerNormZero
    else:
        chunks = [torch.randn(B, D, device=device).to(mod_dtype) for _ in range(6)]
    shift, scale, gate = chunks[0], chunks[1] * 0.5, chunks[2]
    return x, shift, scale, gate


def _backends():
    out = ["triton"]
    if HAS_GPU:
        out.append("cuda")
    return out


CASES = [
    # (B, S, D): odd D, D not a multiple of the block, S not a multiple of anything
    (2, 7, 64),
    (1, 5, 1000),
    (2, 3, 3072 + 8),
    (3, 1, 96),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("B,S,D", CASES, ids=lambda v: str(v))
def test_adaln_modulate_matches_reference(backend, dtype, norm, B, S, D, device):
    x, shift, scale, _ = _inputs(B, S, D, dtype, device)
    out = adaln_modulate(x, shift, scale, norm=norm, eps=1e-6, backend=backend)
    ref = adaln_modulate_ref(x.float(), shift.float(), scale.float(), norm=norm, eps=1e-6)
    eager = _eager_same_dtype(x, shift, scale, norm, None, None, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert _err(out, ref) <= 2 * _err(eager, ref) + FLOOR[dtype]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("B,S,D", CASES[:3], ids=lambda v: str(v))
def test_gated_residual_adaln_matches_reference(backend, dtype, gated, B, S, D, device):
    x, shift, scale, gate = _inputs(B, S, D, dtype, device)
    y = torch.randn_like(x)
    g = gate if gated else None
    w = torch.randn(D, device=device).to(dtype)
    b = torch.randn(D, device=device).to(dtype)
    h, out = gated_residual_adaln(x, y, g, shift, scale, weight=w, bias=b, eps=1e-5, backend=backend)
    h_ref, ref = gated_residual_adaln_ref(
        x.float(), y.float(), None if g is None else g.float(), shift.float(), scale.float(),
        weight=w.float(), bias=b.float(), eps=1e-5,
    )  # fmt: skip
    h_eager, eager = _eager_same_dtype(x, shift, scale, "layer", w, b, 1e-5, y=y, gate=g)
    assert _err(h, h_ref) <= 2 * _err(h_eager, h_ref) + FLOOR[dtype]
    assert _err(out, ref) <= 2 * _err(eager, ref) + FLOOR[dtype]


@pytest.mark.parametrize("backend", _backends())
def test_per_token_fp32_modulation_with_fp16_x(backend, device):
    """Wan 2.2 TI2V: per-token [B, S, D] modulation in fp32 (strided chunks of [B, S, 6*D]) on an fp16 stream."""
    x, shift, scale, gate = _inputs(2, 9, 136, torch.float16, device, per_token=True, mod_dtype=torch.float32)
    assert shift.stride(1) == 6 * 136  # a strided view, not a copy
    y = torch.randn_like(x)
    h, out = gated_residual_adaln(x, y, gate, shift, scale, backend=backend)
    h_ref, ref = gated_residual_adaln_ref(x, y, gate, shift, scale)
    assert _err(h, h_ref) <= 2e-3 and _err(out, ref) <= 2e-2


@pytest.mark.parametrize("backend", _backends())
def test_no_modulation_is_plain_norm(backend, device):
    x = torch.randn(2, 5, 48, device=device)
    y = torch.randn_like(x)
    w, b = torch.randn(48, device=device), torch.randn(48, device=device)
    h, out = gated_residual_adaln(x, y, None, None, None, weight=w, bias=b, eps=1e-6, backend=backend)
    torch.testing.assert_close(h, x + y)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x + y, (48,), w, b, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_strided_rows_and_broadcast_shapes(backend, device):
    """Row-strided x (a token slice), [B, 1, D] modulation (PixArt) and batch-1 modulation broadcast over B."""
    base = torch.randn(2, 11, 72, device=device)
    x = base[:, ::2]  # rows strided, last dim contiguous
    shift = torch.randn(2, 1, 72, device=device)
    scale = torch.randn(1, 72, device=device)
    out = adaln_modulate(x, shift, scale, backend=backend)
    torch.testing.assert_close(out, adaln_modulate_ref(x, shift, scale), atol=2e-5, rtol=1e-5)


def test_torch_backend_is_the_reference(device):
    x, shift, scale, gate = _inputs(2, 3, 40, torch.float32, device)
    assert torch.equal(adaln_modulate(x, shift, scale, backend="torch"), adaln_modulate_ref(x, shift, scale))


# ---- bad input: clear errors naming the argument -------------------------------------------------------------------
def test_rejects_bad_inputs():
    x = torch.randn(2, 4, 16)
    s = torch.randn(2, 16)
    with pytest.raises(TypeError, match="x must be float32"):
        adaln_modulate(x.double(), s, s)
    with pytest.raises(TypeError, match="shift must be float32"):
        adaln_modulate(x, s.to(torch.int32), s)
    with pytest.raises(ValueError, match="scale must have last dimension D=16"):
        adaln_modulate(x, s, torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"shift must be \[B, D\]"):
        adaln_modulate(x, torch.randn(3, 16), s)
    with pytest.raises(ValueError, match=r"x must be \[B, S, D\]"):
        adaln_modulate(x[0], s, s)
    with pytest.raises(ValueError, match="x must be contiguous along its last dimension"):
        adaln_modulate(torch.randn(2, 16, 4).transpose(1, 2), s[:, :4], s[:, :4])
    with pytest.raises(ValueError, match="shift must be contiguous along its last dimension"):
        adaln_modulate(x, torch.randn(16, 2).t(), s)
    with pytest.raises(ValueError, match="y must have the shape of x"):
        gated_residual_adaln(x, torch.randn(2, 3, 16), s, s, s)
    with pytest.raises(ValueError, match="norm must be one of"):
        adaln_modulate(x, s, s, norm="group")
    with pytest.raises(ValueError, match="weight must be"):
        adaln_modulate(x, s, s, weight=torch.randn(2, 16))
    with pytest.raises(ValueError, match="DITKERN_BACKEND|backend"):
        adaln_modulate(x, s, s, backend="fast")


@pytest.mark.skipif(not torch.backends.mps.is_available() and not HAS_GPU, reason="needs a second device type")
def test_rejects_wrong_device():
    x = torch.randn(2, 4, 16, device="cuda")
    with pytest.raises(ValueError, match="shift is on cpu but x is on cuda"):
        adaln_modulate(x, torch.randn(2, 16), torch.randn(2, 16, device="cuda"))


def test_rejects_wrong_device_meta():
    """The device check without a GPU: a meta-device shift against a CPU x."""
    x = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="shift is on meta but x is on cpu"):
        adaln_modulate(x, torch.randn(2, 16, device="meta"), torch.randn(2, 16))


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    x = torch.randn(2, 4, 16)
    s = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="backend 'cuda' was requested but cannot run"):
        adaln_modulate(x, s, s, backend="cuda")
    monkeypatch.setenv("DITKERN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run"):
        adaln_modulate(x, s, s)


def test_cuda_refuses_rows_beyond_its_registers(monkeypatch):
    """The CUDA kernel holds a row as at most 512 threads x 4 16-byte vectors: wider rows are refused with the reason
    (auto mode then takes Triton), the widest that fits is accepted."""
    monkeypatch.setattr(adaln_op, "cuda_can_run_on", lambda *t, **k: None)
    assert adaln_op._cuda_can_run(torch.empty(1, 1, 16384, dtype=torch.float16)) is None
    assert "register-resident row" in adaln_op._cuda_can_run(torch.empty(1, 1, 16392, dtype=torch.float16))
    assert "register-resident row" in adaln_op._cuda_can_run(torch.empty(1, 1, 8196, dtype=torch.float32))


@pytest.mark.parametrize("D", [3072, 1536, 1152, 5120], ids=["flux", "sd3", "pixart", "wan"])
def test_triton_tiling_is_exact_at_model_widths(D):
    """Issue 13: no power-of-two padding of D at the bench widths (PixArt's 1152 in 16-bit: 5 x 256, 90% of the lanes
    busy, where 9 x 128 would exceed the 5 chunks that keep compile time in bounds; it was 1152 / 2048), one 16-byte
    vector per thread and chunk (no replicated lanes), several rows per program so each moves >= 16 KB."""
    for elt in (2, 4):
        rows, width, chunks, warps = adaln_kernels.row_config(D, elt, 4096)
        if D == 1152 and elt == 2:
            assert (chunks, width) == (5, 256)
        else:
            assert chunks * width == D, (elt, width, chunks)
        assert rows * width == 32 * warps * (16 // elt), (elt, rows, width, warps)
        assert 2 * rows * D * elt >= 16384 and warps <= 16


def test_auto_backend_on_cpu_without_interpreter_uses_torch(monkeypatch):
    from ditkern import _backend

    monkeypatch.setattr(_backend, "triton_interpreted", lambda: False)
    x = torch.randn(2, 4, 16)
    s = torch.randn(2, 16)
    assert _backend.choose("adaln_modulate", BACKENDS, x, s, s) == "torch"


def test_compile_fullgraph_through_custom_op(device):
    x, shift, scale, gate = _inputs(2, 5, 32, torch.float32, device)  # the device fixture: on a GPU, Triton needs cuda
    y = torch.randn_like(x)

    def f(x, y, gate, shift, scale):
        h, n = gated_residual_adaln(x, y, gate, shift, scale, backend="triton")
        return adaln_modulate(h, shift, scale, backend="triton") + n

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, y, gate, shift, scale), f(x, y, gate, shift, scale))


# ---- every output element written: outputs NaN-poisoned before the kernel runs ------------------------------------
def _check_written_and_accurate(backend, B, S, D, dtype, device):
    """Both ops with every modulation form (chunked [B, D], [B, 1, D], batch-1 broadcast), under poison_empty: an
    unwritten element stays NaN; the written ones obey err <= 2 * err(torch, same dtype) + floor vs the fp32 ref."""
    x, shift, scale, gate = _inputs(B, S, D, dtype, device)
    scale = scale[:1, None, :]  # [1, 1, D]: broadcast over batch and tokens
    y = torch.randn_like(x)
    out = adaln_modulate(x, shift, scale, norm="rms", backend=backend)
    assert_all_written(out, "adaln_modulate out")
    ref = adaln_modulate_ref(x.float(), shift.float(), scale.float(), norm="rms")
    eager = _eager_same_dtype(x, shift, scale, "rms", None, None, 1e-6)
    assert _err(out, ref) <= 2 * _err(eager, ref) + FLOOR[dtype]
    h, out = gated_residual_adaln(x, y, gate, shift, scale, backend=backend)
    assert_all_written(h, "gated_residual_adaln h")
    assert_all_written(out, "gated_residual_adaln out")
    h_ref, ref = gated_residual_adaln_ref(x.float(), y.float(), gate.float(), shift.float(), scale.float())
    h_eager, eager = _eager_same_dtype(x, shift, scale, "layer", None, None, 1e-6, y=y, gate=gate)
    assert _err(h, h_ref) <= 2 * _err(h_eager, h_ref) + FLOOR[dtype]
    assert _err(out, ref) <= 2 * _err(eager, ref) + FLOOR[dtype]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,S,D", [(2, 7, 64), (3, 5, 1000)], ids=lambda v: str(v))
def test_every_output_element_written(backend, dtype, B, S, D, device, monkeypatch):
    poison_empty(monkeypatch)
    _check_written_and_accurate(backend, B, S, D, dtype, device)


def test_written_check_catches_a_launch_that_skips_the_last_token(monkeypatch, device):
    """The check above has teeth: a launcher that leaves the last token of each output unwritten fails it (with
    plain torch.empty outputs it could pass, unwritten memory being whatever the allocator left there)."""
    real = adaln_kernels.adaln_modulate_triton

    def skips_last_token(x, y, gate, shift, scale, weight, bias, h_out, out, **kw):
        cut = lambda t: None if t is None else t[:, :-1]  # noqa: E731
        real(*(cut(t) for t in (x, y, gate, shift, scale)), weight, bias, cut(h_out), cut(out), **kw)

    monkeypatch.setattr(adaln_kernels, "adaln_modulate_triton", skips_last_token)
    poison_empty(monkeypatch)
    with pytest.raises(AssertionError, match="unwritten"):
        _check_written_and_accurate("triton", 2, 7, 64, torch.float32, device)


# ---- mixed dtypes: broadcast modulation tensors are never materialised at [B, S, D] --------------------------------
def _strided(ptr, dtype, shape, strides):
    """The memory a kernel reads at ``ptr`` with these element strides, as a tensor (CPU addresses only)."""
    elt = torch.empty((), dtype=dtype).element_size()
    span = 1 + sum((n - 1) * st for n, st in zip(shape, strides))
    flat = torch.frombuffer((ctypes.c_char * (span * elt)).from_address(ptr), dtype=dtype, count=span)
    return flat.as_strided(shape, strides)


class _EmulatedExt:
    """Stands in for ditkern._C on the CPU: takes the extension's exact arguments (addresses, element strides,
    dtype codes), records what each modulation pointer spans, and computes the result with the reference."""

    DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}

    def __init__(self):
        self.calls = []

    def adaln_modulate(self, px, py, pg, psh, psc, pw, pb, ph, po, B, S, D, strides, xcode, modcode, rms, eps, *_):
        xt, mt = self.DTYPES[xcode], self.DTYPES[modcode]
        assert modcode in (0, xcode), "the CUDA kernel takes modulation in fp32 or x's dtype"
        st = [tuple(strides[i : i + 2]) + (1,) for i in range(0, 14, 2)]
        view = lambda p, dt, s: None if p == 0 else _strided(p, dt, (B, S, D), s)  # noqa: E731
        x, y, h, out = view(px, xt, st[0]), view(py, xt, st[1]), view(ph, xt, st[5]), view(po, xt, st[6])
        mods = {k: view(p, mt, s) for k, p, s in (("gate", pg, st[2]), ("shift", psh, st[3]), ("scale", psc, st[4]))}
        w, b = (None if p == 0 else _strided(p, torch.float32, (D,), (1,)) for p in (pw, pb))
        self.calls.append({k: (None if t is None else (t.stride(), t.dtype)) for k, t in mods.items()})
        kw = dict(norm="rms" if rms else "layer", weight=w, bias=b, eps=eps)
        if y is None:
            out.copy_(adaln_modulate_ref(x, mods["shift"], mods["scale"], **kw))
        else:
            h_ref, o_ref = gated_residual_adaln_ref(x, y, mods["gate"], mods["shift"], mods["scale"], **kw)
            h.copy_(h_ref)
            out.copy_(o_ref)


@pytest.fixture
def emulated_cuda(monkeypatch):
    """The op's CUDA path on the CPU: the real eligibility rules (dtypes, alignment, strides) minus the device
    check, and the emulated extension in place of ditkern._C."""
    fake = _EmulatedExt()
    monkeypatch.setattr(adaln_op, "cuda_can_run_on", lambda *t, **k: None)
    monkeypatch.setattr(adaln_op, "ext", lambda: fake)
    monkeypatch.setattr(adaln_op, "stream_of", lambda t: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    poison_empty(monkeypatch)
    return fake


@pytest.mark.parametrize("gated", [True, False])
def test_mixed_dtype_cuda_launch_reads_broadcast_modulation_in_place(gated, emulated_cuda):
    """fp16 stream, modulation in fp16 and fp32 (Wan keeps it in fp32): the CUDA kernel reads one modulation dtype,
    so the fp16 ones are cast to fp32 - the compact [B, D] storage, never a [B, S, D] copy of a broadcast view
    (1.5 GB per tensor at Wan 720p). Covers a caller's own stride-0 [B, S, D] expand as well as [B, D]/[B, 1, D]."""
    B, S, D = 2, 33, 64
    x = torch.randn(B, S, D).half()
    y = torch.randn_like(x)
    shift = torch.randn(B, D)  # fp32
    scale = torch.randn(B, 1, D).half() * 0.5
    gate = torch.randn(B, 1, D).half().expand(B, S, D)  # stride-0 [B, S, D] view in the odd dtype
    assert gate.stride(1) == 0
    if gated:
        h, out = gated_residual_adaln(x, y, gate, shift, scale, backend="cuda")
        h_ref, ref = gated_residual_adaln_ref(x, y, gate, shift, scale)
        torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    else:
        out = adaln_modulate(x, shift, gate, backend="cuda")  # the expanded fp16 view as scale
        ref = adaln_modulate_ref(x, shift, gate)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # the fp16 -> fp32 cast is exact: same fp32 arithmetic
    (call,) = emulated_cuda.calls
    for name, got in call.items():
        if got is None:
            continue
        strides, dtype = got
        assert dtype == torch.float32, name
        assert strides[1] == 0, f"{name} reaches the kernel with strides {strides}: a full [B, S, D] copy"


def test_mixed_dtype_triton_launch_reads_each_tensor_in_its_own_dtype(monkeypatch, device):
    """The Triton kernel loads every operand in its own dtype: the op passes each modulation tensor through as a
    view of the caller's storage, whatever the dtype mix."""
    seen = {}
    real = adaln_kernels.adaln_modulate_triton

    def spy(x, y, gate, shift, scale, *rest, **kw):
        seen.update(gate=gate, shift=shift, scale=scale)
        return real(x, y, gate, shift, scale, *rest, **kw)

    monkeypatch.setattr(adaln_kernels, "adaln_modulate_triton", spy)
    poison_empty(monkeypatch)
    B, S, D = 2, 9, 40
    x = torch.randn(B, S, D, device=device).half()
    y = torch.randn_like(x)
    given = dict(
        gate=torch.randn(B, 1, D, device=device).expand(B, S, D),
        shift=torch.randn(B, D, device=device).half(),
        scale=torch.randn(1, D, device=device),
    )
    h, out = gated_residual_adaln(x, y, given["gate"], given["shift"], given["scale"], backend="triton")
    for name, t in given.items():
        assert seen[name].dtype == t.dtype, name
        assert seen[name].untyped_storage().data_ptr() == t.untyped_storage().data_ptr(), f"{name} was copied"
    h_ref, ref = gated_residual_adaln_ref(x.float(), y.float(), *(given[k].float() for k in ("gate", "shift", "scale")))
    assert _err(h, h_ref) <= 2e-3 and _err(out, ref) <= 2e-2


# ---- GPU-only ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("B,S,D", [(1, 4608, 3072), (2, 4096, 1152), (1, 333, 5120)])
def test_bf16_on_gpu(backend, B, S, D):
    x, shift, scale, gate = _inputs(B, S, D, torch.bfloat16, "cuda")
    y = torch.randn_like(x)
    h, out = gated_residual_adaln(x, y, gate, shift, scale, backend=backend)
    h_ref, ref = gated_residual_adaln_ref(x.float(), y.float(), gate.float(), shift.float(), scale.float())
    h_eager, eager = _eager_same_dtype(x, shift, scale, "layer", None, None, 1e-6, y=y, gate=gate)
    assert _err(h, h_ref) <= 2 * _err(h_eager, h_ref) + FLOOR[torch.bfloat16]
    assert _err(out, ref) <= 2 * _err(eager, ref) + FLOOR[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_every_output_element_written_on_gpu(backend, monkeypatch):
    """bf16 at a FLUX width with S odd: every output NaN-poisoned before the kernel writes it."""
    poison_empty(monkeypatch)
    _check_written_and_accurate(backend, 2, 129, 3072, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_mixed_dtype_cuda_copies_no_broadcast_tensor_on_gpu():
    """Wan keeps its modulation in fp32 beside a bf16 stream: the peak memory of a call is its two outputs, not a
    [B, S, D] copy of each broadcast modulation tensor (1.5 GB each at Wan 720p)."""
    B, S, D = 1, 8192, 5120
    x = torch.randn(B, S, D, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    shift = torch.randn(B, D, device="cuda")  # fp32
    scale = torch.randn(B, 1, D, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(B, 1, D, device="cuda", dtype=torch.bfloat16).expand(B, S, D)  # stride-0 view, bf16
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    h, out = gated_residual_adaln(x, y, gate, shift, scale, backend="cuda")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - h.nbytes - out.nbytes
    assert extra < 1 << 20, f"{extra / 2**20:.1f} MiB allocated beyond the outputs (a full-size modulation copy?)"
    h_ref, ref = gated_residual_adaln_ref(x, y, gate, shift, scale)
    h_eager, eager = _eager_same_dtype(x, shift, scale, "layer", None, None, 1e-6, y=y, gate=gate)
    assert _err(h, h_ref) <= 2 * _err(h_eager, h_ref) + FLOOR[torch.bfloat16]
    assert _err(out, ref) <= 2 * _err(eager, ref) + FLOOR[torch.bfloat16]
