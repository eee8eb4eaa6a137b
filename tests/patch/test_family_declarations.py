"""The family declarations (``ditkern/patch/family.py``, ``ditkern/patch/families/``): one registry lists them, the
features read them and keep no per-model table, a new model is one declaration, and every report row names the
backend of its own op, resolved at patch time."""

import ast
import importlib
import pathlib

import pytest
import torch

import ditkern
from ditkern.patch import engine, families
from ditkern.patch.family import PAIR, SINGLE, Family, QuantLayout, Stack, Streams, TokenLayout
from tests.patch import tiny

ROOT = pathlib.Path(__file__).resolve().parents[2]
FEATURE_DIRS = ("cache", "quant", "attention", "moe")


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _hooks_left(model):
    return [n for n, m in model.named_modules() if hasattr(m, "_diffusers_hook") or "forward" in m.__dict__]


def test_registry_lists_every_family_file_and_the_engine_has_them_all():
    files = {p.stem for p in (ROOT / "ditkern/patch/families").glob("*.py") if p.stem != "__init__"}
    assert files == set(families.MODULES)
    declared = families.load()
    assert all(isinstance(f, Family) for f in declared)
    assert len({f.name for f in declared}) == len(declared)
    classes = sorted(c for f in declared for c in f.model_classes)
    assert ditkern.supported_models() == classes
    assert all(engine.FAMILIES[c] is f for f in declared for c in f.model_classes)


def _declared_names() -> set[str]:
    """Every class name a family declares: models, rule keys, stack blocks, attention blocks and processors, MoE."""
    names = set()
    for f in families.load():
        names |= set(f.model_classes) | set(f.rules) | set(f.moe)
        if isinstance(f.stack, Stack):
            # block-list attribute names ("layers", "blocks") are too generic to signal a table: a checkpoint's
            # metadata key "layers" is not model knowledge; class names are
            names |= set(f.stack.blocks)
        if isinstance(f.attention, TokenLayout):
            names |= set(f.attention.self_attention) | set(f.attention.processors)
    return names - {"Linear"}  # quant's own rule key: every nn.Linear, whatever the family


