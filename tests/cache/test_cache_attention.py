"""TaylorCache(level="attention"): every block runs, the chain's self-attentions forecast their own output."""

import copy
import dataclasses

import pytest
import torch

import ditkern
from ditkern.cache import TaylorCache, stats
from tests.cache.test_taylor_cache import TS, _denoise
from tests.patch import tiny

ATTN = {"dit": ("transformer_blocks", "attn1"), "wan": ("blocks", "attn1")}


def _attentions(model, family):
    if family == "flux":
        return [b.attn for b in (*model.transformer_blocks, *model.single_transformer_blocks)]
    lists, name = ATTN[family]
    return [getattr(b, name) for b in getattr(model, lists)]


def _newton(ts, ys, t):
    """Order-2 Newton extrapolation through the points (ts[i], ys[i]) to t, in float64."""
    (t0, t1, t2), (y0, y1, y2) = ts, [y.double() for y in ys]
    d1a, d1b = (y1 - y0) / (t1 - t0), (y2 - y1) / (t2 - t1)
    return y2 + d1b * (t - t2) + (d1b - d1a) / (t2 - t0) * (t - t2) * (t - t1)


@pytest.mark.parametrize("family", ["dit", "flux", "wan"])
def test_attention_forecast_is_newton_extrapolation_and_the_rest_of_each_block_computes(family):
    """Independent reference: the unpatched model with plain torch forward hooks that, on the forecast steps, replace
    each self-attention's output by the order-2 Newton extrapolation (float64, the real non-uniform timesteps) of its
    outputs on the three previous computed steps. The cached model's outputs match it at every step, its attentions'
    projections do not run on forecast steps, and every block runs."""
    model, inputs = tiny.FAMILIES[family](batch=2)
    model.eval()
    ref_model = copy.deepcopy(model)
    schedule, n = (0, 1, 2, 5), 6
    scale = 1000.0 if family != "flux" else 1.0
    t = [v / scale for v in TS[:n]]
    step = {"k": -1}
    seen: dict[int, list] = {}

    def pre(mod, args, kwargs):
        step["k"] += 1

    def replace(i):
        def hook(mod, args, kwargs, out):
            k = step["k"]
            if k in schedule:
                seen.setdefault(i, []).append((t[k], out))
                return out
            pts = seen[i][-3:]
            ts = [p[0] for p in pts]
            if isinstance(out, tuple):
                return tuple(_newton(ts, [p[1][j] for p in pts], t[k]).to(o.dtype) for j, o in enumerate(out))
            return _newton(ts, [p[1] for p in pts], t[k]).to(out.dtype)

        return hook

    ref_model.register_forward_pre_hook(pre, with_kwargs=True)
    for i, a in enumerate(_attentions(ref_model, family)):
        a.register_forward_hook(replace(i), with_kwargs=True)
    expected = _denoise(ref_model, family, inputs, TS[:n])

    report = ditkern.patch(model, cache=TaylorCache(order=2, schedule=schedule, level="attention"), backend="torch")
    attns = _attentions(model, family)
    assert any(f"Taylor cache over {len(attns)} self-attentions" in r.what for r in report.patched), str(report)
    q_calls = []
    for a in attns:
        a.to_q.register_forward_pre_hook(lambda mod, args: q_calls.append(1))
    got = _denoise(model, family, inputs, TS[:n])
    for k, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"step {k}: {m}")
    assert len(q_calls) == len(schedule) * len(attns)  # the forecast steps ran no attention projection
    st = stats(model)
    assert st["forecast_calls"] == n - len(schedule) and st["block_fraction"] == 1.0
    assert st["attention_fraction"] == pytest.approx(len(schedule) / n)
    assert st["peak_state_bytes"] > 0
    ditkern.unpatch(model)
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_attention_level_interval_one_is_the_patched_model_bit_for_bit(family):
    model, inputs = tiny.FAMILIES[family]()
    model.eval()
    ditkern.patch(model, backend="torch")
    fused = _denoise(model, family, inputs, TS[:4])
    ditkern.patch(model, cache=TaylorCache(order=1, interval=1, level="attention"), backend="torch")
    for a, b in zip(_denoise(model, family, inputs, TS[:4]), fused):
        assert torch.equal(a, b)
    st = stats(model)
    assert st["forecast_calls"] == 0 and st["attention_fraction"] == 1.0 and st["block_fraction"] == 1.0
    ditkern.unpatch(model)


def test_attention_level_fixed_interval_counts_and_describes():
    model, inputs = tiny.dit(batch=1)
    model.eval()
    cache = TaylorCache(order=1, interval=2, level="attention")
    assert "attention-level" in cache.describe()
    assert TaylorCache.from_dict(cache.to_dict()) == cache
    ditkern.patch(model, cache=cache, backend="torch")
    _denoise(model, "dit", inputs, TS[:7])  # steps 0, 1 computed (warm-up, then every 2 from step 1): 0, 1, 3, 5
    st = stats(model)
    assert st["forecast_calls"] == 3 and st["attention_fraction"] == pytest.approx(4 / 7)
    assert st["blocks_run"] == st["blocks_total"]
    ditkern.unpatch(model)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(interval=2, level="attn"), "level must be 'blocks' or 'attention'"),
        (dict(gate=0.1, level="attention"), r"level='attention' takes interval or schedule only .* gate=0.1"),
        (dict(budget=0.3, level="attention"), r"level='attention' takes interval or schedule only .* budget=0.3"),
        (dict(schedule=(0, 2), front=2, level="attention"), r"takes interval or schedule only .* front=2"),
        (dict(interval=2, forecast="output", level="attention"), r"takes interval or schedule only .* forecast='output'"),
        (dict(schedule=(0, 2), step_gain=((1, 1),) * 3, level="attention"), r"takes interval or schedule only .* step_gain"),
    ],
)
def test_attention_level_refusals_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaylorCache(**kwargs)


def test_attention_level_needs_the_familys_self_attention_declaration(monkeypatch):
    from ditkern.patch import engine

    model, _ = tiny.dit()
    family = engine.family_of(model)
    monkeypatch.setitem(engine.FAMILIES, type(model).__name__, dataclasses.replace(family, attention="no token layout declared"))
    report = ditkern.patch(model, cache=TaylorCache(interval=2, level="attention"), backend="torch")
    assert any("level='attention' needs the family's self-attention modules: no token layout declared" in r.reason
               for r in report.rows), str(report)  # fmt: skip
    ditkern.unpatch(model)


def test_compiled_blocks_with_attention_cache_match_eager():
    model, inputs = tiny.dit(batch=1)
    model.eval()
    cache = TaylorCache(order=2, interval=2, level="attention")
    ditkern.patch(model, cache=cache, backend="torch")
    eager = _denoise(model, "dit", inputs, TS[:6])
    ditkern.patch(model, cache=cache, backend="torch")
    for b in model.transformer_blocks:
        b.compile(backend="aot_eager")
    compiled = _denoise(model, "dit", inputs, TS[:6])
    assert stats(model)["forecast_calls"] == 2  # steps 2 and 4 (computed: 0, 1, 3, 5)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ditkern.unpatch(model)
