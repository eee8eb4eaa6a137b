"""Learned rounding onto a low-bit grid (AdaRound, Nagel et al. 2020, arXiv 2004.10568), generalised to the
non-uniform FP grids as FP4DiT does (Chen et al. 2025, arXiv 2503.15465), with the per-group scale search it implies.

For a layer ``y = x W^T`` with calibration inputs ``X`` (rows gathered across the timesteps of a few sampled
trajectories, :func:`ditkern.quant.calibrate`), the output error of a quantized weight ``W_hat`` is
``tr((W_hat - W) H (W_hat - W)^T)`` with ``H = X^T X``. Four steps, all on that error:

1. Scale search (``scale_search=True``; off by default: on digits-dit E2M1 it lowered the calibration error but
   cost 4 dB of image PSNR, 32.3 vs 36.5 dB, 10 seeds; absmax scales are used otherwise): per group of ``group_size`` weights along K, the absmax scale times a factor from
   :data:`SCALE_FACTORS` (below 1 clips the group's largest weights, refining the grid for the rest), the factor
   chosen per (row, group) on the error of round-to-nearest with the group's own block of ``H``. Scales are searched
   as stored (bf16 / e8m0 rounding included).
2. Rounding: each weight ``v = w / s`` (in grid units) lies between two neighbouring grid values ``lo <= v <= hi``
   (uneven steps on an FP grid: 0.5 near zero, 2 at the top of E2M1); the weight is ``s * (lo + h * (hi - lo))`` with
   ``h = clip(sigmoid(a) * (zeta - gamma) + gamma, 0, 1)`` (the rectified sigmoid), ``a`` initialised so that ``h``
   is the fraction of the way from ``lo`` to ``hi`` (the soft weight starts at ``w``), and learned with Adam on the
   relative output error plus ``lam * mean(1 - |2h - 1|**beta)``, ``beta`` annealed from 20 to 2 after a warm-up
   without it; at the end every ``h`` is rounded to 0 or 1: each weight is one of its two grid neighbours.
3. Polish (:func:`polish`): coordinate descent on the same exact error, each weight free to move to any grid value
   at its scale; it never increases the error.
4. The same polish from GPTQ's result on the same Gram (:func:`ditkern.quant.calibrate.gptq_quantize`, its scales:
   absmax of the error-updated weights) is the second candidate; the one with the lower error is kept, so the result
   is never above GPTQ + polish. Measured on the 36 block linears of digits-dit (E2M1, g32 bf16, 4 calibration
   seeds, error on the Gram of every row): learned rounding + polish 0.75x GPTQ's error (median), GPTQ + polish
   0.60x, the learned one lower on 3 of 36 layers.
5. :func:`ditkern.quant.choose_rounding` can instead choose per layer among all of :func:`adaround_candidates`
   (these two, each without its polish, and absmax) by the pipeline's output error; ``stats.choice`` records it.

The result is an ordinary :class:`ditkern.formats.QuantizedWeight` (same layout and kernels as absmax).
Deterministic: no random numbers are drawn.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ditkern.formats import (
    Format,
    QuantizedWeight,
    absmax_scales,
    check_finite,
    get_format,
    load_scale,
    padded_k,
    quantize,
    round_to_grid,
    store_scale,
)
from ditkern.quant.calibrate import gptq_quantize

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound, section 4)
SCALE_FACTORS = tuple(round(0.70 + 0.025 * i, 3) for i in range(13))  # 0.70 .. 1.00 of the absmax scale
ITERS = 400  # Adam steps per layer (fewer for small layers: ITERS * min(1, (N * K) / 2**16), at least MIN_ITERS)
MIN_ITERS = 200
LR = 0.1
LAM = 10.0  # the regulariser's weight, relative to the output error of round-to-nearest (0.01-30 measured: 10 best)
WARMUP = 0.2  # the fraction of the steps without the regulariser
BETA = (20.0, 2.0)
SWEEPS = 8  # coordinate-descent passes after the learned rounding (:func:`polish`)
DAMP = 0.01  # x mean diag(H) added to H's diagonal (keeps a rank-deficient H from rewarding blind directions)


def signed_grid(fmt: Format) -> torch.Tensor:
    """Every value of the format once, ascending (fp32; one zero)."""
    mags = fmt.magnitudes().float()
    return torch.cat([-mags.flip(0)[:-1], mags])


def neighbours(v: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid values ``lo <= v <= hi`` around fp32 ``v`` (clamped to +-max; ``lo < hi`` always)."""
    grid = signed_grid(fmt).to(v.device)
    v = v.clamp(-fmt.max, fmt.max)
    i = (torch.searchsorted(grid, v.contiguous(), right=True) - 1).clamp(0, len(grid) - 2)
    return grid[i], grid[i + 1]


