"""Fused adaLN-modulate and gated residual + adaLN-modulate.

``adaln_modulate(x, shift, scale)``            -> ``norm(x) * (1 + scale) + shift``
``gated_residual_adaln(x, y, gate, shift, scale)`` -> ``(h, norm(h) * (1 + scale) + shift)`` with ``h = x + gate * y``

These are the adaLN-Zero modulation of DiT (Peebles & Xie, arXiv 2212.09748) as FLUX, SD3, PixArt and Wan use it: the
second one fuses the gated residual add of one sub-block with the norm + modulate that opens the next, so the
residual stream is read once and written once instead of four times.

Shapes: ``x``/``y`` ``[B, S, D]``; ``shift``/``scale``/``gate`` ``[B, D]``, ``[B, 1, D]`` or ``[B, S, D]`` (per-token
modulation, as Wan 2.2 TI2V uses), batch size 1 broadcasts; ``weight``/``bias`` ``[D]``. Every tensor must have unit
stride along D; rows may be strided, so the chunks of a ``[B, 6*D]`` modulation tensor are read in place. dtypes: x in
fp32/fp16/bf16, the others any of those (Wan keeps its modulation in fp32). Statistics and arithmetic are fp32; the
outputs have x's dtype.

Gradients: both ops have a backward (``torch.library.register_autograd``) that recomputes the forward through the fp32
reference under ``torch.enable_grad()`` and differentiates that, whichever backend ran the forward; every input's
gradient comes back in its own dtype and shape (broadcast and strided modulation tensors included). Why a recompute
and not a reference path under grad: the forward stays the fused kernel (training runs the same numbers as inference),
the backward is exact in fp32 for every input (x, y, gate, shift, scale, weight, bias) with no hand-written formula to
keep in sync with the reference, and it is plain torch ops, so ``torch.compile`` traces it and double backward works.
The cost is one extra elementwise + norm pass in fp32 per backward (a fused backward kernel is future work).
"""

from __future__ import annotations

import torch

from ditkern._backend import choose, requested_backend, triton_can_run_on
from ditkern._ext import cuda_can_run_on, dtype_code, ext, stream_of

NORMS = ("layer", "rms")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------------
# reference (fp32 internally): the semantics, the CPU path and the oracle of the tests
# ----------------------------------------------------------------------------------------------------------------------
def _bsd(t: torch.Tensor | None) -> torch.Tensor | None:
    """A modulation tensor as something that broadcasts against ``[B, S, D]``."""
    if t is None:
        return None
    return t[:, None, :] if t.dim() == 2 else t


def to_compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the references' compute dtype: fp32 (float64 stays float64: the raw custom ops with
    ``backend="torch"``, which the float64 gradchecks call). Shared by the references of the lossless ops."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


_acc = to_compute


def _norm_ref(h: torch.Tensor, norm: str, weight, bias, eps: float) -> torch.Tensor:
    w = None if weight is None else _acc(weight)
    b = None if bias is None else _acc(bias)
    if norm == "layer":
        return torch.nn.functional.layer_norm(h, h.shape[-1:], w, b, eps)
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        n = n * w
    if b is not None:
        n = n + b
    return n


def _modulate_acc(x, shift, scale, norm, weight, bias, eps) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in the compute dtype, not rounded (the forward and the backward share it)."""
    n = _norm_ref(_acc(x), norm, weight, bias, eps)
    if scale is not None:
        n = n * (1 + _acc(_bsd(scale)))
    if shift is not None:
        n = n + _acc(_bsd(shift))
    return n


def _residual_acc(x, y, gate) -> torch.Tensor:
    """``x + gate * y`` in the compute dtype, not rounded."""
    r = _acc(y) if gate is None else _acc(_bsd(gate)) * _acc(y)
    return _acc(x) + r


def adaln_modulate_ref(x, shift, scale, *, norm="layer", weight=None, bias=None, eps=1e-6) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in fp32, returned in x's dtype."""
    return _modulate_acc(x, shift, scale, norm, weight, bias, eps).to(x.dtype)


def gated_residual_adaln_ref(x, y, gate, shift, scale, *, norm="layer", weight=None, bias=None, eps=1e-6):
    """``h = x + gate * y`` (rounded to x's dtype, as the unfused model stores it), then ``adaln_modulate_ref(h)``."""
    h = _residual_acc(x, y, gate).to(x.dtype)
    return h, adaln_modulate_ref(h, shift, scale, norm=norm, weight=weight, bias=bias, eps=eps)


