"""Non-causal linear attention with a ReLU feature map (Sana, arXiv 2410.10629; LiT, arXiv 2501.12976).

Per head: ``out_s = phi(q_s) (sum_j phi(k_j)^T v_j) / (phi(q_s) . sum_j phi(k_j) + eps)`` with ``phi = relu``. This
is what diffusers' ``SanaLinearAttnProcessor2_0`` computes (it pads v with a row of ones to get the denominator from
the same fp32 matmuls); here the ``[Dh, Dh]`` key-value state and the ``[Dh]`` key sum are accumulated in fp32 and
nothing of size ``[S, S]`` or padded is materialised.

Layout: q/k/v ``[B, H, S, Dh]`` (any strides: the ``[B, S, H, Dh]`` projections viewed as such), output
``[B, H, S, Dh]`` contiguous in q's dtype. Backends: triton (two kernels: split-S partial states, then the output;
see ditkern/kernels/linear_attention.py for why two), torch (the fp32 reference, the CPU path).

Gradients: Sana's default patch runs this op, so it has a backward (``torch.library.register_autograd``): the reference
recomputed in fp32 under ``torch.enable_grad()`` and differentiated for q, k and v, whichever backend ran the forward
(it is a few ``[B, H, S, Dh]`` einsums, so the recompute costs about one forward; a fused backward kernel is future
work). A reference path under grad would also be exact, but it would change the forward's numbers between training
and inference; this keeps the forward the kernel's. Gradients come back in each input's dtype and shape.
"""

from __future__ import annotations

import torch

from ditkern._backend import choose, requested_backend, triton_can_run_on
from ditkern.ops.adaln_modulate import ref_vjp
from ditkern.ops.adaln_modulate import to_compute as _acc

FEATURE_MAPS = ("relu",)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


def _linear_attention_acc(q, k, v, eps: float) -> torch.Tensor:
    qf, kf, vf = torch.relu(_acc(q)), torch.relu(_acc(k)), _acc(v)
    kv = torch.einsum("bhsd,bhse->bhde", kf, vf)  # [B, H, Dh, Dh]
    ksum = kf.sum(dim=2)  # [B, H, Dh]
    num = torch.einsum("bhsd,bhde->bhse", qf, kv)
    den = torch.einsum("bhsd,bhd->bhs", qf, ksum)[..., None]
    return num / (den + eps)


def linear_attention_ref(q, k, v, *, feature_map: str = "relu", eps: float = 1e-15) -> torch.Tensor:
    """fp32 reference; returns q's dtype, ``[B, H, S, Dh]``."""
    return _linear_attention_acc(q, k, v, eps).to(q.dtype)


def _check(q, k, v, feature_map, eps):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, S, Dh], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k and v must be [B, H, S_kv, Dh] matching q's B, H, Dh {tuple(q.shape)}, got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on one device")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def _cuda_can_run(q, *others) -> str | None:
    return (
        "no CUDA C++ linear-attention kernel: the Triton kernels are the GPU path (two small GEMM-like passes; "
        "docs/attention.md)"
    )


def _triton_can_run(q, *others) -> str | None:
    reason = triton_can_run_on(q)
    if reason:
        return reason
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} (the [Dh, Dh] fp32 state is register-resident)"
    return None


def _torch_can_run(q, *others) -> str | None:
    return None


BACKENDS = {"cuda": _cuda_can_run, "triton": _triton_can_run, "torch": _torch_can_run}
OP_NAMES = "linear_attention"


def info_sample(device, dtype):
    """Sample inputs for ``python -m ditkern info`` (Sana 1600M self-attention: 70 heads x 32)."""
    return (torch.empty(1, 70, 64, 32, device=device, dtype=dtype),)


@torch.library.custom_op("ditkern::linear_attention", mutates_args=())
def _linear_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str, eps: float, backend: str
) -> torch.Tensor:
    name = choose("linear_attention", BACKENDS, q, k, v, backend=backend)
    if name == "torch":
        return linear_attention_ref(q, k, v, feature_map=feature_map, eps=eps)
    from ditkern.kernels.linear_attention import linear_attention_triton  # noqa: PLC0415

    return linear_attention_triton(q, k, v, eps=eps)


@_linear_attention_op.register_fake
def _(q, k, v, feature_map, eps, backend):
    return q.new_empty(q.shape)


def _setup(ctx, inputs, output):
    q, k, v, _feature_map, eps, _backend = inputs
    ctx.save_for_backward(q, k, v)
    ctx.eps = eps


def _backward(ctx, grad_out):
    grads = ref_vjp(lambda q, k, v: [_linear_attention_acc(q, k, v, ctx.eps)], ctx.saved_tensors,
                    ctx.needs_input_grad[:3], [grad_out])  # fmt: skip
    return (*grads, None, None, None)


torch.library.register_autograd("ditkern::linear_attention", _backward, setup_context=_setup)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "relu",
    eps: float = 1e-15,
    backend: str | None = None,
) -> torch.Tensor:
    """``relu(q) (relu(k)^T v) / (relu(q) . sum relu(k) + eps)`` per head; ``[B, H, S, Dh]`` in, same out.

    ``k``/``v`` may have another length than ``q`` (``[B, H, S_kv, Dh]``). ``eps`` defaults to Sana's 1e-15.
    ``backend``: None (``DITKERN_BACKEND`` or auto), "auto", "cuda", "triton" or "torch".
    """
    _check(q, k, v, feature_map, eps)
    return _linear_attention_op(q, k, v, feature_map, float(eps), requested_backend(backend))
