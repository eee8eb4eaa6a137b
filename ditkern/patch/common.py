"""Pieces shared by the family files: norm introspection, the adaLN norm-module rules, the fused helpers, and the
source fingerprints that keep a fused block forward from silently diverging from the diffusers version it mirrors.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ditkern._backend import choose
from ditkern.config import PatchConfig
from ditkern.ops.adaln_modulate import BACKENDS as ADALN_BACKENDS
from ditkern.ops.adaln_modulate import adaln_modulate, gated_residual_adaln
from ditkern.patch.engine import Plan, device_dtype
from ditkern.patch.report import native_fallback


@dataclass(frozen=True)
class NormSpec:
    kind: str  # "layer" | "rms"
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def norm_spec(m: nn.Module) -> NormSpec | str:
    """The fused-kernel description of a norm module, or the reason it has none."""
    name = type(m).__name__
    if isinstance(m, nn.LayerNorm):  # also diffusers' FP32LayerNorm and LayerNorm (an alias on torch >= 2.1)
        if len(m.normalized_shape) != 1:
            return f"{name} normalises over {tuple(m.normalized_shape)}, not one dimension"
        return NormSpec("layer", m.weight, m.bias, float(m.eps))
    if name == "RMSNorm" and hasattr(m, "eps"):
        return NormSpec("rms", getattr(m, "weight", None), getattr(m, "bias", None), float(m.eps))
    if name == "LayerNorm" and hasattr(m, "eps") and hasattr(m, "weight"):  # diffusers' own for old torch
        return NormSpec("layer", m.weight, getattr(m, "bias", None), float(m.eps))
    return f"norm {name} is not a layer or RMS norm"


def norm_width(m: nn.Module) -> int | None:
    """The width D a layer or RMS norm normalises over (None if it does not say)."""
    shape = getattr(m, "normalized_shape", None) or getattr(m, "dim", None)
    if isinstance(shape, int):
        return shape
    return int(shape[-1]) if shape else None


def adaln_backend(module: nn.Module, norm: nn.Module | None, cfg: PatchConfig) -> str:
    """The backend ``adaln_modulate`` / ``gated_residual_adaln`` will run on for this module: its device and dtype,
    the width of ``norm``, the backend the patch asks for. Resolved once, at patch time, for the plan and the report;
    a backend the user forced that cannot run raises here (``BackendUnavailable``)."""
    return choose("adaln_modulate", ADALN_BACKENDS, _adaln_sample(module, norm), backend=cfg.backend)


def _adaln_sample(module: nn.Module, norm: nn.Module | None) -> torch.Tensor:
    device, dtype = device_dtype(module)
    width = (norm_width(norm) if norm is not None else None) or 64
    return torch.empty(1, 1, width, device=device, dtype=dtype)


def adaln_plan(name: str, what: str, forward: Callable, module: nn.Module, norm: nn.Module | None,
               cfg: PatchConfig) -> Plan | str:  # fmt: skip
    """The plan of a lossless adaLN rule (``forward`` replaces ``module``'s forward), or why the module keeps its own.

    In auto mode (no ``backend`` asked for, no ``DITKERN_BACKEND``), where no fused backend (cuda, triton) can run on
    the module's device and dtype, the op would land on its fp32 torch reference: more ops and fp32 upcasts than the
    module's own native torch ops, so slower than unpatched for no gain (measured on 2 shared CPU cores with
    ``python -m bench.cpu_lossless --ab --backend torch``: 0.81x-0.94x on the zoo pipelines, 0.72x on the tiny test
    models). The module is then left unpatched, bit-identical to unpatched and as fast, and the report row says
    so (:data:`~ditkern.patch.report.NATIVE_REASON`). A backend asked for by name is honoured: ``backend="torch"``
    installs the fused forward on the fp32 reference (the oracle the tests compare kernels with).
    """
    sample = _adaln_sample(module, norm)
    native = native_fallback("adaln_modulate", ADALN_BACKENDS, sample, cfg.backend)
    if native is not None:
        return native
    return Plan(name, what, forward, backend=choose("adaln_modulate", ADALN_BACKENDS, sample, backend=cfg.backend))


def _promoted(out: torch.Tensor, *others: torch.Tensor | None) -> torch.Tensor:
    """Match the dtype the unfused expression ``norm(x) * (1 + scale) + shift`` would have produced."""
    dt = out.dtype
    for t in others:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return out if dt == out.dtype else out.to(dt)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The ops need unit stride along D (16-byte vectors); a model may hand over a transposed view (DiT's patch
    embedding does), which eager ``layer_norm`` would copy as well."""
    return t if t.stride(-1) == 1 else t.contiguous()


