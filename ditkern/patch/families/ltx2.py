"""LTX-2 (``LTX2VideoTransformer3DModel``): the audio-video blocks fused, on the video and the audio stream.

``LTX2VideoTransformerBlock`` normalises with RMSNorm (no affine) and takes its modulation from per-layer tables plus
the model's timestep embeddings (``[B, 1, D]``, or ``[B, S, D]`` for per-token timesteps). Per stream, three fusions:
norm1 + the self-attention modulation (``adaln_modulate``); the gated self-attention residual + norm2 (plus the text-query
modulation where ``cross_attn_adaln``; ``gated_residual_adaln``); and the last residual before the feed-forward - the
gated audio-to-video (video) / video-to-audio (audio) cross-attention add, or when that is switched off
(``isolate_modalities``) the norm3 modulation alone - + norm3 + the MLP modulation. Left as diffusers computes them: the
text cross-attention residual followed by the unmodulated a2v/v2a norms (two modulations of one normalised tensor), and
the final norm_out modulation (in the model's forward).

Stack: ``transformer_blocks``, ``(hidden_states, audio_hidden_states) -> (hidden_states, audio_hidden_states)``; the model
reads both streams after it. Attention: ``attn1`` is the video self-attention over the latent grid (frames x height x
width, the pipeline packs tokens in that raster order; read from the call's ``num_frames``/``height``/``width`` over the
patch sizes); the audio self-attention (1-D) and every cross-attention stay dense. Only
``LTX2AudioVideoAttnProcessor`` is windowed: ``LTX2PerturbedAttnProcessor`` skips the attention product on STG blocks.
"""

from __future__ import annotations

import inspect
import math

from ditkern.patch.common import (
    BLOCK_WHAT, adaln_plan, check_fingerprint, has_attrs, modulate, norm_spec, residual_modulate,
)  # fmt: skip
from ditkern.patch.family import COMMON_SKIP, Family, QuantLayout, Stack, Streams, TokenLayout
from ditkern.patch.fingerprints import FINGERPRINTS

AUDIO_VIDEO = Streams(takes=("hidden_states", "audio_hidden_states"), returns=("hidden_states", "audio_hidden_states"))
"""``block(hidden_states, audio_hidden_states, ...) -> (hidden_states, audio_hidden_states)``"""

_NORMS = ("norm1", "audio_norm1", "norm2", "audio_norm2", "norm3", "audio_norm3")


