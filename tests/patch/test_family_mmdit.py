"""FLUX.2, Chroma and Qwen-Image (ditkern/patch/families/flux2.py, chroma.py, qwenimage.py) on tiny random models built
from config, with inputs as their pipelines pass them: patched == unpatched (STYLE.md rule against float64), unpatch
bit-exact, the report rows, unexpected structure skipped with its reason, a patched block under
torch.compile(fullgraph=True), the Taylor cache (or the reason it does not apply), int4 weights with the family's skip
list, windowed attention (or the reason), and gradients through the patched model."""

import copy
from collections import Counter

import pytest
import torch

import ditkern
from ditkern.cache import stats
from ditkern.quant.feature import quantized_layers
from tests.patch import tiny_mmdit as tiny

CLASSES = {"flux2": "Flux2TransformerBlock", "chroma": "ChromaTransformerBlock", "qwenimage": "QwenImageTransformerBlock"}
VARIANTS = {  # the model calls each pipeline makes
    "flux2": tiny.flux2,
    "chroma": tiny.chroma,  # with the T5 padding mask, as ChromaPipeline always passes it
    "chroma-nomask": lambda: tiny.chroma(mask=False),
    "qwenimage": tiny.qwenimage,
    "qwenimage-textmask": lambda: tiny.qwenimage(text_mask=True),
    "qwenimage-edit2511": lambda: tiny.qwenimage(zero_cond_t=True),  # per-token modulation (modulate_index)
}


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _to(inputs, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def _hooks_left(model):
    return [n for n, m in model.named_modules() if hasattr(m, "_diffusers_hook") or "forward" in m.__dict__]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_supported_models_lists_the_classes():
    for cls in ("Flux2Transformer2DModel", "ChromaTransformer2DModel", "QwenImageTransformer2DModel"):
        assert cls in ditkern.supported_models()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_patch_matches_unpatched_and_unpatch_is_exact(variant):
    family = variant.split("-")[0]
    # the Triton kernels, through the interpreter on CPU, for each family; the input variants on the torch path (the
    # same fused forwards, the op's reference; keeps the file's time within budget)
    backend = "triton" if variant == family else "torch"
    model, inputs = VARIANTS[variant]()
    model.eval()
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    before = _run(model, inputs)

    report = ditkern.patch(model, backend=backend)
    assert Counter(r.cls for r in report.patched) == Counter(tiny.EXPECTED[family]), str(report)
    assert not report.skipped and all(r.backend == backend for r in report.patched), str(report)
    patched = _run(model, inputs)

    # STYLE.md: err(patched) <= 2 * err(unpatched, same dtype) + floor, both against the float64 model
    err_unpatched, err_patched = _err(before, ref64), _err(patched, ref64)
    assert err_patched <= 2 * err_unpatched + 1e-5, (err_patched, err_unpatched)
    if backend == "triton":
        assert not torch.equal(patched, before)  # the fused kernels really ran (fp32 rounding differs)

    ditkern.unpatch(model)
    assert not ditkern.is_patched(model) and _hooks_left(model) == []
    assert torch.equal(_run(model, inputs), before)  # bit-exact


def _swap_norm(family, model):
    """Replace one norm by a module the fused kernels do not describe; returns (the module skipped, its class)."""
    if family == "flux2":
        model.transformer_blocks[0].norm2 = torch.nn.Identity()
        return "transformer_blocks.0", "Flux2TransformerBlock"
    if family == "chroma":
        model.single_transformer_blocks[0].norm.norm = torch.nn.Identity()
        return "single_transformer_blocks.0.norm", "ChromaAdaLayerNormZeroSinglePruned"
    model.transformer_blocks[1].txt_norm2 = torch.nn.Identity()
    return "transformer_blocks.1", "QwenImageTransformerBlock"


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_unexpected_structure_is_skipped_with_its_reason(family):
    model, inputs = tiny.FAMILIES[family]()
    model.eval()
    path, cls = _swap_norm(family, model)
    before = _run(model, inputs)
    report = ditkern.patch(model, backend="torch")
    skipped = [r for r in report.skipped if r.module == path]
    assert len(skipped) == 1 and skipped[0].cls == cls, str(report)
    assert "norm Identity is not a layer or RMS norm" in skipped[0].reason, skipped[0]
    assert sum(Counter(r.cls for r in report.patched).values()) == sum(tiny.EXPECTED[family].values()) - 1
    # the skipped module runs its own forward; the rest stay fused (fp32 rounding apart)
    torch.testing.assert_close(_run(model, inputs), before, atol=1e-5, rtol=1e-5)
    ditkern.unpatch(model)


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_changed_diffusers_source_is_skipped_with_reason(family, monkeypatch):
    from ditkern.patch import fingerprints

    monkeypatch.setitem(fingerprints.FINGERPRINTS, CLASSES[family], {"0000000000000000"})
    model, _ = tiny.FAMILIES[family]()
    report = ditkern.patch(model, backend="torch")
    rows = [r for r in report.skipped if r.cls == CLASSES[family]]
    assert rows and all("differs from the versions" in r.reason for r in rows), str(report)
    ditkern.unpatch(model)


def test_flux2_changed_modulation_split_is_skipped(monkeypatch):
    from ditkern.patch import fingerprints

    monkeypatch.setitem(fingerprints.FINGERPRINTS, "Flux2Modulation.split", {"0000000000000000"})
    model, _ = tiny.flux2()
    report = ditkern.patch(model, backend="torch")
    assert {r.cls for r in report.skipped} == {"Flux2TransformerBlock", "Flux2SingleTransformerBlock"}
    assert all("Flux2Modulation.split" in r.reason for r in report.skipped)
    assert [r.cls for r in report.patched] == ["AdaLayerNormContinuous"]
    ditkern.unpatch(model)


def _block_call(family, model):
    """(block, args, kwargs) of one block call as the model makes it (batch 1)."""
    D = model.config.num_attention_heads * model.config.attention_head_dim
    x, c = torch.randn(1, 11, D), torch.randn(1, 4, D)
    if family == "flux2":
        return model.transformer_blocks[0], (x, c, torch.randn(1, 6 * D), torch.randn(1, 6 * D)), {}
    if family == "chroma":
        return model.transformer_blocks[0], (x, c, torch.randn(1, 12, D)), {}
    return model.transformer_blocks[0], (x, c, None, torch.randn(1, D)), {}


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_compile_fullgraph_of_patched_block(family):
    model, _ = tiny.FAMILIES[family](batch=1)
    model.eval()
    block, args, kwargs = _block_call(family, model)
    with torch.no_grad():
        expected = block(*args, **kwargs)
        with ditkern.patched(model, backend="torch"):  # the custom ops trace the same way on every backend
            eager = block(*args, **kwargs)
            torch._dynamo.reset()
            compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*args, **kwargs)
    for a, b, c in zip(compiled, eager, expected):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