def modulate(norm: nn.Module, x, shift, scale, backend, promote: bool = True):
    """``norm(x) * (1 + scale) + shift`` with the fused kernel. ``shift``/``scale`` broadcast as ``[B, D]``,
    ``[B, 1, D]`` or ``[B, S, D]``."""
    spec = norm_spec(norm)
    x = _unit_stride(x)
    out = adaln_modulate(x, shift, scale, norm=spec.kind, weight=spec.weight, bias=spec.bias, eps=spec.eps, backend=backend)
    return _promoted(out, shift, scale) if promote else out


def residual_modulate(norm: nn.Module | None, x, y, gate, shift, scale, backend, promote: bool = True):
    """``h = x + gate * y`` and ``norm(h) * (1 + scale) + shift`` in one pass; returns ``(h, out)``."""
    spec = norm_spec(norm)
    x, y = _unit_stride(x), _unit_stride(y)
    h, out = gated_residual_adaln(
        x, y, gate, shift, scale, norm=spec.kind, weight=spec.weight, bias=spec.bias, eps=spec.eps, backend=backend
    )
    return h, (_promoted(out, shift, scale) if promote else out)


# ----------------------------------------------------------------------------------------------------------------------
# fingerprints of the diffusers forwards that a fused forward mirrors
# ----------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def source_fingerprint(fn) -> str:
    """Hash of a function's source with blank lines, comments and indentation removed."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return "unavailable"
    lines = []
    for line in src.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]


def check_fingerprint(module: nn.Module, known: set[str]) -> str | None:
    """None if ``type(module).forward`` is a version the fused forward was validated against, else the reason."""
    if os.environ.get("DITKERN_TRUST_BLOCK_SOURCE", "0") == "1":
        return None
    fp = source_fingerprint(type(module).forward)
    if fp in known:
        return None
    import diffusers  # noqa: PLC0415

    return (
        f"{type(module).__name__}.forward of diffusers {diffusers.__version__} (fingerprint {fp}) differs from the "
        "versions ditkern's fused forward mirrors; left unpatched (DITKERN_TRUST_BLOCK_SOURCE=1 patches anyway)"
    )


def chunked_ff(block, ff, x):
    """``ff(x)``, or diffusers' chunked feed-forward when the block was set to chunk (``set_chunk_feed_forward``)."""
    if getattr(block, "_chunk_size", None) is not None:
        from diffusers.models.attention import _chunked_feed_forward  # noqa: PLC0415

        return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)
    return ff(x)


def has_attrs(module: nn.Module, *names: str) -> str | None:
    missing = [n for n in names if not hasattr(module, n)]
    return f"missing attribute(s) {', '.join(missing)}" if missing else None


# ----------------------------------------------------------------------------------------------------------------------
# rules for diffusers' adaLN norm modules (shared by the families)
# ----------------------------------------------------------------------------------------------------------------------
ADALN_WHAT = "norm + modulate fused (adaln_modulate)"
BLOCK_WHAT = "gated residual + norm + modulate fused (gated_residual_adaln)"


Modulate = Callable[..., torch.Tensor]  # mod(norm, x, shift, scale) -> norm(x) * (1 + scale) + shift


