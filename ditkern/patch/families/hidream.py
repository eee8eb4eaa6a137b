"""HiDream-I1 (``HiDreamImageTransformer2DModel``): MoE feed-forwards on fused dispatch, adaLN modulations fused.

* ``MOEFeedForwardSwiGLU`` (the image stream's FFN in every block) is declared an MoE layer: the ``moe`` feature
  (``ditkern/moe/feature.py``) replaces its inference forward (``MoEGate`` + ``moe_infer``, which calls
  ``bincount().cpu()`` - a host synchronisation - and loops over experts in Python) by a :class:`ditkern.nn.SparseMoE`
  that :func:`sparse_moe` builds at patch time: the routed experts are stacked into ``[E, ...]`` tensors (the memory is
  in the report), the router weight and the shared expert are the layer's own. Training mode (unless the layer forces
  its inference output) runs the original forward. The stacked copy is taken at patch time: re-patch after changing
  expert weights or moving the model.
* ``HiDreamImageTransformerBlock`` / ``HiDreamImageSingleTransformerBlock``: ``norm(x) * (1 + scale) + shift`` fused
  (``adaln_modulate``), and the gated attention residual fused with the feed-forward norm + modulation
  (``gated_residual_adaln``).

Stack: the double-stream, then the single-stream blocks (each wrapped in a ``HiDreamBlock``). The Taylor cache does
not apply: the model's forward feeds every block its own slice of the LLaMA text states (concatenated before the
block, cut off after it), so the stack is not one chain of blocks whose residual could be forecast. Windowed
attention is not declared (HiDream's attention runs through its own processor).
"""

from __future__ import annotations

import os

from ditkern.patch.common import (
    ADALN_WHAT,
    adaln_plan,
    check_fingerprint,
    has_attrs,
    modulate,
    norm_spec,
    residual_modulate,
    source_fingerprint,
)
from ditkern.patch.family import COMMON_SKIP, Family, MoELayer, QuantLayout, Stack

# source fingerprints (common.source_fingerprint) of the diffusers code the patched forwards mirror
FINGERPRINTS: dict[str, set[str]] = {
    "MOEFeedForwardSwiGLU.forward": {"6463a4d420afc014"},  # diffusers 0.42.1
    "MOEFeedForwardSwiGLU.moe_infer": {"3c9140d85d5a9e1a"},  # diffusers 0.42.1
    "MoEGate.forward": {"82a91b3604232fce"},  # diffusers 0.42.1
    "HiDreamImageTransformerBlock": {"e140002a3c6984d1"},  # diffusers 0.42.1
    "HiDreamImageSingleTransformerBlock": {"01d822182ec33ee0"},  # diffusers 0.42.1
}
BLOCK_WHAT = "adaLN modulate + gated residual fused (adaln_modulate, gated_residual_adaln)"


def _moe_fingerprint_reason(m) -> str | None:
    if os.environ.get("DITKERN_TRUST_BLOCK_SOURCE", "0") == "1":
        return None
    for key, fn in (
        ("MOEFeedForwardSwiGLU.forward", type(m).forward),
        ("MOEFeedForwardSwiGLU.moe_infer", getattr(type(m), "moe_infer", None)),
        ("MoEGate.forward", type(m.gate).forward),
    ):
        fp = source_fingerprint(fn) if fn is not None else "missing"
        if fp not in FINGERPRINTS[key]:
            return (
                f"{key} of the installed diffusers (fingerprint {fp}) differs from the version ditkern's MoE "
                "dispatch mirrors; left unpatched (DITKERN_TRUST_BLOCK_SOURCE=1 patches anyway)"
            )
    return None


def sparse_moe(m, block_m: int, backend: str):
    """The ``SparseMoE`` computing ``MOEFeedForwardSwiGLU``'s inference forward (router and shared expert shared with
    the layer, routed experts stacked), or the reason the layer is left alone."""
    reason = has_attrs(m, "gate", "experts", "shared_experts", "num_activated_experts", "_force_inference_output")
    reason = reason or has_attrs(m.gate, "weight", "top_k", "scoring_func", "norm_topk_prob")
    if reason:
        return reason
    if m.gate.scoring_func != "softmax":
        return f"gate.scoring_func={m.gate.scoring_func!r}; ditkern mirrors HiDream's 'softmax'"
    if len(m.experts) != m.gate.weight.shape[0] or m.gate.top_k != m.num_activated_experts:
        return "the gate's expert count / top_k do not match the layer's experts"
    reason = _moe_fingerprint_reason(m)
    if reason:
        return reason
    from ditkern.nn.sparse_moe import SparseMoE  # noqa: PLC0415

    return SparseMoE.from_hidream(m, share=True, block_m=block_m, backend=backend)