def _strings(path: pathlib.Path) -> set[str]:
    """String constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    consts = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return {n.value for n in consts if id(n) not in docs}


def test_features_keep_no_per_model_table():
    names = _declared_names()
    found = {}
    for d in FEATURE_DIRS:
        for path in sorted((ROOT / "ditkern" / d).glob("*.py")):
            hits = sorted(_strings(path) & names)
            if hits:
                found[str(path.relative_to(ROOT))] = hits
    assert not found, f"model knowledge outside the family declarations: {found}"


class MyDiT(__import__("diffusers").DiTTransformer2DModel):
    """A model class ditkern does not know: matched by exact name, so no family claims it until one is declared."""


def _my_dit():
    model = MyDiT(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1001, norm_type="ada_norm_zero",
    ).eval()  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([300, 700]), class_labels=torch.tensor([3, 1])
    )
    return model, inputs


def _my_family(**changes):
    from ditkern.attention.processors import spatial_grid
    from ditkern.patch.basic import basic_block_rule
    from ditkern.patch.common import NORM_RULES

    fields = dict(
        name="mydit",
        model_classes=("MyDiT",),
        rules={"BasicTransformerBlock": basic_block_rule, "AdaLayerNormZero": NORM_RULES["AdaLayerNormZero"]},
        stack=Stack(lists=("transformer_blocks",), blocks={"BasicTransformerBlock": SINGLE}),
        attention=TokenLayout(
            {"BasicTransformerBlock": ("attn1",)}, frozenset({"AttnProcessor2_0"}), "first", spatial_grid
        ),
        quant=QuantLayout(),
    )
    return Family(**{**fields, **changes})


def test_a_new_model_is_one_declaration(monkeypatch):
    model, inputs = _my_dit()
    before = _run(model, inputs)
    assert "unknown model class 'MyDiT'" in str(ditkern.patch(model))

    monkeypatch.setattr(engine, "FAMILIES", dict(engine.FAMILIES))
    engine.register_family(_my_family())
    report = ditkern.patch(model, backend="triton")
    assert sorted(r.cls for r in report.patched) == ["AdaLayerNormZero"] * 3 + ["BasicTransformerBlock"] * 3
    fused = _run(model, inputs)
    torch.testing.assert_close(fused, before, atol=1e-4, rtol=1e-4)

    report = ditkern.patch(model, cache=ditkern.TaylorCache(order=1, interval=1), backend="triton")
    assert any(r.what.startswith("Taylor cache over 3 blocks") for r in report.patched), str(report)
    assert torch.equal(_run(model, inputs), fused)

    report = ditkern.patch(model, fused_norms=False, attention=ditkern.WindowAttention(window=9, layers=[-1]))
    assert [r.module for r in report.patched if "(window_attention)" in r.what] == ["transformer_blocks.2"]
    torch.testing.assert_close(_run(model, inputs), before, atol=1e-4, rtol=1e-4)

    report = ditkern.patch(model, fused_norms=False, quant="fp4", backend="torch")
    kept = {r.module for r in report.skipped if r.cls == "Linear"}
    assert {"transformer_blocks.0.norm1.linear", "transformer_blocks.2.norm1.linear"} <= kept
    assert "transformer_blocks.1.norm1.linear" not in kept

    ditkern.unpatch(model)
    assert _hooks_left(model) == [] and torch.equal(_run(model, inputs), before)


def test_what_a_declaration_does_not_cover_is_skipped_with_its_reason(monkeypatch):
    model, _ = _my_dit()
    monkeypatch.setattr(engine, "FAMILIES", dict(engine.FAMILIES))
    engine.register_family(_my_family(stack="no stack here", attention="no grid here"))
    report = ditkern.patch(model, cache=ditkern.TaylorCache(interval=2), attention=ditkern.WindowAttention(window=3))
    reasons = [r.reason for r in report.skipped if r.cls == "MyDiT"]
    assert reasons == ["Taylor cache not applied: no stack here",
                       "windowed attention is not available for family 'mydit': no grid here"]  # fmt: skip
    # a stream the model reads after the stack that does not leave the last block: the cache cannot forecast it
    engine.register_family(_my_family(stack=Stack(("transformer_blocks",), {"BasicTransformerBlock": SINGLE},
                                                  reads_after=("encoder_hidden_states",))))  # fmt: skip
    report = ditkern.patch(model, cache=ditkern.TaylorCache(interval=2))
    assert any("do not enter the first block" in r.reason for r in report.skipped), str(report)
    ditkern.unpatch(model)


def test_declarations_are_checked_when_written():
    with pytest.raises(ValueError, match="are not taken"):
        Streams(takes=("hidden_states",), returns=("hidden_states", "encoder_hidden_states"))
    with pytest.raises(ValueError, match="'first' or 'last'"):
        TokenLayout({}, frozenset(), "middle", lambda *a, **k: None)
    with pytest.raises(TypeError, match="tuple of exact class names"):
        Family(name="x", model_classes="FluxTransformer2DModel")
    with pytest.raises(ValueError, match="already registered by family 'flux'"):
        engine.register_family(Family(name="other", model_classes=("FluxTransformer2DModel",)))
    assert PAIR.join(PAIR.split(("t", "i"))) == ("t", "i") and SINGLE.split("x") == {"hidden_states": "x"}


def test_report_backend_is_each_rows_own_op(monkeypatch):
    """adaLN rows show adaln_modulate's backend, cache rows taylor's, attention rows window_attention's, quant rows
    the GEMM's: here the Taylor kernels are made unable to run on Triton, and the window op is asked for torch."""
    taylor_mod = importlib.import_module("ditkern.ops.taylor")
    monkeypatch.setitem(taylor_mod.BACKENDS, "triton", lambda *t: "disabled by the test")
    model, _ = tiny.flux()
    report = ditkern.patch(
        model, cache=ditkern.TaylorCache(interval=2), attention=ditkern.WindowAttention(window=3, backend="torch"),
        quant="fp4",
    )  # fmt: skip
    by_what = {}
    for r in report.patched:
        key = next(k for k in ("Taylor cache", "(window_attention)", "quantized linear", "adaln_modulate",
                               "gated_residual_adaln", "token grid") if k in r.what)  # fmt: skip
        by_what.setdefault(key, set()).add(r.backend)
    assert by_what == {
        "Taylor cache": {"torch"}, "(window_attention)": {"torch"}, "quantized linear": {"triton"},
        "adaln_modulate": {"triton"}, "gated_residual_adaln": {"triton"}, "token grid": {""},
    }, str(report)  # fmt: skip
    ditkern.unpatch(model)


def test_a_forced_backend_that_cannot_run_raises_at_patch_time_and_patches_nothing():
    model, _ = tiny.flux()
    with pytest.raises(RuntimeError, match=r"ditkern.patch: ditkern::adaln_modulate: backend 'cuda' was requested"):
        ditkern.patch(model, backend="cuda")  # CPU tensors
    assert not ditkern.is_patched(model) and _hooks_left(model) == []


def test_the_backend_request_is_resolved_once_at_patch_time(monkeypatch):
    """DITKERN_BACKEND is read when patching; the installed forwards pass the resolved request to the ops, so a
    compiled graph never reads the environment and a later change of it does not change a patched model."""
    adaln = importlib.import_module("ditkern.ops.adaln_modulate")
    model, inputs = tiny.dit()
    monkeypatch.setenv("DITKERN_BACKEND", "torch")
    report = ditkern.patch(model)
    assert {r.backend for r in report.patched} == {"torch"}
    monkeypatch.setenv("DITKERN_BACKEND", "triton")
    seen = []
    real = adaln.choose
    monkeypatch.setattr(adaln, "choose", lambda *a, backend=None: seen.append(backend) or real(*a, backend=backend))
    _run(model, inputs)
    assert seen and set(seen) == {"torch"}
    ditkern.unpatch(model)