@dataclass(frozen=True)
class AdaLNNormRule:
    """The rule for one of diffusers' adaLN norm modules.

    ``build(mod)`` returns the module's fused forward, in which ``mod(norm, x, shift, scale)`` computes
    ``norm(x) * (1 + scale) + shift``: :func:`modulate` for the fused-norm patch, and the quant feature's
    adaLN + FP8 variant where ``feeds_linears`` (the output is the input of the block's linear layers; the final
    norms feed the unquantized output projection). The shared checks (option on, the expected attributes, a fusable
    norm, a validated source) are in :meth:`check`.
    """

    build: Callable[[Modulate], Callable]
    attrs: tuple[str, ...] = ()
    feeds_linears: bool = True

    def check(self, m: nn.Module) -> str | None:
        return has_attrs(m, "linear", "silu", "norm", *self.attrs) or _spec_reason(m.norm) or _fp(m)

    def __call__(self, m: nn.Module, cfg: PatchConfig):
        if not cfg.fused_norms:
            return None
        reason = self.check(m)
        if reason:
            return reason
        backend = cfg.backend

        def mod(norm, x, shift, scale):
            return modulate(norm, x, shift, scale, backend)

        return adaln_plan("adaln", ADALN_WHAT, self.build(mod), m, m.norm, cfg)


def _ada_layer_norm_zero(mod: Modulate):
    """``AdaLayerNormZero``: linear(silu(emb)) -> 6 chunks; norm(x) * (1 + scale_msa) + shift_msa fused."""

    def forward(module, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        if module.emb is not None:
            emb = module.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        emb = module.linear(module.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        return mod(module.norm, x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp

    return forward


def _ada_layer_norm_zero_single(mod: Modulate):
    """``AdaLayerNormZeroSingle`` (FLUX single-stream blocks): 3 chunks."""

    def forward(module, x, emb=None):
        emb = module.linear(module.silu(emb))
        shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
        return mod(module.norm, x, shift_msa, scale_msa), gate_msa

    return forward


def _sd35_ada_layer_norm_zero_x(mod: Modulate):
    """``SD35AdaLayerNormZeroX`` (SD3.5 dual attention): 9 chunks, two modulations of one normalised x."""

    def forward(module, hidden_states, emb=None):
        emb = module.linear(module.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = emb.chunk(
            9, dim=1
        )
        out1 = mod(module.norm, hidden_states, shift_msa, scale_msa)
        out2 = mod(module.norm, hidden_states, shift_msa2, scale_msa2)
        return out1, gate_msa, shift_mlp, scale_mlp, gate_mlp, out2, gate_msa2

    return forward


def _ada_layer_norm_continuous(mod: Modulate):
    """``AdaLayerNormContinuous`` (final norms, SD3's last context norm): emb -> (scale, shift), in that order."""

    def forward(module, x, conditioning_embedding):
        emb = module.linear(module.silu(conditioning_embedding).to(x.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)
        return mod(module.norm, x, shift, scale)

    return forward


ada_layer_norm_zero_rule = AdaLNNormRule(_ada_layer_norm_zero, attrs=("emb",))
ada_layer_norm_zero_single_rule = AdaLNNormRule(_ada_layer_norm_zero_single)
sd35_ada_layer_norm_zero_x_rule = AdaLNNormRule(_sd35_ada_layer_norm_zero_x)
ada_layer_norm_continuous_rule = AdaLNNormRule(_ada_layer_norm_continuous, feeds_linears=False)


def _fp(m: nn.Module) -> str | None:
    from ditkern.patch.fingerprints import FINGERPRINTS  # noqa: PLC0415

    return check_fingerprint(m, FINGERPRINTS[type(m).__name__])


def _spec_reason(norm: nn.Module) -> str | None:
    spec = norm_spec(norm)
    return spec if isinstance(spec, str) else None


NORM_RULES = {
    "AdaLayerNormZero": ada_layer_norm_zero_rule,
    "AdaLayerNormZeroSingle": ada_layer_norm_zero_single_rule,
    "SD35AdaLayerNormZeroX": sd35_ada_layer_norm_zero_x_rule,
    "AdaLayerNormContinuous": ada_layer_norm_continuous_rule,
}
