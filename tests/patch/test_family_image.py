"""The image families Lumina2, Z-Image, CogView4, NucleusMoE and HunyuanImage on tiny random models built from config,
with the inputs their pipelines pass: patched output within the STYLE.md rule against a float64 run, unpatch
bit-exact, the report rows (what was fused, what was skipped and why), a module of unexpected structure skipped with
its reason, ``torch.compile(fullgraph=True)`` of a patched block, the Taylor cache, int4 quantization with the
family's skip list, windowed attention, and gradients through the patched model against the unpatched one."""

import copy
import fnmatch
from collections import Counter

import pytest
import torch

import ditkern
from ditkern.patch import engine
from tests.patch import tiny_image

FAMILIES = ("lumina2", "zimage", "cogview4", "nucleusmoe", "hunyuanimage")

# what the default patch fuses ({class: count}) and what it skips ({class: reason fragment})
EXPECTED = {
    "lumina2": {"Lumina2TransformerBlock": 3, "LuminaRMSNormZero": 3, "LuminaLayerNormContinuous": 1},
    "zimage": {"ZImageTransformerBlock": 3, "FinalLayer": 1},
    "cogview4": {"CogView4TransformerBlock": 2, "CogView4AdaLayerNormZero": 2, "CogView4AdaLayerNormContinuous": 1},
    "nucleusmoe": {"NucleusMoEImageTransformerBlock": 3, "AdaLayerNormContinuous": 1, "NucleusMoELayer": 2},
    "hunyuanimage": {"HunyuanImageTransformerBlock": 2, "AdaLayerNormZero": 4, "AdaLayerNormZeroSingle": 2,
                     "AdaLayerNormContinuous": 1},  # fmt: skip
}
SKIPPED = {
    "lumina2": {"context_refiner.0": "modulation=False (context refiner): RMSNorm-only block"},
    "zimage": {"context_refiner.0": "modulation=False (context / SigLIP refiner): RMSNorm-only block"},
    "cogview4": {},
    "nucleusmoe": {},
    "hunyuanimage": {},
}
LATENT = {family: "hidden_states" for family in FAMILIES} | {"zimage": "x"}
TIME = {family: "timestep" for family in FAMILIES} | {"zimage": "t"}
# the block whose norm is swapped for an Identity (unexpected structure) and the norm's attribute
BAD = {
    "lumina2": ("layers.0", "ffn_norm1"),
    "zimage": ("layers.1", "ffn_norm1"),
    "cogview4": ("transformer_blocks.0", "norm2_context"),
    "nucleusmoe": ("transformer_blocks.1", "pre_mlp_norm"),
    "hunyuanimage": ("transformer_blocks.1", "norm2_context"),
}


def _build(family, **kw):
    torch.manual_seed(0)
    model, inputs = getattr(tiny_image, family)(**kw)
    return model.eval(), inputs


def _map(v, fn):
    if isinstance(v, torch.Tensor):
        return fn(v)
    if isinstance(v, list):
        return [_map(u, fn) for u in v]
    return v


def _to(inputs, dtype):
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    return {k: _map(v, cast) for k, v in inputs.items()}


def _out(model, inputs):
    out = model(**inputs, return_dict=False)[0]
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image returns one latent per item


def _run(model, inputs):
    with torch.no_grad():
        return _out(model, inputs)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _hooks_left(model):
    return [n for n, m in model.named_modules() if hasattr(m, "_diffusers_hook") or "forward" in m.__dict__]


def _steps(family, inputs, ts):
    """The model's inputs at the sampler's timesteps ``ts`` (noise -> image), in the family's own time convention."""
    out = []
    batch = len(inputs[LATENT[family]])
    for t in ts:
        v = torch.full((batch,), float(t))
        v = {"lumina2": 1 - v / 1000, "zimage": (1000 - v) / 1000, "nucleusmoe": v / 1000}.get(family, v)
        out.append(dict(inputs, **{TIME[family]: v}))
    return out


