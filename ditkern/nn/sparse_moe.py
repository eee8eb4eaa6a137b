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
HiDream model are those of the unpatched one.

Memory: :meth:`SparseMoE.from_hidream` stacks the experts once; :meth:`SparseMoE.tie_sources` (what ``ditkern.patch``
does) then re-points the layer's own ``nn.Linear`` weights at slices of the stack and frees their old storage, so the
model holds one copy of its experts (HiDream-I1-Full: 405 MiB per layer that are not doubled), and
:meth:`SparseMoE.untie_sources` (``ditkern.unpatch``) gives them independent storage again, bit-identical.
:meth:`ExpertChoiceMoE.from_nucleus` copies nothing: the grouped GEMMs read Nucleus' packed experts through strides.
``block_m=None`` (the default) picks moe_align's block per call from the shapes (``ops.moe.auto_block_m``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditkern.ops.moe import (
    ACTIVATIONS,
    SCORES,
    auto_block_m,
    expert_choice_align,
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
        block_m: int | None = None,
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
        block_m = self.block_m or auto_block_m(ids.numel(), self.num_experts)
        sorted_ids, block_expert, _ = moe_align(ids, self.num_experts, block_m, backend=self.backend)
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
        """Bytes held by the stacked expert weights (a copy of a model's experts unless :meth:`tie_sources` ran)."""
        return sum(w.numel() * w.element_size() for w in (self.w1, self.w3, self.w2, self.b1, self.b2) if w is not None)

    def tie_sources(self) -> int:
        """Re-point the source model's expert weights (recorded by :meth:`from_hidream`) at their slices of the
        stacked tensors, freeing their own storage: the model then holds one copy of its experts, and in-place
        changes to either side (``load_state_dict``, an optimizer step) are seen by both. The Parameter objects stay
        the same (only ``.data`` changes), so hooks and references to them are unaffected. Returns the bytes freed
        (what the stack would otherwise duplicate)."""
        freed = 0
        for param, name, e in self.__dict__.get("_sources", ()):
            view = getattr(self, name)[e]
            if param.data.data_ptr() != view.data_ptr():
                if param.shape != view.shape or param.dtype != view.dtype or param.device != view.device:
                    continue  # moved / cast since the stack was taken: leave it (the forward raises on the mismatch)
                freed += param.numel() * param.element_size()
                param.data = view
        self.__dict__["_tied"] = True
        return freed

    def untie_sources(self) -> None:
        """Give the source model's expert weights independent storage again (same values: bit-identical)."""
        if not self.__dict__.pop("_tied", False):
            return
        for param, name, e in self.__dict__.get("_sources", ()):
            if param.data.data_ptr() == getattr(self, name)[e].data_ptr():
                param.data = param.data.clone()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"activation={self.activation!r}, score={self.score!r}, weighting={self.weighting!r}"
        )

    # ------------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hidream(
        cls, moe_layer: nn.Module, *, share: bool = False, block_m: int | None = None, backend: str | None = None
    ) -> SparseMoE:
        """A SparseMoE computing diffusers' ``MOEFeedForwardSwiGLU`` (HiDream-I1) in inference mode, gradients
        included: ``routed_grad=False``, as ``moe_infer`` runs under ``torch.no_grad()`` (set ``moe.routed_grad = True``
        and ``requires_grad_`` on the stacked experts to train the copy instead).

        The routed experts are stacked into ``[E, ...]`` tensors (one copy, made without any other temporary).
        ``share=True`` makes the router weight and the shared expert the layer's own objects and records the layer's
        expert weights for :meth:`tie_sources` (what ``ditkern.patch`` does, so the experts are not held twice);
        otherwise they are copied too, and the result is independent of the layer.
        """
        import copy  # noqa: PLC0415

        gate, experts = moe_layer.gate, moe_layer.experts
        if getattr(gate, "scoring_func", "softmax") != "softmax":
            raise ValueError(f"moe_layer.gate.scoring_func={gate.scoring_func!r}: only HiDream's 'softmax' is known")
        E, D = gate.weight.shape
        if len(experts) != E:
            raise ValueError(f"moe_layer has {len(experts)} experts but its gate routes to {E}")
        renorm = bool(getattr(gate, "norm_topk_prob", False)) and gate.top_k > 1
        p = gate.weight
        # built on the meta device (nothing allocated or initialised), then given the real tensors
        moe = cls(
            D, experts[0].w1.weight.shape[0], E, int(gate.top_k), activation="swiglu", renormalize=renorm,
            block_m=block_m, backend=backend, routed_grad=False, device="meta", dtype=p.dtype,
            shared_expert=moe_layer.shared_experts if share else copy.deepcopy(moe_layer.shared_experts),
        )  # fmt: skip
        with torch.no_grad():
            for name in ("w1", "w3", "w2"):  # not trainable: the model's own parameters are (see the module docstring)
                stacked = torch.stack([getattr(e, name).weight.detach() for e in experts])
                setattr(moe, name, nn.Parameter(stacked, requires_grad=False))
            moe.router.weight = gate.weight if share else nn.Parameter(gate.weight.detach().clone())
        if share:
            moe.__dict__["_sources"] = [(getattr(ex, name).weight, name, e) for e, ex in enumerate(experts)
                                        for name in ("w1", "w3", "w2")]  # fmt: skip
        return moe


