"""ditkern.patch(model, attention=WindowAttention(...)) on tiny random models of every family: a window covering the
grid reproduces the dense model, a local window equals diffusers' own dense attention under the window mask (FLUX,
whose processor takes a mask), layers= selects blocks, unpatch restores the processors and the outputs bit-exactly."""

import copy

import pytest
import torch

import ditkern
from ditkern.ops.window_attention import window_mask
from tests.patch import tiny

# grid of each tiny model's image tokens (tests/patch/tiny.py) and the attention modules a patch must wrap
GRIDS = {"flux": (6, 6), "sd3": (4, 4), "pixart": (4, 4), "dit": (4, 4), "wan": (2, 3, 4)}
ATTN = {"flux": ("attn",), "sd3": ("attn", "attn2"), "pixart": ("attn1",), "dit": ("attn1",), "wan": ("attn1",)}
BLOCKS = {"flux": 4, "sd3": 3, "pixart": 2, "dit": 2, "wan": 2}


def _run(model, inputs, **extra):
    with torch.no_grad():
        return model(**inputs, **extra, return_dict=False)[0]


def _to(inputs, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def _blocks(family, model):
    if family == "flux":
        return list(model.transformer_blocks) + list(model.single_transformer_blocks)
    return list(model.blocks if family == "wan" else model.transformer_blocks)


def _processors(family, model):
    return [getattr(b, a).processor for b in _blocks(family, model) for a in ATTN[family] if getattr(b, a, None)]


@pytest.mark.parametrize("family", sorted(GRIDS))
def test_window_covering_grid_reproduces_dense_and_unpatch_is_exact(family):
    model, inputs = tiny.FAMILIES[family]()
    model.eval()
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    before = _run(model, inputs)
    procs = _processors(family, model)

    big = max(GRIDS[family]) * 2 + 1
    report = ditkern.patch(model, fused_norms=False, attention=ditkern.WindowAttention(window=big), backend="triton")
    patched_rows = [r for r in report.patched if r.cls != type(model).__name__]
    assert len(patched_rows) == BLOCKS[family], str(report)
    assert not report.skipped, str(report)
    assert all(type(p).__name__.startswith("Window") for p in _processors(family, model))
    out = _run(model, inputs)
    err_dense = (before.double() - ref64).abs().max().item()
    err_window = (out.double() - ref64).abs().max().item()
    assert err_window <= 2 * err_dense + 1e-5, (err_window, err_dense)

    ditkern.unpatch(model)
    assert all(a is b for a, b in zip(_processors(family, model), procs))
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in model.modules())
    assert torch.equal(_run(model, inputs), before)


@pytest.mark.parametrize("family", sorted(GRIDS))
def test_local_window_changes_output_and_restores(family):
    model, inputs = tiny.FAMILIES[family]()
    model.eval()
    before = _run(model, inputs)
    with ditkern.patched(model, attention=ditkern.WindowAttention(window=1 if family == "wan" else 3), backend="torch"):
        out = _run(model, inputs)
    assert (out - before).abs().max() > 1e-3  # the window really restricted attention
    assert torch.equal(_run(model, inputs), before)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kw", [{"window": 3}, {"window": 5, "shape": "circle"}])
def test_flux_window_equals_diffusers_attention_under_the_mask(backend, kw):
    """FLUX's own processor accepts an attention mask: dense attention under window_mask(...) through diffusers' code
    must equal the patched model (RoPE, QK-norm and the text-first joint sequence untouched)."""
    model, inputs = tiny.flux()
    model.eval()
    mask = window_mask((6, 6), kw["window"], text_tokens=5, text_position="first", shape=kw.get("shape", "rect"))
    expected = _run(model, inputs, joint_attention_kwargs={"attention_mask": mask})
    with ditkern.patched(model, fused_norms=False, attention=ditkern.WindowAttention(**kw), backend=backend):
        out = _run(model, inputs)
    assert (out - expected).abs().max().item() <= 1e-5