TS = [0.95, 0.8, 0.6, 0.45, 0.3]


def _denoise(model, inputs, ts):
    outs, x = [], inputs["hidden_states"]
    for t in ts:
        out = _run(model, dict(inputs, hidden_states=x, timestep=torch.full((x.shape[0],), t)))
        outs.append(out)
        x = 0.9 * x + 0.1 * torch.tanh(out.repeat(1, 1, x.shape[-1] // out.shape[-1] + 1)[..., : x.shape[-1]])
    return outs


def test_qwenimage_taylor_cache():
    model, inputs = tiny.qwenimage()
    model.eval()
    ditkern.patch(model, backend="torch")
    fused = _denoise(model, inputs, TS)
    report = ditkern.patch(model, cache=ditkern.TaylorCache(order=1, interval=1), backend="torch")
    assert any("Taylor cache over 2 blocks" in r.what for r in report.patched), str(report)
    for a, b in zip(_denoise(model, inputs, TS), fused):
        assert torch.equal(a, b)  # interval=1: every step runs the stack
    assert stats(model)["forecast_calls"] == 0

    ditkern.patch(model, cache=ditkern.TaylorCache(order=1, interval=2), backend="torch")
    outs = _denoise(model, inputs, TS)
    st = stats(model)
    assert st["calls"] == 5 and st["forecast_calls"] > 0 and st["block_fraction"] < 1, st
    assert all(torch.isfinite(o).all() for o in outs)
    ditkern.unpatch(model)
    assert _hooks_left(model) == []


def _chain_model(family):
    """The tiny model with 2 single-stream blocks (Chroma's tiny model has one: too few for a chain)."""
    model, inputs = tiny.FAMILIES[family]()
    if len(model.single_transformer_blocks) < 2:
        torch.manual_seed(0)
        model = type(model).from_config({**model.config, "num_single_layers": 2})
    return model.eval(), inputs


@pytest.mark.parametrize("family", ["flux2", "chroma"])
def test_taylor_cache_over_the_single_stream_chain(family):
    """The model concatenates text and image between its two block lists, so the stack is not one chain; its Stack
    declares ``cached=("single_transformer_blocks",)``: the cache forecasts across the single-stream blocks (on the
    joint sequence) and the double-stream blocks always run."""
    model, inputs = _chain_model(family)
    n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    ditkern.patch(model, backend="torch")
    fused = _denoise(model, inputs, TS)
    report = ditkern.patch(model, cache=ditkern.TaylorCache(order=1, interval=1), backend="torch")
    what = f"Taylor cache over {n_single} blocks (of {n_double + n_single}; the others always run)"
    assert any(r.what.startswith(what) for r in report.patched), str(report)
    roles = Counter(r.what for r in report.patched if r.what.startswith("Taylor cache:"))
    assert sum(roles.values()) == n_single, roles  # the double blocks carry no cache hook
    for a, b in zip(_denoise(model, inputs, TS), fused):
        assert torch.equal(a, b)  # interval=1: every step runs the stack
    assert stats(model)["forecast_calls"] == 0

    ditkern.patch(model, cache=ditkern.TaylorCache(order=1, interval=2), backend="torch")
    outs = _denoise(model, inputs, TS)
    again = _denoise(model, inputs, TS)  # a second generation: the timestep goes back up, the state resets
    st = stats(model)
    n_fc = st["forecast_calls"] // 2
    assert st["calls"] == 10 and n_fc > 0 and st["generations"] == 2, st  # two generations, counted from the first
    total = n_double + n_single
    assert st["block_fraction"] == pytest.approx(1 - n_fc * n_single / (5 * total)) and st["block_fraction"] < 1, st
    assert all(torch.isfinite(o).all() for o in outs)
    assert any(not torch.equal(a, b) for a, b in zip(outs, fused))  # forecast steps skipped the single blocks
    assert all(torch.equal(a, b) for a, b in zip(outs, again))

    ditkern.patch(model, cache=ditkern.TaylorCache(order=1, gate=1e9), backend="torch")  # gated, always accepting
    outs = _denoise(model, inputs, TS)
    st = stats(model)
    assert st["forecast_calls"] == 4 and st["block_fraction"] < 1, st
    assert all(torch.isfinite(o).all() for o in outs)
    ditkern.unpatch(model)
    assert _hooks_left(model) == []
    ditkern.unpatch(model)


SKIPPED = {  # modules the family keeps in high precision by default
    "flux2": {"x_embedder", "context_embedder", "proj_out", "norm_out.linear", "double_stream_modulation_img.linear",
              "single_stream_modulation.linear", "time_guidance_embed.timestep_embedder.linear_1"},
    "chroma": {"x_embedder", "context_embedder", "proj_out", "distilled_guidance_layer.in_proj",
               "distilled_guidance_layer.out_proj"},
    "qwenimage": {"img_in", "txt_in", "proj_out", "norm_out.linear", "transformer_blocks.0.img_mod.1",
                  "transformer_blocks.1.txt_mod.1", "time_text_embed.timestep_embedder.linear_1"},
}  # fmt: skip
QUANTIZED = {  # and some it quantizes
    "flux2": {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.linear_in",
              "single_transformer_blocks.1.attn.to_qkv_mlp_proj"},
    "chroma": {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"},
    "qwenimage": {"transformer_blocks.0.attn.add_k_proj", "transformer_blocks.1.img_mlp.net.2"},
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_int4_quantizes_linears_except_the_skip_list(family):
    from ditkern.formats import sqnr_db

    model, inputs = tiny.FAMILIES[family]()
    model.eval()
    before = _run(model, inputs)
    report = ditkern.patch(model, quant="int4", backend="torch")
    layers = set(quantized_layers(model))
    kept = {r.module for r in report.skipped if r.cls == "Linear"}
    linears = {p for p, m in model.named_modules() if type(m).__name__ == "Linear"}
    assert layers | kept == linears and not layers & kept
    assert SKIPPED[family] <= kept, SKIPPED[family] - kept
    assert QUANTIZED[family] <= layers, QUANTIZED[family] - layers
    out = _run(model, inputs)
    assert sqnr_db(before, out) > 10  # 4-bit weights on a random model: close, not equal
    ditkern.unpatch(model)
    assert torch.equal(_run(model, inputs), before)


@pytest.mark.parametrize("family", ["flux2", "qwenimage"])
def test_window_covering_grid_is_dense_attention(family):
    model, inputs = tiny.FAMILIES[family]()
    model.eval()
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    before = _run(model, inputs)
    big = 2 * max(tiny.GRIDS[family]) + 1
    report = ditkern.patch(model, fused_norms=False, attention=ditkern.WindowAttention(window=big), backend="triton")
    rows = [r for r in report.patched if "(window_attention)" in r.what]
    assert len(rows) == tiny.BLOCKS[family] and not report.skipped, str(report)
    err_window, err_dense = _err(_run(model, inputs), ref64), _err(before, ref64)
    assert err_window <= 2 * err_dense + 1e-5, (err_window, err_dense)

    # a local window really restricts attention; layers= keeps the others dense
    report = ditkern.patch(model, attention=ditkern.WindowAttention(window=3, layers=[1]), backend="torch")
    assert sum("(window_attention)" in r.what for r in report.patched) == 1
    assert any("kept dense (block 0" in r.reason for r in report.skipped)
    assert _err(_run(model, inputs), before) > 1e-3
    ditkern.unpatch(model)
    assert _hooks_left(model) == [] and torch.equal(_run(model, inputs), before)


def test_chroma_window_with_text_padding_mask():
    """A padded batch (prompts of 4 and 6 tokens, each + the EOS): the blocks' mask, the outer product of the boolean padding
    mask, becomes the window op's text_mask; a window covering the grid is dense attention (on the image tokens, all
    the model returns), a small one is not; a mask that is not a text key-padding mask is refused at call time."""
    model, inputs = tiny.chroma()
    model.eval()
    text = inputs["attention_mask"][:, :7]
    assert not text[0].all() and not torch.equal(text[0], text[1])  # prompts of different lengths, one padded
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    before = _run(model, inputs)
    big = 2 * 6 + 1  # the 5 x 6 token grid
    report = ditkern.patch(model, fused_norms=False, attention=ditkern.WindowAttention(window=big), backend="torch")
    rows = [r for r in report.patched if "(window_attention)" in r.what]
    assert len(rows) == 2 and not report.skipped, str(report)  # one double-, one single-stream block
    err_window, err_dense = _err(_run(model, inputs), ref64), _err(before, ref64)
    assert err_window <= 2 * err_dense + 1e-5, (err_window, err_dense)
    ditkern.unpatch(model)
    with ditkern.patched(model, attention=ditkern.WindowAttention(window=3), backend="torch"):
        small = _run(model, inputs)
        assert torch.isfinite(small).all() and _err(small, before) > 1e-3
        # ChromaPipeline's own mask is float (the T5 mask in the encoder's dtype): SDPA adds it as a 0/1 bias
        bad = dict(inputs, attention_mask=inputs["attention_mask"].float())
        with pytest.raises(NotImplementedError, match="values other than 0 and -inf"):
            _run(model, bad)
        mask = inputs["attention_mask"].clone()
        mask[0, -1] = False  # an image token masked
        with pytest.raises(NotImplementedError, match="masks image keys"):
            _run(model, dict(inputs, attention_mask=mask))
    assert _hooks_left(model) == [] and torch.equal(_run(model, inputs), before)


def test_qwenimage_window_refuses_what_it_cannot_window():
    """A text padding mask (an SDPA mask) and an edit call (reference images appended: no single grid) are errors
    that say why, at call time."""
    for kw, exc, match in [(dict(text_mask=True), NotImplementedError, "attn_mask"),
                           (dict(zero_cond_t=True), ValueError, "one raster-ordered grid")]:  # fmt: skip
        model, inputs = tiny.qwenimage(**kw)
        model.eval()
        with ditkern.patched(model, attention=ditkern.WindowAttention(window=3), backend="torch"):
            with pytest.raises(exc, match=match):
                _run(model, inputs)


def _model_grads(model, inputs, cot):
    inputs = dict(inputs)
    x = inputs["hidden_states"].detach().requires_grad_(True)
    inputs["hidden_states"] = x
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    (out * cot.to(out.dtype)).sum().backward()
    return {**{n: p.grad for n, p in model.named_parameters()}, "<input>": x.grad}


@pytest.mark.parametrize("variant,backend", [("flux2", "torch"), ("chroma", "torch"), ("qwenimage", "triton"),
                                             ("qwenimage-edit2511", "torch")])  # fmt: skip
def test_backward_through_patched_model_matches_unpatched(variant, backend):
    """Every parameter gradient and the input gradient, patched and unpatched, against a float64 copy (STYLE.md rule;
    the floor is one fp32 rounding relative to the largest gradient, as in tests/test_grad.py)."""
    model, inputs = VARIANTS[variant]()
    model.train()
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        cot = torch.randn_like(model(**inputs, return_dict=False)[0], dtype=torch.float64)
    g64 = _model_grads(ref, _to(inputs, torch.float64), cot)
    unpatched = _model_grads(model, inputs, cot)
    with ditkern.patched(model, backend=backend) as report:
        assert report.patched and not report.skipped
        patched = _model_grads(model, inputs, cot)
    rows = [(n, _err(patched[n], r), _err(unpatched[n], r), r.abs().max().item()) for n, r in g64.items()
            if r is not None]  # fmt: skip
    assert len(rows) > 10 and all(patched[n] is not None for n, *_ in rows)
    scale = max(s for *_, s in rows)
    bad = [(n, ep, eu) for n, ep, eu, _ in rows if ep > 2 * eu + 1.2e-7 * scale]
    assert not bad, (bad, scale)