class ExpertChoiceMoE(nn.Module):
    """Expert-choice routed SwiGLU experts with a fixed capacity + a shared expert: diffusers' ``NucleusMoELayer``.

    For ``x`` [B, S, D] (the experts' input), ``x_router`` [B, S, D] (the router's input, in Nucleus the unmodulated
    norm) and an optional ``temb`` [B, Dt] (prepended to every token's router input)::

        logits   = gate([temb, x_router])                 [B, S, E]   in the model dtype
        scores   = softmax(logits.float()).to(dtype)       (or sigmoid), over the experts
        C        = max(1, ceil(capacity_factor * S / E))   fixed: depends on the shapes only
        idx, g   = topk(scores^T, C) per (item, expert)    each expert takes its C best tokens (torch.topk's order)
        g        = route_scale * g / (sum of g over the experts that took the token + 1e-12)
        out[t]   = shared(x_t) + sum_{(e, c) took t} g * expert_e(x_t)

    The routing is the same torch ops diffusers runs (so ties, the renormalisation's dtype and its summation are
    identical); the experts run as one grouped GEMM pair (``moe_grouped_mlp`` with ``top_k=1``) over the routed rows
    ``r = e * B * C + b * C + c`` (expert-major, as diffusers lays them out): every expert has exactly ``B * C`` rows,
    so ``expert_choice_align`` builds the layout from the sizes alone, on the device (no host sync). The combine adds
    the weighted rows into the shared expert's output with ``index_add`` in fp32, rounded once to the model dtype
    (diffusers rounds the routed rows, then scatter-adds in the model dtype). On CPU that sum is sequential in routed
    row order (deterministic); on CUDA it uses fp32 atomics, whose order is not fixed (run-to-run differences are fp32
    rounding, ~1e-7 relative; ``torch.use_deterministic_algorithms(True)`` makes it deterministic).

    Weights: ``w1, w3`` [E, F, D] and ``w2`` [E, D, F] in the grouped GEMM's layout; :meth:`from_nucleus` makes them
    strided views of the layer's packed ``gate_up_proj`` / ``down_proj`` (no copy: the GEMMs read through strides).
    ``source`` (diffusers' ``SwiGLUExperts``, optional) is read instead when grad mode is on and its weights
    require grad, so that gradients reach the model's own expert parameters (as in the unpatched layer).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        capacity_factor: float,
        *,
        router_dim: int | None = None,
        score: str = "softmax",
        route_scale: float = 1.0,
        shared_expert: nn.Module | None = None,
        block_m: int | None = None,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
        kw = dict(device=device, dtype=dtype)
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.capacity_factor, self.score, self.route_scale = float(capacity_factor), score, float(route_scale)
        self.block_m, self.backend = block_m, backend
        self.router = nn.Linear(dim if router_dim is None else router_dim, num_experts, bias=False, **kw)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **kw))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **kw))
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=w.shape[-1] ** -0.5)
        self.shared = shared_expert
        self.source = None  # SwiGLUExperts whose parameters the grad path reads (not a submodule)

    def capacity(self, seq_len: int) -> int:
        """Tokens each expert takes per item: ``max(1, ceil(capacity_factor * S / E))`` (diffusers' formula)."""
        return max(1, math.ceil(self.capacity_factor * seq_len / self.num_experts))

    def route(self, x_router: torch.Tensor, temb: torch.Tensor | None = None):
        """``(tokens [E * B * C] int64, gates [E * B * C])``: the flat token of each routed row (expert-major) and
        its renormalised, scaled gate in the model dtype."""
        B, S, _ = x_router.shape
        if temb is not None:
            x_router = torch.cat([temb.unsqueeze(1).expand(-1, S, -1), x_router], dim=-1)
        logits = F.linear(x_router, self.router.weight)
        fn = torch.sigmoid if self.score == "sigmoid" else (lambda t: F.softmax(t, dim=-1))
        scores = fn(logits.float()).to(logits.dtype)
        affinity = scores.transpose(1, 2)  # [B, E, S]
        idx = torch.topk(affinity, k=self.capacity(S), dim=-1).indices  # [B, E, C]
        gating = affinity.gather(dim=-1, index=idx)
        offsets = torch.arange(B, device=idx.device, dtype=torch.long).view(B, 1, 1) * S
        tokens = (offsets + idx).transpose(0, 1).reshape(-1)  # [E * B * C], expert-major
        gates = gating.transpose(0, 1).reshape(-1)
        sums = torch.zeros(B * S, device=idx.device, dtype=gates.dtype).scatter_add(0, tokens, gates)
        gates = gates / (sums[tokens] + 1e-12) * self.route_scale
        return tokens, gates

    def _weights(self):
        src = self.source
        if src is not None and torch.is_grad_enabled() and (src.gate_up_proj.requires_grad or
                                                            src.down_proj.requires_grad):  # fmt: skip
            Fh = self.hidden_dim
            gu = src.gate_up_proj  # [E, D, 2F]
            return (gu[..., :Fh].transpose(1, 2).contiguous(), gu[..., Fh:].transpose(1, 2).contiguous(),
                    src.down_proj.transpose(1, 2).contiguous())  # fmt: skip
        return self.w1, self.w3, self.w2

    def forward(self, x: torch.Tensor, x_router: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        B, S, D = x.shape
        tokens, gates = self.route(x_router, timestep)
        xf = x.reshape(B * S, D)
        rows = tokens.numel() // self.num_experts
        block_m = self.block_m or auto_block_m(tokens.numel(), self.num_experts)
        sorted_ids, block_expert = expert_choice_align(self.num_experts, rows, block_m, device=x.device)
        w1, w3, w2 = self._weights()
        y = moe_grouped_mlp(
            xf[tokens], sorted_ids, block_expert, w1, w2, gates.reshape(-1, 1), w3=w3, top_k=1,
            activation="swiglu", backend=self.backend,
        )  # fmt: skip  # [N, 1, D], gates applied in fp32
        out = self.shared(x).reshape(B * S, D) if self.shared is not None else xf.new_zeros(B * S, D)
        out = out.float().index_add(0, tokens, y.reshape(-1, D).float())
        return out.to(x.dtype).reshape(B, S, D)

    def stacked_bytes(self) -> int:
        """Bytes of expert weights this module holds of its own (0 when they are views of the source's)."""
        src = self.source
        own = {p.untyped_storage().data_ptr() for p in (src.gate_up_proj, src.down_proj)} if src is not None else set()
        return sum(w.numel() * w.element_size() for w in (self.w1, self.w3, self.w2)
                   if w.untyped_storage().data_ptr() not in own)  # fmt: skip

    def report_detail(self) -> str:
        held = self.stacked_bytes()
        where = f"stacked copy {held / 2**20:.2f} MiB" if held else "experts read in place (no copy)"
        return (f"{self.num_experts} experts, expert-choice capacity ceil({self.capacity_factor:g} * S / "
                f"{self.num_experts}), {where}")  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"capacity_factor={self.capacity_factor:g}, score={self.score!r}, route_scale={self.route_scale:g}"
        )

    @classmethod
    def from_nucleus(
        cls, layer: nn.Module, *, block_m: int | None = None, backend: str | None = None
    ) -> ExpertChoiceMoE:
        """The module computing diffusers' ``NucleusMoELayer`` (forward and gradients): the router and the shared
        expert are the layer's own objects; the experts' packed ``gate_up_proj`` [E, D, 2F] / ``down_proj`` [E, F, D]
        are read in place as strided ``[E, F, D]`` / ``[E, D, F]`` views (no copy; the grad path reads the
        Parameters themselves)."""
        ex = layer.experts
        E, D, F2 = ex.gate_up_proj.shape
        Fh = F2 // 2
        p = ex.gate_up_proj
        moe = cls(
            D, Fh, E, layer.capacity_factor, router_dim=layer.gate.weight.shape[1],
            score="sigmoid" if layer.use_sigmoid else "softmax", route_scale=layer.route_scale,
            shared_expert=layer.shared_expert, block_m=block_m, backend=backend, device="meta", dtype=p.dtype,
        )  # fmt: skip
        gu, down = p.detach(), ex.down_proj.detach()
        moe.w1 = nn.Parameter(gu[..., :Fh].transpose(1, 2), requires_grad=False)  # [E, F, D], strides (D 2F, 1, 2F)
        moe.w3 = nn.Parameter(gu[..., Fh:].transpose(1, 2), requires_grad=False)
        moe.w2 = nn.Parameter(down.transpose(1, 2), requires_grad=False)  # [E, D, F], strides (F D, 1, D)
        moe.router.weight = layer.gate.weight
        moe.__dict__["source"] = ex  # not registered: the model owns it
        return moe
