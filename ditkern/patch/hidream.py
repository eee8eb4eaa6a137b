"""HiDream-I1 (``HiDreamImageTransformer2DModel``): MoE feed-forwards on fused dispatch, adaLN modulations fused.

* ``MOEFeedForwardSwiGLU`` (the image stream's FFN in every block): its inference forward (``MoEGate`` + ``moe_infer``,
  which calls ``bincount().cpu()`` - a host synchronisation - and loops over experts in Python) is replaced by a
  :class:`ditkern.nn.SparseMoE` built at patch time: the routed experts are stacked into ``[E, ...]`` tensors (the
  memory is in the report), the router weight and the shared expert are the layer's own. Training mode runs the
  original forward. The stacked copy is taken at patch time: re-patch after changing expert weights or moving the
  model.
* ``HiDreamImageTransformerBlock`` / ``HiDreamImageSingleTransformerBlock``: ``norm(x) * (1 + scale) + shift`` fused
  (``adaln_modulate``), and the gated attention residual fused with the feed-forward norm + modulation
  (``gated_residual_adaln``).
"""

from __future__ import annotations

from ditkern.moe.config import resolve
from ditkern.patch.common import (
    ADALN_WHAT,
    check_fingerprint,
    has_attrs,
    modulate,
    norm_spec,
    residual_modulate,
    source_fingerprint,
)
from ditkern.patch.engine import Family, Plan, register_family

# source fingerprints (common.source_fingerprint) of the diffusers code the patched forwards mirror
FINGERPRINTS: dict[str, set[str]] = {
    "MOEFeedForwardSwiGLU.forward": {"6463a4d420afc014"},  # diffusers 0.42.1
    "MOEFeedForwardSwiGLU.moe_infer": {"3c9140d85d5a9e1a"},  # diffusers 0.42.1
    "MoEGate.forward": {"82a91b3604232fce"},  # diffusers 0.42.1
    "HiDreamImageTransformerBlock": {"e140002a3c6984d1"},  # diffusers 0.42.1
    "HiDreamImageSingleTransformerBlock": {"01d822182ec33ee0"},  # diffusers 0.42.1
}
MOE_WHAT = "MoE dispatch fused: route + align + grouped SwiGLU + combine, no host sync (SparseMoE)"
BLOCK_WHAT = "adaLN modulate + gated residual fused (adaln_modulate, gated_residual_adaln)"


def _moe_fingerprint_reason(m) -> str | None:
    import os  # noqa: PLC0415

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


def moe_ffn_rule(m, cfg):
    opts = resolve(cfg.moe)
    if not opts.enabled:
        return None
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

    sparse = SparseMoE.from_hidream(m, share=True, block_m=opts.block_m, backend=cfg.backend)
    mib = sparse.stacked_bytes() / 2**20
    original = type(m).forward

    def apply(module):
        module.__dict__["_ditkern_sparse_moe"] = sparse  # not a submodule: the model's state_dict is unchanged

    def undo(module):
        module.__dict__.pop("_ditkern_sparse_moe", None)

    def forward(module, x):
        if module.training and not module._force_inference_output:
            return original(module, x)  # HiDream's training path (repeat_interleave + aux loss); no autograd here
        moe = module.__dict__["_ditkern_sparse_moe"]
        if moe.w1.device != x.device or moe.w1.dtype != x.dtype:
            raise RuntimeError(
                f"ditkern: the experts of this MoE layer were stacked on {moe.w1.device} in {moe.w1.dtype} at patch "
                f"time but the input is {x.device} {x.dtype}; patch after moving / casting the model"
            )
        return moe(x)

    return Plan(
        "moe", MOE_WHAT, forward, apply, undo,
        detail=f"{len(m.experts)} experts top-{m.gate.top_k}, stacked copy {mib:.2f} MiB",
    )  # fmt: skip


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

    return Plan("block", BLOCK_WHAT, forward)


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

    return Plan("block", BLOCK_WHAT, forward)


HIDREAM = register_family(
    Family(
        name="hidream",
        model_classes=("HiDreamImageTransformer2DModel",),
        rules={
            "MOEFeedForwardSwiGLU": moe_ffn_rule,
            "HiDreamImageTransformerBlock": double_block_rule,
            "HiDreamImageSingleTransformerBlock": single_block_rule,
        },
        notes="the final layer's adaLN (HiDreamImageOutEmbed) is not fused; " + ADALN_WHAT,
    )
)
