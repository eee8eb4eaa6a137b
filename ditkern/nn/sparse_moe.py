"""``SparseMoE``: a sparse mixture-of-experts feed-forward layer on ditkern's MoE ops.

    logits = router(x)                                   [T, E]
    ids, g = top_k(score(logits))                        moe_route (softmax | sigmoid, optional renormalisation)
    y[t, j] = g[t, j] * expert_{ids[t, j]}(x_t)          moe_align + moe_grouped_mlp (one grouped GEMM pair)
    out[t] = sum_j y[t, j] + shared(x_t) + out_bias      moe_combine

Experts are stacked SwiGLU (``w2 @ (silu(w1 x) * w3 x)``, HiDream / Llama style) or GELU MLPs
(``w2 @ gelu(w1 x + b1)``, diffusers' FeedForward) in ``[E, ...]`` parameters, with an optional per-expert output
bias ``b2[e]`` (inside the routing weight). ``weighting="ones"`` uses the router
only to select experts (each selected expert counts fully): the converter ``ditkern.moe.densify_to_moe`` needs it,
so that ``top_k = num_experts`` reproduces the dense FFN exactly. Every step runs on the device with static shapes:
no host synchronisation, and ``torch.compile(fullgraph=True)`` traces the layer.

Gradients flow to x, the router, the stacked experts, the biases and the shared expert (every op has a backward, see
``ditkern.ops.moe``); routing itself (which experts) is discrete and has none, as in the model. ``routed_grad=False``
computes the routed experts (route, dispatch, expert MLPs) under ``torch.no_grad()``, leaving only the shared expert
and the output bias differentiable: that is what diffusers' HiDream layer does in inference mode (``moe_infer`` is
decorated with ``@torch.no_grad()``), and :meth:`SparseMoE.from_hidream` sets it so that gradients through a patched
HiDream model are those of the unpatched one (its stacked experts are copies: a gradient on them would reach none of
the model's parameters anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditkern.ops.moe import (
    ACTIVATIONS,
    DEFAULT_BLOCK_M,
    SCORES,
    moe_align,
    moe_combine,
    moe_grouped_mlp,
    moe_route,
)


class SparseMoE(nn.Module):
    """Top-k routed experts (+ an optional shared expert) with fused dispatch. See the module docstring."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        *,
        activation: str = "swiglu",
        expert_bias: bool = False,
        expert_out_bias: bool = False,
        out_bias: bool = False,
        shared_expert: nn.Module | None = None,
        score: str = "softmax",
        renormalize: bool = False,
        weighting: str = "score",
        router_bias: bool = False,
        block_m: int = DEFAULT_BLOCK_M,
        backend: str | None = None,
        routed_grad: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if weighting not in ("score", "ones"):
            raise ValueError(f"weighting must be 'score' or 'ones', got {weighting!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        kw = dict(device=device, dtype=dtype)
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.activation, self.score, self.renormalize, self.weighting = activation, score, renormalize, weighting
        self.block_m, self.backend, self.routed_grad = block_m, backend, routed_grad
        self.router = nn.Linear(dim, num_experts, bias=router_bias, **kw)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **kw))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **kw)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **kw))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dim, **kw)) if expert_bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim, **kw)) if expert_out_bias else None
        self.out_bias = nn.Parameter(torch.zeros(dim, **kw)) if out_bias else None
        self.shared = shared_expert
        for w in (self.w1, self.w3, self.w2):
            if w is not None:
                nn.init.normal_(w, std=w.shape[-1] ** -0.5)

    # ------------------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, self.dim)
        if self.routed_grad:
            y = self._routed(xf)
        else:
            with torch.no_grad():
                y = self._routed(xf)
        shared = self.shared(xf) if self.shared is not None else None
        if shared is not None and shared.dtype != y.dtype:
            shared = shared.to(y.dtype)
        return moe_combine(y, shared, self.out_bias, backend=self.backend).reshape(shape)

    def _routed(self, xf: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted outputs y [T, top_k, D]."""
        ids, weights = self.route(xf)
        sorted_ids, block_expert, _ = moe_align(ids, self.num_experts, self.block_m, backend=self.backend)
        return moe_grouped_mlp(
            xf, sorted_ids, block_expert, self.w1, self.w2, None if self.weighting == "ones" else weights,
            w3=self.w3, b1=self.b1, b2=self.b2, top_k=self.top_k, activation=self.activation, backend=self.backend,
        )  # fmt: skip

    def route(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [T, top_k], weights [T, top_k]) of the rows of ``xf`` [T, D]."""
        logits = F.linear(xf, self.router.weight, self.router.bias)
        return moe_route(logits, self.top_k, renormalize=self.renormalize, score=self.score, backend=self.backend)

    # ------------------------------------------------------------------------------------------------------------------
    def expert_parameters(self) -> int:
        """Parameters of one routed expert."""
        n = sum(w[0].numel() for w in (self.w1, self.w3, self.w2, self.b1, self.b2) if w is not None)
        return n

    def activated_parameters(self) -> int:
        """Parameters one token uses: router + top_k experts + shared expert + output bias."""
        n = self.router.weight.numel() + (self.router.bias.numel() if self.router.bias is not None else 0)
        n += self.top_k * self.expert_parameters()
        n += sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        n += self.out_bias.numel() if self.out_bias is not None else 0
        return n

    def stacked_bytes(self) -> int:
        """Bytes held by the stacked expert weights (the copy made when converting a model's experts)."""
        return sum(w.numel() * w.element_size() for w in (self.w1, self.w3, self.w2, self.b1, self.b2) if w is not None)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"activation={self.activation!r}, score={self.score!r}, weighting={self.weighting!r}"
        )

    # ------------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hidream(
        cls, moe_layer: nn.Module, *, share: bool = False, block_m: int = DEFAULT_BLOCK_M, backend: str | None = None
    ) -> SparseMoE:
        """A SparseMoE computing diffusers' ``MOEFeedForwardSwiGLU`` (HiDream-I1) in inference mode, gradients
        included: ``routed_grad=False``, as ``moe_infer`` runs under ``torch.no_grad()`` (set ``moe.routed_grad = True``
        and ``requires_grad_`` on the stacked experts to train the copy instead).

        The routed experts are stacked into ``[E, ...]`` copies. ``share=True`` makes the router weight and the
        shared expert the layer's own objects (what ``ditkern.patch`` does: only the stacked experts cost memory);
        otherwise they are copied too, and the result is independent of the layer.
        """
        import copy  # noqa: PLC0415

        gate, experts = moe_layer.gate, moe_layer.experts
        if getattr(gate, "scoring_func", "softmax") != "softmax":
            raise ValueError(f"moe_layer.gate.scoring_func={gate.scoring_func!r}: only HiDream's 'softmax' is known")
        E, D = gate.weight.shape
        w1 = torch.stack([e.w1.weight.detach() for e in experts])
        w3 = torch.stack([e.w3.weight.detach() for e in experts])
        w2 = torch.stack([e.w2.weight.detach() for e in experts])
        if len(experts) != E:
            raise ValueError(f"moe_layer has {len(experts)} experts but its gate routes to {E}")
        renorm = bool(getattr(gate, "norm_topk_prob", False)) and gate.top_k > 1
        p = gate.weight
        moe = cls(
            D, w1.shape[1], E, int(gate.top_k), activation="swiglu", renormalize=renorm, block_m=block_m,
            backend=backend, routed_grad=False, device=p.device, dtype=p.dtype,
            shared_expert=moe_layer.shared_experts if share else copy.deepcopy(moe_layer.shared_experts),
        )  # fmt: skip
        with torch.no_grad():
            moe.w1.copy_(w1)
            moe.w3.copy_(w3)
            moe.w2.copy_(w2)
            if share:
                moe.router.weight = gate.weight
            else:
                moe.router.weight.copy_(gate.weight)
        for w in (moe.w1, moe.w3, moe.w2):  # not the shared router / shared expert: they belong to the model
            w.requires_grad_(False)
        return moe