def test_families_are_registered():
    supported = ditkern.supported_models()
    for cls in ("Lumina2Transformer2DModel", "ZImageTransformer2DModel", "CogView4Transformer2DModel",
                "NucleusMoEImageTransformer2DModel", "HunyuanImageTransformer2DModel"):  # fmt: skip
        assert cls in supported


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_matches_unpatched_and_unpatch_is_exact(family):
    model, inputs = _build(family)
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    before = _run(model, inputs)

    report = ditkern.patch(model, backend="triton")  # the Triton kernels, through the interpreter on CPU
    assert Counter(r.cls for r in report.patched) == Counter(EXPECTED[family]), str(report)
    assert all(r.backend == "triton" for r in report.patched)
    skipped = {r.module: r.reason for r in report.skipped}
    assert skipped.keys() == SKIPPED[family].keys(), str(report)
    for module, fragment in SKIPPED[family].items():
        assert fragment in skipped[module], str(report)
    patched = _run(model, inputs)

    # STYLE.md: err(patched) <= 2 * err(unpatched fp32) + floor, both against the float64 model
    err_unpatched, err_patched = _err(before, ref64), _err(patched, ref64)
    assert err_patched <= 2 * err_unpatched + 1e-5, (err_patched, err_unpatched)
    assert not torch.equal(patched, before)  # the fused path ran (fp32 rounding differs)

    ditkern.unpatch(model)
    assert not ditkern.is_patched(model) and _hooks_left(model) == []
    assert torch.equal(_run(model, inputs), before)  # bit-exact


@pytest.mark.parametrize("family", FAMILIES)
def test_unexpected_structure_is_skipped_with_reason(family):
    model, inputs = _build(family)
    path, attr = BAD[family]
    block = model.get_submodule(path)
    setattr(block, attr, torch.nn.Identity())
    before = _run(model, inputs)
    report = ditkern.patch(model, backend="torch")
    rows = [r for r in report.skipped if r.module == path]
    assert len(rows) == 1 and "norm Identity is not a layer or RMS norm" in rows[0].reason, str(report)
    assert any(r.cls == type(block).__name__ for r in report.patched)  # the other blocks are still fused
    _run(model, inputs)
    ditkern.unpatch(model)
    assert torch.equal(_run(model, inputs), before)


def test_changed_diffusers_source_is_skipped_with_reason(monkeypatch):
    from ditkern.patch import fingerprints

    monkeypatch.setitem(fingerprints.FINGERPRINTS, "CogView4AdaLayerNormZero", {"0000000000000000"})
    model, _ = _build("cogview4")
    report = ditkern.patch(model, backend="torch")
    rows = [r for r in report.skipped if r.cls == "CogView4AdaLayerNormZero"]
    assert len(rows) == 2 and "differs from the versions" in rows[0].reason
    ditkern.unpatch(model)


def _captured_call(model, inputs, path):
    """(args, kwargs) of the first call of the submodule ``path`` during a model call."""
    seen = []
    handle = model.get_submodule(path).register_forward_pre_hook(
        lambda m, a, k: seen.append((a, k)) if not seen else None, with_kwargs=True
    )
    _run(model, inputs)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_fullgraph_of_patched_block(family):
    model, inputs = _build(family, batch=1)
    path = BAD[family][0]
    args, kwargs = _captured_call(model, inputs, path)
    block = model.get_submodule(path)
    with torch.no_grad():
        expected = block(*args, **kwargs)
        with ditkern.patched(model, backend="torch"):  # the trace is the same for every backend: the ops are opaque
            eager = block(*args, **kwargs)
            torch._dynamo.reset()
            compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*args, **kwargs)
    for a, b, c in zip(*(o if isinstance(o, tuple) else (o,) for o in (compiled, eager, expected))):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


TS = [999.0, 880.0, 700.0, 560.0]  # interval=2, warmup=1: full, full, forecast, full


@pytest.mark.parametrize("family", ["lumina2", "zimage", "cogview4", "nucleusmoe", "hunyuanimage"])
def test_taylor_cache(family):
    model, inputs = _build(family)
    steps = _steps(family, inputs, TS)
    with ditkern.patched(model, backend="torch"):
        fused = [_run(model, s) for s in steps]
    with ditkern.patched(model, cache=ditkern.TaylorCache(order=1, interval=1), backend="torch") as report:
        assert any(r.what.startswith("Taylor cache over") for r in report.patched), str(report)
        for s, want in zip(steps, fused):  # interval=1: every step runs the whole stack
            assert torch.equal(_run(model, s), want)
    with ditkern.patched(model, cache=ditkern.TaylorCache(order=1, interval=2, warmup=1), backend="torch"):
        outs = [_run(model, s) for s in steps]
        stats = ditkern.cache.stats(model)
    assert stats["forecast_calls"] > 0 and stats["block_fraction"] < 1, stats
    assert all(torch.isfinite(o).all() for o in outs)
    assert max(_err(o, f) for o, f in zip(outs, fused)) > 0  # the forecast steps really skipped blocks
    assert _hooks_left(model) == []