# ----------------------------------------------------------------------------------------------------------------------
# validation: clear errors naming the argument
# ----------------------------------------------------------------------------------------------------------------------
def _check(x, y, gate, shift, scale, weight, bias, norm, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, S, D], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    B, S, D = x.shape
    args = {"x": x, "y": y, "gate": gate, "shift": shift, "scale": scale, "weight": weight, "bias": bias}
    for name, t in args.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dim() == 0 or t.shape[-1] != D:
            raise ValueError(f"{name} must have last dimension D={D} (that of x), got shape {tuple(t.shape)}")
        if t.stride(-1) != 1 and t.numel() > 1:
            raise ValueError(
                f"{name} must be contiguous along its last dimension (stride 1), got strides {tuple(t.stride())}; "
                f"pass {name}.contiguous() (row strides are fine)"
            )
    if y is not None:
        if y.shape != x.shape:
            raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
        if y.dtype != x.dtype:
            raise TypeError(f"y must have the dtype of x ({x.dtype}), got {y.dtype}")
    for name in ("gate", "shift", "scale"):
        t = args[name]
        if t is None:
            continue
        ok = (t.dim() == 2 and t.shape[0] in (1, B)) or (
            t.dim() == 3 and t.shape[0] in (1, B) and t.shape[1] in (1, S)
        )
        if not ok:
            raise ValueError(
                f"{name} must be [B, D], [B, 1, D] or [B, S, D] with B={B}, S={S}, D={D} (from x), "
                f"got shape {tuple(t.shape)}"
            )
    for name in ("weight", "bias"):
        t = args[name]
        if t is not None and t.dim() != 1:
            raise ValueError(f"{name} must be [D] with D={D}, got shape {tuple(t.shape)}")


def _expand(t, B, S, D):
    if t is None:
        return None
    if t.dim() == 2:
        t = t[:, None, :]
    return t.expand(B, S, D)