def _runs_original(m) -> bool:
    return m.training and not m._force_inference_output  # HiDream's training path (repeat_interleave + aux loss)


def _block_reason(block, single: bool) -> str | None:
    names = ["adaLN_modulation", "norm1_i", "attn1", "norm3_i", "ff_i"]
    names += [] if single else ["norm1_t", "norm3_t", "ff_t"]
    reason = has_attrs(block, *names) or check_fingerprint(block, FINGERPRINTS[type(block).__name__])
    if reason:
        return reason
    for n in names:
        if n.startswith("norm") and isinstance(s := norm_spec(getattr(block, n)), str):
            return s
    return None


def single_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = _block_reason(block, single=True)
    if reason:
        return reason
    backend = cfg.backend

    def forward(block, hidden_states, hidden_states_masks=None, encoder_hidden_states=None, temb=None,
                image_rotary_emb=None):  # fmt: skip
        wtype = hidden_states.dtype
        shift_msa_i, scale_msa_i, gate_msa_i, shift_mlp_i, scale_mlp_i, gate_mlp_i = block.adaLN_modulation(temb)[
            :, None
        ].chunk(6, dim=-1)
        norm_hidden_states = modulate(block.norm1_i, hidden_states, shift_msa_i, scale_msa_i, backend)
        attn_output_i = block.attn1(norm_hidden_states, hidden_states_masks, image_rotary_emb=image_rotary_emb)
        hidden_states, norm_hidden_states = residual_modulate(
            block.norm3_i, hidden_states, attn_output_i, gate_msa_i, shift_mlp_i, scale_mlp_i, backend
        )
        ff_output_i = gate_mlp_i * block.ff_i(norm_hidden_states.to(dtype=wtype))
        return ff_output_i + hidden_states

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm3_i, cfg)


def double_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = _block_reason(block, single=False)
    if reason:
        return reason
    backend = cfg.backend

    def forward(block, hidden_states, hidden_states_masks=None, encoder_hidden_states=None, temb=None,
                image_rotary_emb=None):  # fmt: skip
        (
            shift_msa_i, scale_msa_i, gate_msa_i, shift_mlp_i, scale_mlp_i, gate_mlp_i,
            shift_msa_t, scale_msa_t, gate_msa_t, shift_mlp_t, scale_mlp_t, gate_mlp_t,
        ) = block.adaLN_modulation(temb)[:, None].chunk(12, dim=-1)  # fmt: skip
        norm_hidden_states = modulate(block.norm1_i, hidden_states, shift_msa_i, scale_msa_i, backend)
        norm_encoder_hidden_states = modulate(block.norm1_t, encoder_hidden_states, shift_msa_t, scale_msa_t, backend)
        attn_output_i, attn_output_t = block.attn1(
            norm_hidden_states, hidden_states_masks, norm_encoder_hidden_states, image_rotary_emb=image_rotary_emb
        )
        hidden_states, norm_hidden_states = residual_modulate(
            block.norm3_i, hidden_states, attn_output_i, gate_msa_i, shift_mlp_i, scale_mlp_i, backend
        )
        encoder_hidden_states, norm_encoder_hidden_states = residual_modulate(
            block.norm3_t, encoder_hidden_states, attn_output_t, gate_msa_t, shift_mlp_t, scale_mlp_t, backend
        )
        ff_output_i = gate_mlp_i * block.ff_i(norm_hidden_states)
        ff_output_t = gate_mlp_t * block.ff_t(norm_encoder_hidden_states)
        return ff_output_i + hidden_states, ff_output_t + encoder_hidden_states

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm3_i, cfg)


FAMILY = Family(
    name="hidream",
    model_classes=("HiDreamImageTransformer2DModel",),
    rules={
        "HiDreamImageTransformerBlock": double_block_rule,
        "HiDreamImageSingleTransformerBlock": single_block_rule,
    },
    stack=Stack(
        lists=("double_stream_blocks", "single_stream_blocks"),
        blocks={},
        cache="the model feeds each block its own slice of the LLaMA text states between blocks: no single chain",
    ),
    attention="no token layout declared for HiDream's attention processor",
    quant=QuantLayout(skip=(*COMMON_SKIP, "caption_projection*")),
    moe={"MOEFeedForwardSwiGLU": MoELayer(build=sparse_moe, original=_runs_original)},
    notes="the final layer's adaLN (HiDreamImageOutEmbed) is not fused; " + ADALN_WHAT,
)