@pytest.mark.parametrize("family", ["lumina2", "zimage"])
def test_taylor_cache_rising_timestep(family):
    """Lumina2 and Z-Image are called with a timestep rising from 0 (noise) to 1 (their Stack declares
    ``timestep_rises``; Z-Image's also ``latents="x", timestep="t"``): the cache forecasts within a generation, starts
    a new one when the timestep falls back, and the second generation repeats the first exactly; the gated mode
    forecasts too."""
    model, inputs = _build(family)
    steps = _steps(family, inputs, TS)
    assert all(steps[i][TIME[family]][0] < steps[i + 1][TIME[family]][0] for i in range(len(TS) - 1))  # rising
    with ditkern.patched(model, cache=ditkern.TaylorCache(order=1, interval=2, warmup=1), backend="torch"):
        first = [_run(model, s) for s in steps]
        second = [_run(model, s) for s in steps]
        st = ditkern.cache.stats(model)
    assert st["calls"] == 2 * len(TS) and st["forecast_calls"] == 2
    assert st["generations"] == 2, st  # two generations, counted from the first
    assert st["block_fraction"] == 1 - 2 / (2 * len(TS)), st  # one forecast step (all blocks skipped) per generation
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # the state was reset between the generations
    with ditkern.patched(model, cache=ditkern.TaylorCache(order=1, gate=1e9), backend="torch"):  # always accept
        outs = [_run(model, s) for s in steps]
        st = ditkern.cache.stats(model)
    assert st["forecast_calls"] == len(TS) - 1 and st["block_fraction"] < 1, st
    assert all(torch.isfinite(o).all() for o in outs)
    assert _hooks_left(model) == []


# fnmatch patterns of the linears each family keeps in high precision (its QuantLayout), spelled out here
KEPT = {
    "lumina2": ["x_embedder", "time_caption_embed.*", "norm_out.*", "layers.0.norm1.linear", "layers.1.norm1.linear"],
    "zimage": ["all_x_embedder.*", "t_embedder.*", "cap_embedder.*", "all_final_layer.*", "layers.0.adaLN_modulation.0",
               "layers.1.adaLN_modulation.0"],  # fmt: skip
    "cogview4": ["patch_embed.*", "time_condition_embed.*", "norm_out.linear", "proj_out",
                 "transformer_blocks.0.norm1.*", "transformer_blocks.1.norm1.*"],  # fmt: skip
    "nucleusmoe": ["img_in", "time_text_embed.*", "norm_out.linear", "proj_out", "transformer_blocks.0.img_mod.*",
                   "transformer_blocks.2.img_mod.*", "transformer_blocks.*.img_mlp.gate"],  # fmt: skip
    "hunyuanimage": ["context_embedder.*", "time_guidance_embed.*", "norm_out.linear", "proj_out",
                     "transformer_blocks.0.norm1*.linear", "single_transformer_blocks.1.norm.linear"],  # fmt: skip
}


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_quantizes_linears_but_the_skip_list(family):
    model, inputs = _build(family)
    before = _run(model, inputs)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with ditkern.patched(model, quant="int4", backend="torch") as report:
        quantized = {r.module for r in report.patched if r.what.startswith("quantized linear")}
        kept = {r.module for r in report.skipped if r.cls == "Linear"}
        out = _run(model, inputs)
    assert quantized | kept == linears and not quantized & kept
    expect_kept = {n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in KEPT[family])}
    assert expect_kept <= kept, sorted(expect_kept - kept)
    assert quantized and not any(fnmatch.fnmatchcase(n, p) for n in quantized for p in KEPT[family])
    assert torch.isfinite(out).all() and not torch.equal(out, before)
    # 4-bit weights of a random tiny model: the output stays near the fp32 one (relative error, loose by nature)
    assert _err(out, before) < 0.5 * before.abs().max().item(), _err(out, before)
    assert torch.equal(_run(model, inputs), before)


@pytest.mark.parametrize("family", ["lumina2", "zimage", "cogview4"])
def test_window_covering_the_grid_is_dense_attention(family):
    model, inputs = _build(family)
    before = _run(model, inputs)
    n = len(engine.FAMILIES[type(model).__name__].stack.modules(model))
    backend = "triton" if family == "cogview4" else "torch"  # the Triton kernel once (the interpreter is slow)
    report = ditkern.patch(model, fused_norms=False, attention=ditkern.WindowAttention(window=11), backend=backend)
    windowed = [r for r in report.patched if "(window_attention)" in r.what]
    assert len(windowed) == n, str(report)  # the main stack's self-attention only: refiners are not windowed
    torch.testing.assert_close(_run(model, inputs), before, atol=1e-5, rtol=1e-5)
    ditkern.unpatch(model)

    # a small window changes the output (the window is real) and keeps it finite
    with ditkern.patched(model, fused_norms=False, attention=ditkern.WindowAttention(window=3), backend="torch"):
        small = _run(model, inputs)
    assert torch.isfinite(small).all() and not torch.allclose(small, before, atol=1e-4)
    assert torch.equal(_run(model, inputs), before)