def hessian(stats) -> torch.Tensor:
    """``X^T X`` of the layer's calibration inputs (fp64): the Gram matrix of every row seen when the calibration
    kept one (``stats.gram``), else that of its row subsample."""
    gram = getattr(stats, "gram", None)
    if gram is not None:
        return gram.double()
    x = stats.rows.double()
    return x.T @ x


def _group_error(d: torch.Tensor, Hb: torch.Tensor, G: int) -> torch.Tensor:
    """``[N, Kp / G]`` error of each (row, group) of the weight error ``d`` ``[N, Kp]`` with the diagonal blocks
    ``Hb`` ``[Kp / G, G, G]`` of H."""
    N, Kp = d.shape
    dg = d.view(N, Kp // G, G)
    return torch.einsum("ngi,gij,ngj->ng", dg, Hb, dg)


def search_scales(w: torch.Tensor, fmt: Format, G: int, scale_dtype: str, H: torch.Tensor,
                  factors=SCALE_FACTORS) -> torch.Tensor:  # fmt: skip
    """Per (row, group) the stored-and-loaded fp32 scale (``[N, Kp / G]``) among ``factors`` x absmax with the lowest
    round-to-nearest output error on the group's block of ``H`` (``[Kp, Kp]``; ``w`` ``[N, Kp]``, zero-padded)."""
    N, Kp = w.shape
    wg = w.view(N, Kp // G, G)
    amax = wg.abs().amax(-1)
    base = torch.where(amax > 0, amax / fmt.max, torch.ones_like(amax))
    Hb = torch.stack([H[g : g + G, g : g + G] for g in range(0, Kp, G)]).to(w.dtype)
    best_err = best_s = None
    for c in factors:
        s = load_scale(store_scale(base * c, scale_dtype))
        sk = s.repeat_interleave(G, 1)
        d = round_to_grid(w / sk, fmt) * sk - w
        e = _group_error(d, Hb, G)
        if best_err is None:
            best_err, best_s = e, s
        else:
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_s = torch.where(better, s, best_s)
    return best_s


def _h(a: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(a) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def learn_rounding(W: torch.Tensor, H: torch.Tensor, sk: torch.Tensor, fmt: Format, iters: int) -> torch.Tensor:
    """AdaRound on ``fmt``'s grid: ``W`` ``[N, Kp]`` fp32, ``H`` ``[Kp, Kp]``, ``sk`` the per-weight scales; returns
    the weight with every element at one of its two grid neighbours (fp32, values ``grid * scale``)."""
    v = (W / sk).clamp(-fmt.max, fmt.max)
    lo, hi = neighbours(v, fmt)
    base, span = lo * sk, (hi - lo) * sk
    frac = ((v - lo) / (hi - lo)).clamp(0, 1)
    ref = ((W @ H) * W).sum().clamp_min(1e-30)

    def rel_err(wq):
        d = wq - W
        return ((d @ H) * d).sum() / ref

    rtn = round_to_grid(v, fmt) * sk
    lam = LAM * max(rel_err(rtn).item(), 1e-12) / W.numel()  # on the regulariser's mean
    # a with h(a) = frac: the soft weight starts at w itself
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    a = torch.log(p / (1 - p))
    # Adam (Kingma & Ba 2014, default betas) on the closed-form gradient: no autograd graph per step
    m1, m2 = torch.zeros_like(a), torch.zeros_like(a)
    b1, b2, eps = 0.9, 0.999, 1e-8
    warm = int(WARMUP * iters)
    span_h = span * (2.0 / ref)  # d rel_err / d h = 2 (D H) * span / ref
    for it in range(iters):
        sig = torch.sigmoid(a)
        h_raw = sig * (ZETA - GAMMA) + GAMMA
        h = h_raw.clamp(0, 1)
        grad_h = ((base + h * span - W) @ H) * span_h
        if it >= warm:
            t = (it - warm) / max(1, iters - warm)
            beta = BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + math.cos(math.pi * t))
            u = 2 * h - 1  # d/dh (1 - |u|**beta) = -2 beta |u|**(beta - 1) sign(u)
            grad_h = grad_h - lam * 2 * beta * u.abs().pow(beta - 1) * u.sign()
        g = grad_h * (sig * (1 - sig) * (ZETA - GAMMA)) * ((h_raw > 0) & (h_raw < 1))
        m1.mul_(b1).add_(g, alpha=1 - b1)
        m2.mul_(b2).addcmul_(g, g, value=1 - b2)
        a -= LR * (m1 / (1 - b1 ** (it + 1))) / ((m2 / (1 - b2 ** (it + 1))).sqrt() + eps)
    return base + (_h(a) >= 0.5).float() * span


def polish(Wq: torch.Tensor, W: torch.Tensor, H: torch.Tensor, sk: torch.Tensor, fmt: Format,
           sweeps: int = SWEEPS) -> torch.Tensor:  # fmt: skip
    """Coordinate descent on the exact output error: column by column, each weight moves to the grid value (any of
    the format's, at its own scale) that lowers ``tr((Wq - W) H (Wq - W)^T)`` most, the others fixed; up to
    ``sweeps`` passes, stopping at a pass that moves nothing. Never increases the error (fp64)."""
    Hd, skd = H.double(), sk.double()
    Wq = Wq.double().clone()
    GD = (Wq - W.double()) @ Hd  # [N, Kp]: the error's gradient / 2, kept up to date
    grid = signed_grid(fmt).double()[None, :]
    for _ in range(sweeps):
        moved = 0
        for k in range(W.shape[1]):
            d = grid * skd[:, k : k + 1] - Wq[:, k : k + 1]  # [N, C]: every move of column k
            gain = 2 * d * GD[:, k : k + 1] + d * d * Hd[k, k]
            j = gain.argmin(1, keepdim=True)
            delta = torch.where(gain.gather(1, j) < 0, d.gather(1, j), 0.0)[:, 0]
            if not delta.any():
                continue
            moved += int((delta != 0).sum())
            Wq[:, k] += delta
            GD += delta[:, None] * Hd[k][None, :]
        if moved == 0:
            break
    return Wq.float()


CANDIDATES = ("learned+polish", "gptq+polish", "learned", "gptq", "absmax")  # what adaround_candidates returns
DEFAULT_PICK = ("learned+polish", "gptq+polish")  # without a recorded choice: the lower output error of these


def adaround_candidates(w: torch.Tensor, fmt: str, group_size: int, scale_dtype: str, stats, name: str = "weight",
                        iters: int | None = None, scale_search: bool = False, sweeps: int = SWEEPS
                        ) -> dict[str, QuantizedWeight]:  # fmt: skip
    """Every rounding of ``w`` ``[N, K]`` onto ``fmt``'s grid this module computes, by :data:`CANDIDATES` name:
    the learned rounding (see the module docstring) with and without the polish, GPTQ on the same Gram with and
    without it, and absmax round-to-nearest. ``iters``: Adam steps (default: :data:`ITERS`, fewer for small layers;
    0: no learned rounding); ``sweeps``: coordinate-descent passes (0: the "+polish" ones equal the others). Computed
    once per calibration (memoised on ``stats``); the caller gets copies."""
    return _candidates(w, fmt, group_size, scale_dtype, stats, name, iters, scale_search, sweeps)[0]


def _candidates(w, fmt, group_size, scale_dtype, stats, name="weight", iters=None, scale_search=False, sweeps=SWEEPS):
    """(:func:`adaround_candidates`, {name: output error on the calibration Gram})."""
    f = get_format(fmt)
    check_finite(w, name)
    # the same layer, format and settings again (another config patched with the same calibration, the candidates of
    # format="auto", a rounding choice): the result is computed once per calibration
    key = (f.name, group_size, scale_dtype, iters, scale_search, sweeps, _fingerprint(w),
           (ZETA, GAMMA, SCALE_FACTORS, ITERS, MIN_ITERS, LR, LAM, WARMUP, BETA, DAMP))  # the module's constants too
    memo = getattr(stats, "memo", None)
    if memo is not None and key in memo:
        cands, errors = memo[key]
        return {k: _copy(q) for k, q in cands.items()}, dict(errors)
    G = group_size
    N, K = w.shape
    Kp = padded_k(K, G)
    W = torch.nn.functional.pad(w.detach().float().cpu(), (0, Kp - K))
    H = torch.zeros(Kp, Kp, dtype=torch.float64)
    H_raw = hessian(stats).cpu()
    H[:K, :K] = H_raw
    dead = torch.diag(H) == 0
    W[:, dead] = 0.0  # inputs that never fire (and the padding): their weights cannot matter; zero rounds exactly
    H += DAMP * torch.diag(H).mean().clamp_min(1e-30) * torch.eye(Kp, dtype=H.dtype)
    H = H.float()
    s = search_scales(W, f, G, scale_dtype, H) if scale_search else load_scale(
        store_scale(absmax_scales(W, f, G), scale_dtype))  # fmt: skip
    sk = s.repeat_interleave(G, 1)
    n_iter = iters if iters is not None else max(MIN_ITERS, int(ITERS * min(1.0, N * K / 2**16)))
    wq = learn_rounding(W, H, sk, f, n_iter) if n_iter > 0 else round_to_grid(W / sk, f) * sk
    wq_p = polish(wq, W, H, sk, f, sweeps) if sweeps > 0 else wq
    # GPTQ on the same Gram (its own scales: absmax of the updated weights), then polished
    g = gptq_quantize(w, f.name, G, scale_dtype, stats, H=H_raw, name=name)
    s_g = load_scale(g.scales)
    sk_g = s_g.repeat_interleave(G, 1)
    wq_g = torch.nn.functional.pad(g.dequantize().float().cpu(), (0, Kp - K))
    wq_gp = polish(wq_g, W, H, sk_g, f, sweeps) if sweeps > 0 else wq_g
    out = {
        "learned+polish": quantize(wq_p[:, :K], f.name, G, scale_dtype, scales=s, name=name),
        "gptq+polish": quantize(wq_gp[:, :K], f.name, G, scale_dtype, scales=s_g, name=name),
        "learned": quantize(wq[:, :K], f.name, G, scale_dtype, scales=s, name=name),
        "gptq": g,
        "absmax": quantize(w.detach().float().cpu(), f.name, G, scale_dtype, name=name),
    }
    errors = {k: _error(torch.nn.functional.pad(q.dequantize().float(), (0, Kp - K)), W, H) for k, q in out.items()}
    if memo is not None:
        memo[key] = ({k: _copy(q) for k, q in out.items()}, dict(errors))
    return out, errors


def adaround_quantize(w: torch.Tensor, fmt: str, group_size: int, scale_dtype: str, stats, name: str = "weight",
                      iters: int | None = None, scale_search: bool = False, sweeps: int = SWEEPS
                      ) -> QuantizedWeight:  # fmt: skip
    """Learned rounding of ``w`` ``[N, K]`` onto ``fmt``'s grid on the calibration inputs ``stats`` (see the module
    docstring): of :func:`adaround_candidates`, the one ``stats.choice[fmt]`` names when a rounding choice recorded
    one (:func:`ditkern.quant.choose_rounding`), else the lower output error of learned rounding + polish and GPTQ +
    polish. ``iters``: Adam steps (default: :data:`ITERS`, fewer for small layers; 0: no learned rounding);
    ``sweeps``: coordinate-descent passes after it (0: none)."""
    cands, errors = _candidates(w, fmt, group_size, scale_dtype, stats, name, iters, scale_search, sweeps)
    chosen = (getattr(stats, "choice", None) or {}).get(get_format(fmt).name)
    if chosen is not None:
        return cands[chosen]
    return cands[min(DEFAULT_PICK, key=errors.get)]


def _error(wq: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    d = (wq - W).double()
    return ((d @ H.double()) * d).sum().item()


def _fingerprint(w: torch.Tensor) -> str:
    return hashlib.sha1(w.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _copy(q: QuantizedWeight) -> QuantizedWeight:
    sm = None if q.smooth is None else q.smooth.clone()
    return QuantizedWeight(q.packed.clone(), q.scales.clone(), q.format, q.group_size, q.shape, sm)