def test_layers_selects_blocks_and_reports_the_rest():
    model, inputs = tiny.flux()
    model.eval()
    report = ditkern.patch(model, fused_norms=False, attention=ditkern.WindowAttention(window=3, layers=slice(1, -1)))
    windowed = [type(p).__name__.startswith("Window") for p in _processors("flux", model)]
    assert windowed == [False, True, True, False]
    assert sum("kept dense" in r.reason for r in report.skipped) == 2, str(report)
    ditkern.unpatch(model)
    ditkern.patch(model, fused_norms=False, attention=ditkern.WindowAttention(window=3, layers=[0, -1]))
    assert [type(p).__name__.startswith("Window") for p in _processors("flux", model)] == [True, False, False, True]
    ditkern.patch(model, fused_norms=False, attention=ditkern.WindowAttention(window=3, layers=lambda i, n: i % 2))
    assert [type(p).__name__.startswith("Window") for p in _processors("flux", model)] == [False, True, False, True]
    ditkern.unpatch(model)


def test_with_fused_norms_and_fp16():
    """Both features at once (the family's fused blocks call the windowed processors) in half precision."""
    model, inputs = tiny.flux()
    model.eval()
    ref64 = _run(copy.deepcopy(model).double(), _to(inputs, torch.float64))
    model, inputs = model.half(), _to(inputs, torch.float16)
    before = _run(model, inputs)
    with ditkern.patched(model, attention=ditkern.WindowAttention(window=13), backend="torch") as report:
        assert {r.cls for r in report.patched} >= {"FluxTransformerBlock", "AdaLayerNormZero"}
        out = _run(model, inputs)
    err_dense = (before.double() - ref64).abs().max().item()
    assert (out.double() - ref64).abs().max().item() <= 2 * err_dense + 2e-3
    assert torch.equal(_run(model, inputs), before)


def test_kwargs_still_reach_the_wrapped_processor():
    """diffusers drops kwargs that the processor's signature does not name: the wrapper shows the inner signature."""
    import inspect

    model, _ = tiny.flux()
    ditkern.patch(model, attention=ditkern.WindowAttention(window=3))
    params = inspect.signature(model.transformer_blocks[0].attn.processor.__call__).parameters
    assert "image_rotary_emb" in params and "attention_mask" in params
    ditkern.unpatch(model)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=0), "window"),
        (dict(window=-3), "window"),
        (dict(window=4), "window.*odd"),
        (dict(window=3, layers="most"), "layers"),
        (dict(window=3, text="local"), "text"),
        (dict(window=3, shape="hexagon"), "shape"),
    ],
)
def test_bad_configs_are_rejected_naming_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ditkern.WindowAttention(**kwargs)


def test_grid_that_does_not_match_the_sequence_is_rejected():
    model, inputs = tiny.flux()
    with ditkern.patched(model, attention=ditkern.WindowAttention(window=3, grid=(5, 5))):
        with pytest.raises(ValueError, match="grid"):
            _run(model, inputs)
    with pytest.raises(ValueError, match="layers"):
        ditkern.patch(model, attention=ditkern.WindowAttention(window=3, layers=[7]))


def test_tile_granularity_patch_matches_mask():
    model, inputs = tiny.flux()
    model.eval()
    # 2-row tiles: each query tile sees its own tile row only (1 tile), whole rows (6 >= the 6 columns)
    cfg = ditkern.WindowAttention(window=(2, 6), granularity="tile", tile=(2, 8))
    mask = window_mask((6, 6), (2, 6), text_tokens=5, granularity="tile", tile=(2, 8))
    expected = _run(model, inputs, joint_attention_kwargs={"attention_mask": mask})
    with ditkern.patched(model, fused_norms=False, attention=cfg, backend="triton"):
        out = _run(model, inputs)
    assert (out - expected).abs().max().item() <= 1e-5