def test_hunyuanimage_window_with_text_padding_mask():
    """A padded batch (prompts of 6 and 4 real tokens): the model's [B, 1, 1, S] key-padding mask becomes text_mask;
    a window covering the grid is dense attention (within the rule against fp64), a small one is not, and a
    query-dependent mask is refused at call time."""
    model, inputs = _build("hunyuanimage")
    inputs["encoder_attention_mask"][1, -2:] = 0
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    before = _run(model, inputs)
    report = ditkern.patch(model, fused_norms=False, attention=ditkern.WindowAttention(window=11), backend="torch")
    windowed = [r for r in report.patched if "(window_attention)" in r.what]
    assert len(windowed) == 4, str(report)  # 2 dual- and 2 single-stream blocks
    err_window, err_dense = _err(_run(model, inputs), ref64), _err(before, ref64)
    assert err_window <= 2 * err_dense + 1.2e-7 * ref64.abs().max().item(), (err_window, err_dense)
    ditkern.unpatch(model)
    with ditkern.patched(model, fused_norms=False, attention=ditkern.WindowAttention(window=3), backend="torch"):
        small = _run(model, inputs)
        assert torch.isfinite(small).all() and not torch.allclose(small, before, atol=1e-4)
        attn = model.transformer_blocks[0].attn

        def query_dependent(module, args, kwargs):  # the key mask, except one image query that sees no text
            mask = kwargs["attention_mask"]
            S = mask.shape[-1]
            full = mask.expand(mask.shape[0], 1, S, S).clone()
            full[:, :, 1, S - 6 :] = False
            return args, dict(kwargs, attention_mask=full)

        handle = attn.register_forward_pre_hook(query_dependent, with_kwargs=True)
        try:
            with pytest.raises(NotImplementedError, match="not a text key-padding mask"):
                _run(model, inputs)
        finally:
            handle.remove()
    assert torch.equal(_run(model, inputs), before)


@pytest.mark.parametrize("family,why", [("nucleusmoe", "query and key lengths differ")])
def test_window_attention_reports_why_not(family, why):
    model, _ = _build(family)
    report = ditkern.patch(model, attention=ditkern.WindowAttention(window=3), backend="torch")
    reasons = [r.reason for r in report.skipped if r.cls == type(model).__name__]
    assert len(reasons) == 1 and why in reasons[0], reasons
    ditkern.unpatch(model)


def test_lumina2_caption_padding_mask_counts_as_text():
    """The joint sequence holds caption[:len] + image: the grid reader takes the caption's effective length."""
    from ditkern.patch.families.lumina2 import lumina2_grid

    model, inputs = _build("lumina2")
    grid, n, text = lumina2_grid(model, (), inputs)
    assert grid == (3, 5) and n == 15 and text == inputs["encoder_attention_mask"].sum(1).max().item() == 6


# ----------------------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------------------
def _grads(model, inputs, key, cot):
    inputs = dict(inputs)
    leaves = _map(inputs[key], lambda t: t.detach().clone().requires_grad_(True))
    inputs[key] = leaves
    model.zero_grad(set_to_none=True)
    out = _out(model, inputs)
    (out * cot.to(out.dtype)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    flat = leaves if isinstance(leaves, list) else [leaves]
    grads["<input>"] = torch.stack([t.grad for t in flat])
    return grads


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_through_patched_model_matches_unpatched(family):
    model, inputs = _build(family, batch=1)
    ref = copy.deepcopy(model).double()
    cot = torch.randn_like(_run(model, inputs), dtype=torch.float64)
    g64 = _grads(ref, _to(inputs, torch.float64), LATENT[family], cot)
    unpatched = _grads(model, inputs, LATENT[family], cot)
    # the torch path: the backward formulas are the same for every backend (tests/test_grad.py checks the Triton
    # forward's gradients per op; the Triton forward of these models is checked above), the interpreter is slow
    with ditkern.patched(model, backend="torch") as report:
        assert report.patched
        patched = _grads(model, inputs, LATENT[family], cot)
    rows = []
    for name, r in g64.items():
        if r is None:
            assert unpatched[name] is None and patched[name] is None, name
            continue
        rows.append((name, _err(patched[name], r), _err(unpatched[name], r), r.abs().max().item()))
    assert len(rows) > 20
    scale = max(s for *_, s in rows)
    # STYLE.md rule per gradient, the floor one fp32 rounding of the model's largest gradient (tests/test_grad.py)
    bad = [(n, ep, eu) for n, ep, eu, _ in rows if ep > 2 * eu + 1.2e-7 * scale]
    assert not bad, (bad, scale)