def ltx2_grid(model, args, kwargs, read_ids: bool = True):
    """LTX-2's video tokens: ``hidden_states`` ``[B, S, C]`` packed from the latent ``[B, C, F, H, W]`` in (frame, row,
    column) order; the latent sizes come with the call (``num_frames``, ``height``, ``width``). None when the call
    passes ``video_coords`` alone. No text tokens enter the self-attention."""
    a = inspect.signature(type(model).forward).bind_partial(model, *args, **kwargs).arguments
    n = a["hidden_states"].shape[1]
    sizes = (a.get("num_frames"), a.get("height"), a.get("width"))
    if any(s is None for s in sizes):
        return None, n, 0
    c = model.config
    grid = tuple(-(-s // p) for s, p in zip(sizes, (c.patch_size_t, c.patch_size, c.patch_size)))
    return (grid if math.prod(grid) == n else None), n, 0


def ltx2_block_rule(block, cfg):
    if not cfg.fused_norms:
        return None
    reason = (
        has_attrs(block, *_NORMS, "attn1", "audio_attn1", "attn2", "audio_attn2", "audio_to_video_norm",
                  "video_to_audio_norm", "audio_to_video_attn", "video_to_audio_attn", "ff", "audio_ff",
                  "scale_shift_table", "audio_scale_shift_table", "video_a2v_cross_attn_scale_shift_table",
                  "audio_a2v_cross_attn_scale_shift_table", "video_cross_attn_adaln", "audio_cross_attn_adaln",
                  "cross_attn_adaln", "perturbed_attn", "get_mod_params")  # fmt: skip
        or check_fingerprint(block, FINGERPRINTS["LTX2VideoTransformerBlock"])
        or next((s for s in (norm_spec(getattr(block, n)) for n in _NORMS) if isinstance(s, str)), None)
    )
    if reason:
        return reason
    backend = cfg.backend

    def forward(
        block, hidden_states, audio_hidden_states, encoder_hidden_states, audio_encoder_hidden_states, temb,
        temb_audio, temb_ca_scale_shift, temb_ca_audio_scale_shift, temb_ca_gate, temb_ca_audio_gate,
        temb_prompt=None, temb_prompt_audio=None, video_rotary_emb=None, audio_rotary_emb=None,
        ca_video_rotary_emb=None, ca_audio_rotary_emb=None, encoder_attention_mask=None,
        audio_encoder_attention_mask=None, self_attention_mask=None, audio_self_attention_mask=None,
        a2v_cross_attention_mask=None, v2a_cross_attention_mask=None, use_a2v_cross_attention=True,
        use_v2a_cross_attention=True, perturbation_mask=None, all_perturbed=None,
    ):  # fmt: skip
        batch_size = hidden_states.size(0)

        # 1.1 video self-attention: norm1 + modulation fused; the gated residual fused with norm2 (+ text-q modulation)
        video_ada_params = block.get_mod_params(block.scale_shift_table, temb, batch_size)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = video_ada_params[:6]
        text_q = (None, None)
        if block.video_cross_attn_adaln:
            shift_text_q, scale_text_q, gate_text_q = video_ada_params[6:9]
            text_q = (shift_text_q, scale_text_q)
        norm_hidden_states = modulate(block.norm1, hidden_states, shift_msa, scale_msa, backend)
        video_self_attn_args = {
            "hidden_states": norm_hidden_states,
            "encoder_hidden_states": None,
            "query_rotary_emb": video_rotary_emb,
            "attention_mask": self_attention_mask,
        }
        if block.perturbed_attn:
            video_self_attn_args["perturbation_mask"] = perturbation_mask
            video_self_attn_args["all_perturbed"] = all_perturbed
        attn_hidden_states = block.attn1(**video_self_attn_args)
        hidden_states, norm_hidden_states = residual_modulate(
            block.norm2, hidden_states, attn_hidden_states, gate_msa, *text_q, backend
        )

        # 1.2 audio self-attention, likewise
        audio_ada_params = block.get_mod_params(block.audio_scale_shift_table, temb_audio, batch_size)
        audio_shift_msa, audio_scale_msa, audio_gate_msa, audio_shift_mlp, audio_scale_mlp, audio_gate_mlp = (
            audio_ada_params[:6]
        )
        audio_text_q = (None, None)
        if block.audio_cross_attn_adaln:
            audio_shift_text_q, audio_scale_text_q, audio_gate_text_q = audio_ada_params[6:9]
            audio_text_q = (audio_shift_text_q, audio_scale_text_q)
        norm_audio_hidden_states = modulate(block.audio_norm1, audio_hidden_states, audio_shift_msa, audio_scale_msa,
                                            backend)  # fmt: skip
        audio_self_attn_args = {
            "hidden_states": norm_audio_hidden_states,
            "encoder_hidden_states": None,
            "query_rotary_emb": audio_rotary_emb,
            "attention_mask": audio_self_attention_mask,
        }
        if block.perturbed_attn:
            audio_self_attn_args["perturbation_mask"] = perturbation_mask
            audio_self_attn_args["all_perturbed"] = all_perturbed
        attn_audio_hidden_states = block.audio_attn1(**audio_self_attn_args)
        audio_hidden_states, norm_audio_hidden_states = residual_modulate(
            block.audio_norm2, audio_hidden_states, attn_audio_hidden_states, audio_gate_msa, *audio_text_q, backend
        )

        # 2. text cross-attention (the prompt key/value modulation as diffusers computes it)
        if block.cross_attn_adaln:
            if temb_prompt is not None:
                shift_text_kv, scale_text_kv = block.get_mod_params(block.prompt_scale_shift_table, temb_prompt,
                                                                    batch_size)  # fmt: skip
            else:
                shift_text_kv, scale_text_kv = (
                    block.prompt_scale_shift_table[None, None]
                    .to(device=hidden_states.device, dtype=hidden_states.dtype)
                    .unbind(dim=2)
                )
            if temb_prompt_audio is not None:
                audio_shift_text_kv, audio_scale_text_kv = block.get_mod_params(
                    block.audio_prompt_scale_shift_table, temb_prompt_audio, batch_size
                )
            else:
                audio_shift_text_kv, audio_scale_text_kv = (
                    block.audio_prompt_scale_shift_table[None, None]
                    .to(device=audio_hidden_states.device, dtype=audio_hidden_states.dtype)
                    .unbind(dim=2)
                )
            encoder_hidden_states = encoder_hidden_states * (1 + scale_text_kv) + shift_text_kv
        attn_hidden_states = block.attn2(
            norm_hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            query_rotary_emb=None,
            attention_mask=encoder_attention_mask,
        )
        if block.video_cross_attn_adaln:
            attn_hidden_states = attn_hidden_states * gate_text_q
        hidden_states = hidden_states + attn_hidden_states

        if block.cross_attn_adaln:
            audio_encoder_hidden_states = audio_encoder_hidden_states * (1 + audio_scale_text_kv) + audio_shift_text_kv
        attn_audio_hidden_states = block.audio_attn2(
            norm_audio_hidden_states,
            encoder_hidden_states=audio_encoder_hidden_states,
            query_rotary_emb=None,
            attention_mask=audio_encoder_attention_mask,
        )
        if block.audio_cross_attn_adaln:
            attn_audio_hidden_states = attn_audio_hidden_states * audio_gate_text_q
        audio_hidden_states = audio_hidden_states + attn_audio_hidden_states

        # 3. audio-to-video and video-to-audio cross-attention; each gated residual fused with norm3 + MLP modulation
        norm3_hidden_states = norm3_audio_hidden_states = None
        if use_a2v_cross_attention or use_v2a_cross_attention:
            norm_hidden_states = block.audio_to_video_norm(hidden_states)
            norm_audio_hidden_states = block.video_to_audio_norm(audio_hidden_states)

            video_per_layer_ca_scale_shift = block.video_a2v_cross_attn_scale_shift_table[:4, :]
            video_per_layer_ca_gate = block.video_a2v_cross_attn_scale_shift_table[4:, :]
            video_ca_ada_params = block.get_mod_params(video_per_layer_ca_scale_shift, temb_ca_scale_shift, batch_size)
            video_ca_gate_param = block.get_mod_params(video_per_layer_ca_gate, temb_ca_gate, batch_size)
            video_a2v_ca_scale, video_a2v_ca_shift, video_v2a_ca_scale, video_v2a_ca_shift = video_ca_ada_params
            a2v_gate = video_ca_gate_param[0].squeeze(2)

            audio_per_layer_ca_scale_shift = block.audio_a2v_cross_attn_scale_shift_table[:4, :]
            audio_per_layer_ca_gate = block.audio_a2v_cross_attn_scale_shift_table[4:, :]
            audio_ca_ada_params = block.get_mod_params(
                audio_per_layer_ca_scale_shift, temb_ca_audio_scale_shift, batch_size
            )
            audio_ca_gate_param = block.get_mod_params(audio_per_layer_ca_gate, temb_ca_audio_gate, batch_size)
            audio_a2v_ca_scale, audio_a2v_ca_shift, audio_v2a_ca_scale, audio_v2a_ca_shift = audio_ca_ada_params
            v2a_gate = audio_ca_gate_param[0].squeeze(2)

            if use_a2v_cross_attention:
                mod_norm_hidden_states = norm_hidden_states * (
                    1 + video_a2v_ca_scale.squeeze(2)
                ) + video_a2v_ca_shift.squeeze(2)
                mod_norm_audio_hidden_states = norm_audio_hidden_states * (
                    1 + audio_a2v_ca_scale.squeeze(2)
                ) + audio_a2v_ca_shift.squeeze(2)
                a2v_attn_hidden_states = block.audio_to_video_attn(
                    mod_norm_hidden_states,
                    encoder_hidden_states=mod_norm_audio_hidden_states,
                    query_rotary_emb=ca_video_rotary_emb,
                    key_rotary_emb=ca_audio_rotary_emb,
                    attention_mask=a2v_cross_attention_mask,
                )
                hidden_states, norm3_hidden_states = residual_modulate(
                    block.norm3, hidden_states, a2v_attn_hidden_states, a2v_gate, shift_mlp, scale_mlp, backend
                )

            if use_v2a_cross_attention:
                mod_norm_hidden_states = norm_hidden_states * (
                    1 + video_v2a_ca_scale.squeeze(2)
                ) + video_v2a_ca_shift.squeeze(2)
                mod_norm_audio_hidden_states = norm_audio_hidden_states * (
                    1 + audio_v2a_ca_scale.squeeze(2)
                ) + audio_v2a_ca_shift.squeeze(2)
                v2a_attn_hidden_states = block.video_to_audio_attn(
                    mod_norm_audio_hidden_states,
                    encoder_hidden_states=mod_norm_hidden_states,
                    query_rotary_emb=ca_audio_rotary_emb,
                    key_rotary_emb=ca_video_rotary_emb,
                    attention_mask=v2a_cross_attention_mask,
                )
                audio_hidden_states, norm3_audio_hidden_states = residual_modulate(
                    block.audio_norm3, audio_hidden_states, v2a_attn_hidden_states, v2a_gate, audio_shift_mlp,
                    audio_scale_mlp, backend,
                )  # fmt: skip

        # 4. feed-forward
        if norm3_hidden_states is None:
            norm3_hidden_states = modulate(block.norm3, hidden_states, shift_mlp, scale_mlp, backend)
        ff_output = block.ff(norm3_hidden_states)
        hidden_states = hidden_states + ff_output * gate_mlp

        if norm3_audio_hidden_states is None:
            norm3_audio_hidden_states = modulate(block.audio_norm3, audio_hidden_states, audio_shift_mlp,
                                                 audio_scale_mlp, backend)  # fmt: skip
        audio_ff_output = block.audio_ff(norm3_audio_hidden_states)
        audio_hidden_states = audio_hidden_states + audio_ff_output * audio_gate_mlp
        return hidden_states, audio_hidden_states

    return adaln_plan("block", BLOCK_WHAT, forward, block, block.norm1, cfg)


FAMILY = Family(
    name="ltx2",
    model_classes=("LTX2VideoTransformer3DModel",),
    rules={"LTX2VideoTransformerBlock": ltx2_block_rule},
    stack=Stack(
        lists=("transformer_blocks",),
        blocks={"LTX2VideoTransformerBlock": AUDIO_VIDEO},
        reads_after=("hidden_states", "audio_hidden_states"),
    ),
    attention=TokenLayout(
        self_attention={"LTX2VideoTransformerBlock": ("attn1",)},
        processors=frozenset({"LTX2AudioVideoAttnProcessor"}),
        text="first",
        grid=ltx2_grid,
    ),
    quant=QuantLayout(
        skip=(
            *COMMON_SKIP,
            "proj_in", "audio_proj_in", "audio_proj_out",  # the patch embedders and output projections
            "caption_projection*", "audio_caption_projection*",  # text projections
            "av_cross_attn_*", "prompt_adaln*", "audio_prompt_adaln*",  # timestep modulation (as time_embed)
        ),
    ),  # fmt: skip
    notes="the text cross-attention residual + the unmodulated a2v/v2a norms and the final norm_out modulation are not "
    "fused; the audio self-attention (1-D) is not windowed",
)
