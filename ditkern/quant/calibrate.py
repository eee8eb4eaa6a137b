"""Calibration: activations captured from the model's own sampling, and the searches that use them.

``calibrate(pipe_or_model, run)`` hooks every ``nn.Linear`` of the transformer(s), calls ``run()`` (e.g. a few sampler
steps of the pipeline on a handful of seeds), and keeps per layer the per-input-channel mean ``|x|`` and a random
subsample of input rows. The searches measure what matters, the layer's *output* error on those rows, not the
weights' own error (which on small trained DiTs can go down while the output PSNR goes down too):

* ``awq_quantize``: activation-aware per-input-channel scaling (AWQ, Lin et al. 2023, arXiv 2306.00978): quantize
  ``W * s`` with ``s = mean|x|**alpha``, compute ``(x / s) @ W_hat.T``; alpha on a grid, alpha = 0 is plain absmax,
  so the search never does worse than absmax on the calibration rows.
* ``gptq_quantize``: error-compensating rounding with the rows' Hessian; ``ditkern.quant.adaround``: learned
  rounding (AdaRound on the FP grid) with a per-group scale search, on the Gram matrix of every row seen.
* ``layer_error``: relative output MSE of a quantized weight on the rows (weight MSE without calibration), used by
  the per-layer format choice (``format="auto4"``, ``memory_budget``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ditkern.formats import QuantizedWeight, quantize

AWQ_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class LayerStats:
    absmean: torch.Tensor  # [K] fp32, mean |x| per input channel
    rows: torch.Tensor  # [R, K] fp32, a random subsample of input rows
    count: int  # rows seen
    gram: torch.Tensor | None = None  # [K, K] fp64 X^T X over every row seen (learned rounding's H), or None
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # learned roundings already computed
    choice: dict = field(default_factory=dict)  # format -> adaround candidate, set by ditkern.quant.choose_rounding


@dataclass
class Calibration:
    """Per-layer activation statistics keyed by the module path inside the transformer."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    rounding: dict | None = None  # ditkern.quant.choose_rounding's summary, when it made this calibration

    def __len__(self) -> int:
        return len(self.layers)


def _transformers(obj) -> list[nn.Module]:
    if isinstance(obj, nn.Module):
        return [obj]
    return [
        m for m in (getattr(obj, "transformer", None), getattr(obj, "transformer_2", None)) if isinstance(m, nn.Module)
    ]


@torch.no_grad()
def calibrate(model_or_pipeline, run: Callable[[], object], max_rows: int = 512, seed: int = 0) -> Calibration:
    """Capture the inputs of every linear layer while ``run()`` executes (patch after calibrating, or unpatched): per
    layer the mean ``|x|`` per input channel, up to ``max_rows`` rows drawn from every call (so from every timestep
    the sampler runs), and the Gram matrix ``X^T X`` of all rows."""
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    rows: dict[str, list[torch.Tensor]] = {}
    grams: dict[str, torch.Tensor] = {}
    handles = []
    per_call = max(8, max_rows // 16)

    def make_hook(path):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
            sums[path] = sums.get(path, 0) + x.abs().sum(0)
            counts[path] = counts.get(path, 0) + x.shape[0]
            xd = x.double()
            grams[path] = grams.get(path, 0) + xd.T @ xd
            idx = torch.randperm(x.shape[0], generator=gen)[:per_call]
            rows.setdefault(path, []).append(x[idx])

        return hook

    for model in _transformers(model_or_pipeline):
        for path, m in model.named_modules():
            if type(m).__name__ == "Linear":
                handles.append(m.register_forward_pre_hook(make_hook(path)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    cal = Calibration()
    for path, s in sums.items():
        r = torch.cat(rows[path])
        if r.shape[0] > max_rows:
            r = r[torch.randperm(r.shape[0], generator=gen)[:max_rows]]
        cal.layers[path] = LayerStats(s / counts[path], r.contiguous(), counts[path], grams[path])
    return cal


def layer_error(w: torch.Tensor, q: QuantizedWeight, stats: LayerStats | None) -> float:
    """Relative output MSE ``|X W^T - X W_hat^T|^2 / |X W^T|^2`` on the calibration rows (weight MSE without)."""
    w = w.float()
    w_hat = q.dequantize().to(w.device)
    if stats is None:
        return ((w - w_hat).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30)).item()
    x = stats.rows.to(w.device)
    ref = x @ w.T
    return ((ref - x @ w_hat.T).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)).item()


def awq_quantize(w: torch.Tensor, fmt: str, group_size: int, scale_dtype: str, stats: LayerStats, name: str = "weight",
                 alphas=AWQ_ALPHAS) -> tuple[QuantizedWeight, float, float]:  # fmt: skip
    """The activation-aware quantization with the lowest output error on the rows: (weight, alpha, error)."""
    best = None
    a = stats.absmean.to(w.device).float().clamp_min(1e-6)
    for alpha in alphas:
        if alpha == 0:
            q = quantize(w, fmt, group_size, scale_dtype, name=name)
        else:
            s = a**alpha
            s = s / (s.max() * s.min()).sqrt()  # centre the factors around 1 (keeps scales in range)
            q = quantize(w, fmt, group_size, scale_dtype, smooth=s, name=name)
        err = layer_error(w, q, stats)
        if best is None or err < best[2]:
            best = (q, alpha, err)
    return best


def gptq_quantize(w: torch.Tensor, fmt: str, group_size: int, scale_dtype: str, stats: LayerStats,
                  name: str = "weight", damp: float = 0.01, H: torch.Tensor | None = None) -> QuantizedWeight:  # fmt: skip
    """Error-compensating rounding (GPTQ, Frantar et al. 2022, arXiv 2210.17323) onto the format's grid.

    Columns (input channels) are quantized in order; each one's rounding error, weighted by the inverse Hessian
    ``H = X^T X`` of the calibration rows (``damp`` x mean diagonal added), is pushed onto the columns not yet
    quantized. A group's scale is its absmax when the group is reached (of the already-updated weights). The result
    is an ordinary :class:`QuantizedWeight` (same layout and kernels as absmax). ``H``: the ``[K, K]`` Gram matrix to
    use instead of that of ``stats.rows`` (learned rounding passes the Gram of every calibration row).
    """
    from ditkern.formats import (  # noqa: PLC0415
        get_format,
        load_scale,
        padded_k,
        round_to_grid,
        store_scale,
    )

    f = get_format(fmt)
    W = w.detach().double().clone()
    N, K = W.shape
    if H is None:
        X = stats.rows.to(w.device).double()
        H = X.T @ X
    else:
        H = H.to(w.device).double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Kp = padded_k(K, group_size)
    stored = []
    for g0 in range(0, K, group_size):
        g1 = min(g0 + group_size, K)
        amax = W[:, g0:g1].abs().amax(1).float()
        s_fp32 = torch.where(amax > 0, amax / f.max, torch.ones_like(amax))
        st = store_scale(s_fp32, scale_dtype)
        stored.append(st)
        s = load_scale(st).double()
        for k in range(g0, g1):
            col = W[:, k]
            q = round_to_grid((col / s).float(), f).double() * s
            err = (col - q) / Hinv[k, k]
            W[:, k] = q
            if k + 1 < K:
                W[:, k + 1 :] -= err[:, None] * Hinv[k, k + 1 :][None, :]
    scales = torch.stack([load_scale(st) for st in stored], 1)  # [N, Kp / G] fp32, already representable
    assert scales.shape[1] == Kp // group_size
    return quantize(W.float(), fmt, group_size, scale_dtype, scales=scales, name=name)