def _cast_compact(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` that casts only the stored elements: a broadcast (stride-0) dimension is cut to size 1 before
    the cast and expanded again after it. A plain ``.to()`` of an expanded ``[B, S, D]`` view writes a full
    ``[B, S, D]`` copy (1.5 GB per modulation tensor at Wan 720p); this one writes ``[B, 1, D]``."""
    if t.dtype == dtype:
        return t
    compact = t[tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())]
    return compact.to(dtype).expand(t.shape)


# ----------------------------------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------------------------------
# csrc/adaln_modulate/adaln_modulate.cu holds a row in registers: at most 512 threads x 4 vectors of 16 bytes
CUDA_MAX_VECTORS = 2048


def _cuda_can_run(x, *others) -> str | None:
    reason = cuda_can_run_on(x)
    if reason:
        return reason
    elt = x.element_size()
    vec = 16 // elt
    if x.shape[-1] % vec:
        return f"D={x.shape[-1]} is not a multiple of {vec} (16-byte vectors of {x.dtype})"
    if x.shape[-1] > CUDA_MAX_VECTORS * vec:
        return (
            f"D={x.shape[-1]} exceeds the CUDA kernel's register-resident row ({CUDA_MAX_VECTORS} 16-byte vectors "
            f"= {CUDA_MAX_VECTORS * vec} elements of {x.dtype}: 512 threads x 4 vectors)"
        )
    for t in (x, *others):
        if t is None:
            continue
        if t.dtype not in (x.dtype, torch.float32):
            return f"a modulation/weight tensor is {t.dtype}; the CUDA kernel takes x's dtype or float32"
        if t.data_ptr() % 16:
            return "a tensor is not 16-byte aligned"
        if any(s % vec for s in t.stride()[:-1] if t.dim() > 1):
            return "a row stride is not a multiple of the 16-byte vector"
    return None


def _triton_can_run(x, *others) -> str | None:
    reason = triton_can_run_on(x)
    if reason:
        return reason
    from ditkern.kernels.adaln_modulate import MAX_BLOCK_D  # noqa: PLC0415

    if x.shape[-1] > MAX_BLOCK_D:
        return f"D={x.shape[-1]} exceeds the register-resident row limit {MAX_BLOCK_D}"
    return None


def _torch_can_run(x, *others) -> str | None:
    return None


BACKENDS = {"cuda": _cuda_can_run, "triton": _triton_can_run, "torch": _torch_can_run}
OP_NAMES = "adaln_modulate / gated_residual_adaln"


def info_sample(device, dtype):
    """Sample inputs for ``python -m ditkern info`` (a FLUX-width row)."""
    return (torch.empty(1, 8, 3072, device=device, dtype=dtype),)


def _run(x, y, gate, shift, scale, weight, bias, norm: str, eps: float, backend: str):
    """Shared body of both custom ops. Returns (h or None, out)."""
    B, S, D = x.shape
    mods = (y, gate, shift, scale, weight, bias)
    name = choose("adaln_modulate", BACKENDS, x, *mods, backend=backend)
    if name == "torch":
        if y is None:
            return None, adaln_modulate_ref(x, shift, scale, norm=norm, weight=weight, bias=bias, eps=eps)
        return gated_residual_adaln_ref(x, y, gate, shift, scale, norm=norm, weight=weight, bias=bias, eps=eps)
    out = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
    h = torch.empty_like(out) if y is not None else None
    g3, sh3, sc3 = (_expand(t, B, S, D) for t in (gate, shift, scale))
    if name == "triton":
        from ditkern.kernels.adaln_modulate import adaln_modulate_triton  # noqa: PLC0415

        adaln_modulate_triton(x, y, g3, sh3, sc3, weight, bias, h, out, is_rms=norm == "rms", eps=eps)
    else:
        _launch_cuda(x, y, g3, sh3, sc3, weight, bias, h, out, norm, eps)
    return h, out


def _launch_cuda(x, y, gate, shift, scale, weight, bias, h, out, norm, eps):
    B, S, D = x.shape
    mod_dtypes = {t.dtype for t in (gate, shift, scale) if t is not None}
    # the kernel reads modulation tensors in one dtype (x's or fp32) and weight/bias in fp32: cast the odd ones.
    # gate/shift/scale arrive as [B, S, D] views whose broadcast dimensions have stride 0: cast what is stored
    # ([B, D] vectors), never the expanded view. Per-token modulation in the odd dtype is real data and is copied.
    mod_dtype = mod_dtypes.pop() if len(mod_dtypes) == 1 else torch.float32
    gate, shift, scale = (None if t is None else _cast_compact(t, mod_dtype) for t in (gate, shift, scale))
    weight, bias = (t.float() if t is not None and t.dtype != torch.float32 else t for t in (weight, bias))

    def p(t):
        return t.data_ptr() if t is not None else 0

    def st(t):
        return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

    ext().adaln_modulate(
        p(x), p(y), p(gate), p(shift), p(scale), p(weight), p(bias), p(h), p(out),
        B, S, D,
        [*st(x), *st(y), *st(gate), *st(shift), *st(scale), *st(h), *st(out)],
        dtype_code(x.dtype), dtype_code(mod_dtype), int(norm == "rms"), float(eps),
        stream_of(x), x.device.index if x.device.index is not None else torch.cuda.current_device(),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# custom ops (torch.compile traces through them; the backend choice happens inside, out of the graph)
# ----------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("ditkern::adaln_modulate", mutates_args=())
def _adaln_modulate_op(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    norm: str,
    eps: float,
    backend: str,
) -> torch.Tensor:
    return _run(x, None, None, shift, scale, weight, bias, norm, eps, backend)[1]


@_adaln_modulate_op.register_fake
def _(x, shift, scale, weight, bias, norm, eps, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("ditkern::gated_residual_adaln", mutates_args=())
def _gated_residual_adaln_op(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    norm: str,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(x, y, gate, shift, scale, weight, bias, norm, eps, backend)


@_gated_residual_adaln_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, norm, eps, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape)


# ----------------------------------------------------------------------------------------------------------------------
# gradients: recomputed through the reference in fp32 (see the module docstring for why)
# ----------------------------------------------------------------------------------------------------------------------
def ref_vjp(fn, inputs, needs, grad_outputs, create_graph: bool | None = None):
    """Gradients of ``fn(*inputs)`` (a list of outputs in the compute dtype) against ``grad_outputs``.

    Returns one entry per input: None where ``needs`` is False or the input is None, else the gradient in the input's
    shape and dtype (the ``_acc`` casts inside ``fn`` put it there; it is rounded once, at the end). With
    ``create_graph`` (default: grad mode, which autograd turns on inside a backward called with create_graph=True) the
    saved inputs themselves are differentiated, so the gradient has a graph of its own: double backward works. Shared
    by the backward of every lossless op (ditkern.ops.moe, ditkern.ops.linear_attention).
    """
    create = torch.is_grad_enabled() if create_graph is None else create_graph
    with torch.enable_grad():
        leaves = [
            None if t is None else t if create and need else t.detach().requires_grad_(bool(need))
            for t, need in zip(inputs, needs)
        ]
        outs = fn(*leaves)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None]
        wrt = [i for i, (t, need) in enumerate(zip(leaves, needs)) if need and t is not None]
        grads = [None] * len(inputs)
        if not wrt or not pairs:
            return grads
        got = torch.autograd.grad(
            [o for o, _ in pairs], [leaves[i] for i in wrt], [g.to(o.dtype) for o, g in pairs],
            allow_unused=True, create_graph=create,
        )  # fmt: skip
    for i, g in zip(wrt, got):
        grads[i] = torch.zeros_like(inputs[i]) if g is None else g
    return grads


def _adaln_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, norm, eps, _backend = inputs
    ctx.save_for_backward(x, shift, scale, weight, bias)
    ctx.norm, ctx.eps = norm, eps


def _adaln_backward(ctx, grad_out):
    def fn(x, shift, scale, weight, bias):
        return [_modulate_acc(x, shift, scale, ctx.norm, weight, bias, ctx.eps)]

    grads = ref_vjp(fn, ctx.saved_tensors, ctx.needs_input_grad[:5], [grad_out])
    return (*grads, None, None, None)


def _gated_setup(ctx, inputs, output):
    x, y, gate, shift, scale, weight, bias, norm, eps, _backend = inputs
    ctx.save_for_backward(x, y, gate, shift, scale, weight, bias)
    ctx.norm, ctx.eps = norm, eps


def _gated_backward(ctx, grad_h, grad_out):
    def fn(x, y, gate, shift, scale, weight, bias):
        r = _residual_acc(x, y, gate)
        # the forward normalises h rounded to x's dtype; the gradient takes that rounding as the identity (as autograd
        # takes the unfused model's rounded add), so it stays in fp32 until the very end
        h = r + (r.to(x.dtype).to(r.dtype) - r).detach()
        return [r, _modulate_acc(h, shift, scale, ctx.norm, weight, bias, ctx.eps)]

    grads = ref_vjp(fn, ctx.saved_tensors, ctx.needs_input_grad[:7], [grad_h, grad_out])
    return (*grads, None, None, None)


torch.library.register_autograd("ditkern::adaln_modulate", _adaln_backward, setup_context=_adaln_setup)
torch.library.register_autograd("ditkern::gated_residual_adaln", _gated_backward, setup_context=_gated_setup)


# ----------------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------------
def adaln_modulate(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    *,
    norm: str = "layer",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in one pass. See the module docstring for shapes and dtypes.

    ``backend``: None (``DITKERN_BACKEND`` or auto), "auto", "cuda", "triton" or "torch". "torch" is the fp32
    reference :func:`adaln_modulate_ref` (the oracle; on CPU slower than the unfused native ops, since it upcasts).
    ``ditkern.patch`` in auto mode therefore never installs an op that would land on "torch": such a module keeps its
    own forward (``ditkern.patch.common.adaln_plan``); asked for by name, "torch" is installed as it is.
    """
    _check(x, None, None, shift, scale, weight, bias, norm, eps)
    return _adaln_modulate_op(x, shift, scale, weight, bias, norm, float(eps), requested_backend(backend))


def gated_residual_adaln(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    *,
    norm: str = "layer",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + gate * y`` and ``norm(h) * (1 + scale) + shift`` in one pass; returns ``(h, out)``.

    ``gate=None`` is a plain residual add; ``shift=scale=None`` a plain (optionally affine) norm. ``backend`` as for
    :func:`adaln_modulate` ("torch": the fp32 reference :func:`gated_residual_adaln_ref`).
    """
    if y is None:
        raise ValueError("y must be a tensor (the sub-block output added to the residual stream x)")
    _check(x, y, gate, shift, scale, weight, bias, norm, eps)
    return _gated_residual_adaln_op(x, y, gate, shift, scale, weight, bias, norm, float(eps), requested_backend(backend))


