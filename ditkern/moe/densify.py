"""Dense2MoE-style conversion of a dense feed-forward layer into a :class:`ditkern.nn.SparseMoE`.

Dense2MoE (arXiv 2510.09094) restructures a DiT's dense FFNs into mixture-of-experts layers to cut the parameters
each token activates. This module does the training-free part of that recipe:

1. **Split the hidden neurons into experts by co-activation.** On calibration inputs X [n, D] the hidden activations
   H = act(X W1^T + b1) [n, F] are recorded; each neuron is described by its normalised |activation| profile over
   the calibration tokens, and the neurons are grouped into ``num_experts`` equal-size clusters with a balanced
   k-means (greedy capacity-constrained assignment to the nearest centroid, a few Lloyd iterations). Neurons that fire
   on the same tokens land in the same expert, so a token needs few experts. Expert e keeps its neurons' rows of W1
   (and b1, W3) and columns of W2 unchanged; the output bias b2 is added once, after the experts.
2. **Build a router that predicts which experts matter.** The target for token x and expert e is the norm of that
   expert's contribution to the output, ||W2[:, g_e] H[x, g_e]||. The router is linear, ``logits = R x + c``,
   initialised from the cluster centroids (the mean input weight ``mean_{f in g_e} W1[f]`` of the expert's neurons,
   scaled to the targets) and fitted by ridge-regularised least squares towards that initialisation:
   ``min ||[X 1] [R c]^T - S||^2 + lam ||R - R0||^2``, closed form in float64.
3. The router only selects (``weighting="ones"``): a selected expert contributes its full output, as in the dense
   layer. With ``top_k = num_experts`` every neuron is used and the layer equals the dense FFN up to float
   reassociation.
4. (``compensate=True``, off by default) A skipped expert is replaced by its mean output over the calibration tokens
   that skip it: a constant folded into biases (``b2[e] = -c_e`` inside each expert, ``+ sum_e c_e`` on the layer
   output), at no extra compute. It lowers a single layer's error (tests/moe/test_densify.py); on the reference
   pipelines it added 0.5-2.0 dB PSNR on digits-flux but lowered PSNR and class accuracy on digits-dit
   (bench/results/moe/densify_fidelity.md), hence off by default.

Supported FFNs: diffusers ``FeedForward`` with a GELU / tanh-GELU projection (DiT, PixArt, FLUX double blocks, SD3),
HiDream's ``HiDreamImageFeedForwardSwiGLU`` (w1, w3, w2) and ``nn.Sequential(Linear, GELU, Linear)``. If F is not a
multiple of ``num_experts`` the experts are padded with zero neurons (they contribute exactly 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditkern.nn.sparse_moe import SparseMoE


@dataclass
class DenseFFN:
    """A dense FFN in a common form: ``w2 @ act(w1 x + b1 [, w3 x]) + b2``; weights ``[out, in]``."""

    w1: torch.Tensor  # [F, D]
    b1: torch.Tensor | None  # [F]
    w3: torch.Tensor | None  # [F, D] (SwiGLU only)
    w2: torch.Tensor  # [D_out, F]
    b2: torch.Tensor | None  # [D_out]
    activation: str  # "swiglu" | "gelu" | "gelu_tanh"

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        a = F.linear(x, self.w1, self.b1)
        if self.activation == "swiglu":
            return F.silu(a) * F.linear(x, self.w3)
        return F.gelu(a, approximate="tanh" if self.activation == "gelu_tanh" else "none")


def dense_ffn(ffn: nn.Module) -> DenseFFN:
    """Read a supported dense FFN (see the module docstring); raises ValueError naming what is not supported."""
    name = type(ffn).__name__
    if all(hasattr(ffn, n) for n in ("w1", "w2", "w3")) and isinstance(ffn.w1, nn.Linear):  # HiDream / Llama SwiGLU
        if any(getattr(ffn, n).bias is not None for n in ("w1", "w2", "w3")):
            raise ValueError(f"ffn ({name}): SwiGLU projections with bias are not supported")
        return DenseFFN(ffn.w1.weight, None, ffn.w3.weight, ffn.w2.weight, None, "swiglu")
    if name == "FeedForward" and hasattr(ffn, "net"):
        proj, out = ffn.net[0], ffn.net[-1]
        act = type(proj).__name__
        if act == "GELU" and hasattr(proj, "proj") and isinstance(out, nn.Linear):
            kind = "gelu_tanh" if getattr(proj, "approximate", "none") == "tanh" else "gelu"
            return DenseFFN(proj.proj.weight, proj.proj.bias, None, out.weight, out.bias, kind)
        raise ValueError(f"ffn (FeedForward with {act}): only GELU / tanh-GELU projections are supported")
    seq = isinstance(ffn, nn.Sequential) and len(ffn) == 3
    if seq and isinstance(ffn[0], nn.Linear) and isinstance(ffn[2], nn.Linear):
        if isinstance(ffn[1], nn.GELU):
            kind = "gelu_tanh" if ffn[1].approximate == "tanh" else "gelu"
            return DenseFFN(ffn[0].weight, ffn[0].bias, None, ffn[2].weight, ffn[2].bias, kind)
    raise ValueError(
        f"ffn ({name}) is not a supported dense FFN: diffusers FeedForward(GELU), HiDream SwiGLU (w1/w2/w3) or "
        "nn.Sequential(Linear, GELU, Linear)"
    )


def _balanced_kmeans(feats: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Equal-size clusters of the rows of ``feats`` [F, n] (F a multiple of k) -> labels [F]."""
    Fn = feats.shape[0]
    cap = Fn // k
    centroids = feats[torch.randperm(Fn, generator=generator)[:k]].clone()
    labels = torch.empty(Fn, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(feats, centroids)  # [F, k]
        # greedy capacity-constrained assignment: closest (neuron, cluster) pairs first
        room = [cap] * k
        taken = [False] * Fn
        lab = [0] * Fn
        left = Fn
        for flat in torch.argsort(dist.flatten()).tolist():
            f, c = divmod(flat, k)
            if taken[f] or room[c] == 0:
                continue
            lab[f], taken[f] = c, True
            room[c] -= 1
            left -= 1
            if left == 0:
                break
        labels = torch.tensor(lab)
        new = torch.stack([feats[labels == c].mean(0) for c in range(k)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    return labels


@torch.no_grad()
def densify_to_moe(
    ffn: nn.Module,
    num_experts: int,
    top_k: int,
    calibration_inputs: torch.Tensor,
    *,
    ridge: float = 1e-3,
    compensate: bool = False,
    kmeans_iters: int = 10,
    max_tokens: int = 4096,
    seed: int = 0,
    block_m: int | None = None,
    backend: str | None = None,
) -> SparseMoE:
    """Convert a dense FFN into a :class:`SparseMoE` with ``num_experts`` experts, ``top_k`` active per token.

    ``calibration_inputs``: inputs of the FFN ``[..., D]`` (e.g. recorded with a forward hook while the pipeline
    runs); at most ``max_tokens`` rows (a seeded random subset) are used. ``ridge``: the weight of the pull towards
    the centroid initialisation in the router fit, relative to the mean diagonal of ``X^T X``. ``compensate``: give
    each expert an output bias ``-c_e`` and the layer ``+sum_e c_e``, with ``c_e`` the mean output of expert e on the
    calibration tokens that do not select it, so an expert that is skipped still contributes its typical output
    (a constant: no compute); a selected expert's terms cancel. The result has the
    FFN's device and dtype; with ``top_k == num_experts`` it equals the FFN up to float reassociation.
    """
    dense = dense_ffn(ffn)
    Fh, D = dense.w1.shape
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= Fh:
        raise ValueError(f"num_experts must be an int in [1, F={Fh}] (hidden neurons), got {num_experts!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    if not isinstance(calibration_inputs, torch.Tensor) or calibration_inputs.shape[-1] != D:
        ci = calibration_inputs
        shape = tuple(ci.shape) if isinstance(ci, torch.Tensor) else type(ci).__name__
        raise ValueError(f"calibration_inputs must be a tensor [..., D={D}], got {shape}")
    if dense.w2.shape[0] != D:
        raise ValueError(f"ffn maps {D} -> {dense.w2.shape[0]} features; SparseMoE needs equal input and output widths")
    g = torch.Generator().manual_seed(seed)
    X = calibration_inputs.reshape(-1, D).detach()
    if X.shape[0] > max_tokens:
        X = X[torch.randperm(X.shape[0], generator=g)[:max_tokens].to(X.device)]
    if X.shape[0] < 2:
        raise ValueError("calibration_inputs must hold at least 2 tokens")
    cpu64 = lambda t: None if t is None else t.detach().to("cpu", torch.float64)  # noqa: E731
    d = DenseFFN(cpu64(dense.w1), cpu64(dense.b1), cpu64(dense.w3), cpu64(dense.w2), cpu64(dense.b2), dense.activation)
    Xd = cpu64(X)
    H = d.hidden(Xd)  # [n, F]

    # 1. neurons -> experts (pad F to a multiple of E with zero neurons)
    per = -(-Fh // num_experts)
    F_pad = per * num_experts
    prof = H.abs().t()  # [F, n]
    prof = prof / (prof.norm(dim=1, keepdim=True) + 1e-12)
    if F_pad > Fh:
        prof = torch.cat([prof, torch.zeros(F_pad - Fh, prof.shape[1], dtype=prof.dtype)])
    labels = _balanced_kmeans(prof.float(), num_experts, kmeans_iters, g) if num_experts > 1 else torch.zeros(
        F_pad, dtype=torch.long
    )
    groups = [torch.nonzero(labels == e).flatten() for e in range(num_experts)]

    def take_rows(w, idx):  # rows of w for neuron ids, zero rows for padding ids
        out = torch.zeros((len(idx),) + tuple(w.shape[1:]), dtype=w.dtype)
        real = idx < Fh
        out[real] = w[idx[real]]
        return out

    # 2. router: target = norm of each expert's output contribution; init from the experts' mean input weights
    C = torch.stack([take_rows(H.t(), grp).t() @ take_rows(d.w2.t(), grp) for grp in groups], dim=1)  # [n, E, D]
    # what skipping expert e costs token x: its contribution, less the constant that compensation adds back
    S = (C - C.mean(0, keepdim=True)).norm(dim=2) if compensate else C.norm(dim=2)  # [n, E]
    R0 = torch.stack([take_rows(d.w1, grp)[: int((grp < Fh).sum())].mean(0) if (grp < Fh).any() else
                      torch.zeros(D, dtype=torch.float64) for grp in groups])  # [E, D] fmt: skip
    z0 = Xd @ R0.t()
    scale = (z0 * (S - S.mean(0))).sum() / ((z0 - z0.mean(0)).pow(2).sum() + 1e-12)  # fit the init's overall scale
    R0 = R0 * scale
    Xa = torch.cat([Xd, torch.ones(Xd.shape[0], 1, dtype=Xd.dtype)], dim=1)  # [n, D + 1]
    A = Xa.t() @ Xa
    lam = ridge * A.diagonal()[:D].mean().item()
    prior = torch.cat([R0, S.mean(0, keepdim=True).t() - R0 @ Xd.mean(0, keepdim=True).t()], dim=1)  # [E, D + 1]
    reg = torch.eye(D + 1, dtype=torch.float64) * lam
    reg[D, D] = 0.0  # the router bias is not pulled
    Rb = torch.linalg.solve(A + reg, Xa.t() @ S + reg @ prior.t()).t()  # [E, D + 1]

    # compensation: the mean output of each expert over the calibration tokens whose routing skips it
    comp = None
    if compensate and top_k < num_experts:
        chosen = torch.zeros(Xd.shape[0], num_experts, dtype=torch.bool)
        chosen.scatter_(1, (Xa @ Rb.t()).topk(top_k, dim=1).indices, True)
        skipped = (~chosen).double()  # [n, E]
        comp = (C * skipped[:, :, None]).sum(0) / skipped.sum(0).clamp(min=1)[:, None]  # [E, D]

    # 3. the SparseMoE
    p = dense.w1
    moe = SparseMoE(
        D, per, num_experts, top_k, activation=dense.activation, expert_bias=dense.b1 is not None,
        expert_out_bias=comp is not None, out_bias=dense.b2 is not None or comp is not None, weighting="ones",
        router_bias=True, block_m=block_m, backend=backend, device=p.device, dtype=p.dtype,
    )  # fmt: skip
    to = dict(device=p.device, dtype=p.dtype)
    moe.w1.copy_(torch.stack([take_rows(d.w1, grp) for grp in groups]).to(**to))
    moe.w2.copy_(torch.stack([take_rows(d.w2.t(), grp).t() for grp in groups]).to(**to))
    if moe.w3 is not None:
        moe.w3.copy_(torch.stack([take_rows(d.w3, grp) for grp in groups]).to(**to))
    if moe.b1 is not None:
        moe.b1.copy_(torch.stack([take_rows(d.b1[:, None], grp)[:, 0] for grp in groups]).to(**to))
    if moe.out_bias is not None:
        b_out = d.b2 if d.b2 is not None else torch.zeros(D, dtype=torch.float64)
        moe.out_bias.copy_((b_out + (comp.sum(0) if comp is not None else 0)).to(**to))
    if comp is not None:
        moe.b2.copy_((-comp).to(**to))
    moe.router.weight.copy_(Rb[:, :D].to(**to))
    moe.router.bias.copy_(Rb[:, D].to(**to))
    moe.neuron_groups = [grp[grp < Fh] for grp in groups]  # for inspection: the dense neurons of each expert
    return moe.requires_grad_(False)


def dense_parameters(ffn: nn.Module) -> int:
    """Parameters of a supported dense FFN (what each token uses)."""
    d = dense_ffn(ffn)
    return sum(t.numel() for t in (d.w1, d.b1, d.w3, d.w2, d.b2) if t is not None)
