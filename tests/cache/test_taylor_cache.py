"""ditkern.patch(model, cache=TaylorCache(...)) on tiny random models of every family."""

import copy

import pytest
import torch

import ditkern
from ditkern.cache import TaylorCache, stats
from tests.patch import tiny

TS = [999.0, 950.0, 820.0, 700.0, 560.0, 430.0, 300.0, 180.0, 60.0]  # non-uniform, like shifted schedules


def _timestep(family, t, batch):
    v = torch.full((batch,), t)
    return v / 1000 if family == "flux" else (v.long() if family in ("dit", "pixart") else v)


def _denoise(model, family, inputs, ts=TS, drift=0.05, per_item_noise=None):
    """A stand-in sampler: the latent drifts smoothly from step to step; returns every step's output."""
    inputs = dict(inputs)
    x = inputs["hidden_states"].clone()
    batch = x.shape[0]
    outs = []
    for i, t in enumerate(ts):
        inputs["hidden_states"] = x
        inputs["timestep"] = _timestep(family, t, batch)
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
        outs.append(out)
        x = x * (1 - drift) + drift * torch.tanh(out[..., : x.shape[-1]] if family == "flux" else x)
        if per_item_noise is not None:
            x = x + per_item_noise(i, x)
    return outs


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_interval_one_equals_uncached_and_unpatch_exact(family):
    model, inputs = tiny.FAMILIES[family]()
    model.eval()
    pristine = _denoise(model, family, inputs, TS[:4])
    ditkern.patch(model, backend="torch")
    fused = _denoise(model, family, inputs, TS[:4])
    report = ditkern.patch(model, cache=TaylorCache(order=2, interval=1), backend="torch")
    assert any("Taylor cache over" in r.what for r in report.patched), str(report)
    cached = _denoise(model, family, inputs, TS[:4])
    for a, b in zip(cached, fused):
        assert torch.equal(a, b)
    st = stats(model)
    assert st["block_fraction"] == 1.0 and st["forecast_calls"] == 0 and st["calls"] == 4
    ditkern.unpatch(model)
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in model.modules())
    assert "_ditkern_cache_state" not in model.__dict__
    for a, b in zip(_denoise(model, family, inputs, TS[:4]), pristine):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["dit", "flux", "wan"])
def test_fixed_schedule_forecast_is_newton_extrapolation_of_stack_residual(family):
    """On a forecast step, stack output == stack input + the order-2 Newton extrapolation (over the real, non-uniform
    timesteps) of the stack residuals of the three previous full steps."""
    model, inputs = tiny.FAMILIES[family](batch=1)
    model.eval()
    blocks = {"flux": lambda m: [*m.transformer_blocks, *m.single_transformer_blocks], "wan": lambda m: list(m.blocks)}.get(
        family, lambda m: list(m.transformer_blocks)
    )(model)
    rec = {"in": [], "out": []}

    def pre(mod, args, kwargs):
        rec["in"].append((kwargs.get("hidden_states", args[0] if args else None)).clone())

    def post(mod, args, kwargs, out):
        rec["out"].append((out if torch.is_tensor(out) else out[1]).clone())

    h1 = blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    h2 = blocks[-1].register_forward_hook(post, with_kwargs=True)
    ditkern.patch(model, cache=TaylorCache(order=2, interval=5, warmup=2), backend="triton")
    _denoise(model, family, inputs, TS[:5])
    h1.remove(), h2.remove()
    st = stats(model)
    assert st["calls"] == 5 and st["forecast_calls"] == 2  # steps 0, 1, 2 full; 3, 4 forecast
    assert st["blocks_run"] == 3 * len(blocks)
    scale = 1000.0 if family != "flux" else 1.0
    t = [v / scale for v in TS[:4]]
    r = [(o - i).double() for i, o in zip(rec["in"][:3], rec["out"][:3])]
    d1a, d1b = (r[1] - r[0]) / (t[1] - t[0]), (r[2] - r[1]) / (t[2] - t[1])
    d2 = (d1b - d1a) / (t[2] - t[0])
    expected = rec["in"][3].double() + r[2] + d1b * (t[3] - t[2]) + d2 * (t[3] - t[2]) * (t[3] - t[1])
    torch.testing.assert_close(rec["out"][3].double(), expected, atol=1e-4, rtol=1e-4)
    ditkern.unpatch(model)


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_output_forecast_is_newton_extrapolation_of_stack_output(family):
    """forecast="output": on a forecast step the stack output is the order-2 Newton extrapolation of the stack
    outputs of the three previous full steps, whatever the stack's input is at that step (TaylorSeer's forecast)."""
    model, inputs = tiny.FAMILIES[family](batch=1)
    model.eval()
    blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
    rec = {"in": [], "out": []}
    h1 = blocks[0].register_forward_pre_hook(
        lambda mod, args, kwargs: rec["in"].append(kwargs.get("hidden_states", args[0] if args else None).clone()),
        with_kwargs=True)  # fmt: skip
    h2 = blocks[-1].register_forward_hook(
        lambda mod, args, kwargs, out: rec["out"].append((out if torch.is_tensor(out) else out[1]).clone()),
        with_kwargs=True)  # fmt: skip
    cache = TaylorCache(order=2, schedule=(0, 1, 2, 5), forecast="output")
    assert "output forecast" in cache.describe()
    ditkern.patch(model, cache=cache, backend="triton")
    _denoise(model, family, inputs, TS[:5])
    h1.remove(), h2.remove()
    assert stats(model)["forecast_calls"] == 2  # steps 3, 4
    scale = 1000.0 if family != "flux" else 1.0
    t = [v / scale for v in TS[:5]]
    y = [o.double() for o in rec["out"][:3]]
    d1a, d1b = (y[1] - y[0]) / (t[1] - t[0]), (y[2] - y[1]) / (t[2] - t[1])
    d2 = (d1b - d1a) / (t[2] - t[0])
    r = [o - i.double() for i, o in zip(rec["in"][:3], y)]
    e1a, e1b = (r[1] - r[0]) / (t[1] - t[0]), (r[2] - r[1]) / (t[2] - t[1])
    e2 = (e1b - e1a) / (t[2] - t[0])
    for k in (3, 4):
        expected = y[2] + d1b * (t[k] - t[2]) + d2 * (t[k] - t[2]) * (t[k] - t[1])
        torch.testing.assert_close(rec["out"][k].double(), expected, atol=1e-4, rtol=1e-4)
        residual = rec["in"][k].double() + r[2] + e1b * (t[k] - t[2]) + e2 * (t[k] - t[2]) * (t[k] - t[1])
        assert (residual - expected).abs().max() > 1e-2  # the two forecasts differ here
    ditkern.unpatch(model)


def _smooth_and_rough(i, x):
    """Item 0 drifts smoothly; item 1 gets fresh noise every step (its forecast is always poor)."""
    noise = torch.zeros_like(x)
    noise[1:] = torch.randn_like(x[1:]) * 2.0
    return noise


@pytest.mark.parametrize("family,forecast", [("dit", None), ("flux", None), ("dit", "output")])
def test_batch_items_have_isolated_state_and_decisions(family, forecast):
    model, inputs = tiny.FAMILIES[family](batch=2)
    model.eval()
    cache = TaylorCache(order=1, gate=0.5, warmup=2, sync_batch=False, forecast=forecast)
    torch.manual_seed(1)
    ditkern.patch(model, cache=cache, backend="torch")
    both = _denoise(model, family, inputs, per_item_noise=_smooth_and_rough)
    st = stats(model)
    assert st["forecast_calls"] == 0  # item 1 never accepts, so the batch always runs the blocks...
    torch.manual_seed(1)
    solo0 = _denoise(model, family, {k: (v[:1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v) for k, v in inputs.items()})
    assert stats(model)["forecast_calls"] > 0  # ...while item 0 alone does take forecasts
    for a, b in zip(both, solo0):  # and item 0 of the batch got exactly its own forecasts
        torch.testing.assert_close(a[:1], b, atol=1e-5, rtol=1e-5)
    ditkern.unpatch(model)


def test_two_calls_per_step_keep_separate_state():
    """A pipeline that runs cond and uncond as two calls per step (Wan): each call has its own state."""
    model, inputs = tiny.wan(batch=1)
    model.eval()
    other = dict(inputs, encoder_hidden_states=torch.randn_like(inputs["encoder_hidden_states"]) * 3)
    cache = TaylorCache(order=2, interval=3)
    ref_model = copy.deepcopy(model)

    def run(m, calls):
        x = inputs["hidden_states"].clone()
        outs = []
        for t in TS:
            step = []
            for inp in calls:
                with torch.no_grad():
                    step.append(m(**dict(inp, hidden_states=x, timestep=torch.tensor([t])), return_dict=False)[0])
            outs.extend(step)
            x = x * 0.95 + 0.05 * torch.tanh(step[0])  # the latent follows the cond output
        return outs

    ditkern.patch(model, cache=cache, backend="torch")
    interleaved = run(model, [inputs, other])
    ditkern.patch(ref_model, cache=cache, backend="torch")
    alone = run(ref_model, [inputs])  # the cond stream with a model of its own
    torch.testing.assert_close(torch.stack(interleaved[0::2]), torch.stack(alone), atol=1e-5, rtol=1e-5)
    assert stats(model)["forecast_calls"] > 0


def test_state_resets_at_each_new_generation():
    model, inputs = tiny.dit(batch=1)
    model.eval()
    cache = TaylorCache(order=2, interval=3)
    ditkern.patch(model, cache=cache, backend="torch")
    _denoise(model, "dit", inputs)
    assert stats(model)["generations"] == 1  # counted from the first generation
    second = _denoise(model, "dit", dict(inputs, hidden_states=inputs["hidden_states"] * -1))
    assert stats(model)["generations"] == 2
    fresh, _ = tiny.dit(batch=1)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    ditkern.patch(fresh, cache=cache, backend="torch")
    expected = _denoise(fresh, "dit", dict(inputs, hidden_states=inputs["hidden_states"] * -1))
    for a, b in zip(second, expected):
        assert torch.equal(a, b)
    ditkern.cache.reset(model)
    assert stats(model)["state_bytes"] == 0


def test_gated_order0_is_first_block_cache_and_counts_blocks():
    model, inputs = tiny.flux(batch=1)
    model.eval()
    ditkern.patch(model, cache=TaylorCache(order=0, gate=10.0, warmup=1), backend="torch")
    _denoise(model, "flux", inputs, TS[:5])
    st = stats(model)
    n = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    # step 0 full; steps 1-4 accepted (huge threshold): each runs only the first block
    assert st["forecast_calls"] == 4 and st["blocks_run"] == n + 4 and st["blocks_total"] == 5 * n
    ditkern.unpatch(model)


def test_cache_through_a_pipeline():
    from tests.patch.test_pipeline import _tiny_dit_pipeline

    pipe = _tiny_dit_pipeline()
    g = torch.Generator().manual_seed(0)
    ref = pipe(class_labels=[1, 7], num_inference_steps=8, generator=g, output_type="np").images
    report = ditkern.patch(pipe, cache=TaylorCache(order=1, interval=2), backend="torch")
    assert any(r.module == "transformer" and "Taylor cache" in r.what for r in report.patched)
    g = torch.Generator().manual_seed(0)
    out = pipe(class_labels=[1, 7], num_inference_steps=8, generator=g, output_type="np").images
    st = ditkern.cache.stats(pipe)
    assert st["calls"] == 8 and 0 < st["forecast_calls"] < 8 and st["block_fraction"] < 1
    assert out.shape == ref.shape and abs(out - ref).max() > 0
    ditkern.unpatch(pipe)


def test_compiled_blocks_with_cache_match_eager():
    model, inputs = tiny.dit(batch=1)
    model.eval()
    cache = TaylorCache(order=1, gate=0.5, warmup=1)
    ditkern.patch(model, cache=cache, backend="triton")
    eager = _denoise(model, "dit", inputs, TS[:5])
    ditkern.patch(model, cache=cache, backend="triton")
    for b in model.transformer_blocks:
        b.compile(backend="aot_eager")  # graph break at the gate decision (first block), by design
    compiled = _denoise(model, "dit", inputs, TS[:5])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ditkern.unpatch(model)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(order=-1, interval=2), "order must be 0, 1 or 2"),
        (dict(order=3, interval=2), "order must be 0, 1 or 2"),
        (dict(gate=-0.1), "gate must be a threshold >= 0"),
        (dict(interval=0), "interval must be an int >= 1"),
        (dict(), "exactly one of interval"),
        (dict(interval=2, gate=0.1), "exactly one of interval"),
        (dict(interval=2, warmup=-1), "warmup must be an int >= 0"),
        (dict(gate=0.1, max_skip=-1), "max_skip must be None or an int >= 0"),
        (dict(budget=0.0), "budget must be a fraction of block executions in"),
        (dict(budget=1.5), "budget must be a fraction of block executions in"),
        (dict(budget=0.25, gate=0.1), "exactly one of interval"),
        (dict(schedule=(1, 3)), "schedule must be increasing and start at step 0"),
        (dict(schedule=(0, 3, 3)), "schedule must be increasing and start at step 0"),
        (dict(schedule=(0, -1)), "schedule must be step indices >= 0"),
        (dict(gate=0.1, state_dtype=torch.int8), "state_dtype must be"),
        (dict(interval=2, forecast="outputs"), "forecast must be 'residual', 'output' or None"),
        (dict(budget=0.3, front=2, forecast="output"), "forecast='output' cannot be used with front"),
    ],
)
def test_bad_configs_are_rejected_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaylorCache(**kwargs)


def test_cache_option_must_be_a_taylor_cache():
    model, _ = tiny.dit()
    with pytest.raises(TypeError, match="cache must be a ditkern.TaylorCache, got str"):
        ditkern.patch(model, cache="taylor")
    assert not ditkern.is_patched(model)


@pytest.mark.parametrize("sync", [True, False])
def test_batch_order_equivariance(sync):
    """Swapping the batch items swaps the outputs exactly: no item reads another item's Taylor state."""
    model, inputs = tiny.dit(batch=2)
    model.eval()
    cache = TaylorCache(order=2, gate=0.5, warmup=2, sync_batch=sync)
    ditkern.patch(model, cache=cache, backend="torch")
    a = _denoise(model, "dit", inputs)
    assert stats(model)["forecast_calls"] > 0
    swapped = {k: (v.flip(0) if torch.is_tensor(v) and v.shape[:1] == (2,) else v) for k, v in inputs.items()}
    b = _denoise(model, "dit", swapped)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y.flip(0), atol=1e-6, rtol=1e-5)
    ditkern.unpatch(model)


def test_sana_cache_from_its_declaration_alone():
    """Sana's stack declaration (ditkern/patch/families/sana.py) is all the cache needs: interval=1 is the fused
    model bit for bit, a fixed schedule forecasts, unpatch is exact."""
    from tests.attention.test_sana import tiny_sana

    model, inputs = tiny_sana(batch=1)
    pristine = _denoise(model, "sana", inputs, TS[:5])
    ditkern.patch(model, backend="torch")
    fused = _denoise(model, "sana", inputs, TS[:5])
    report = ditkern.patch(model, cache=TaylorCache(order=1, interval=1), backend="torch")
    assert any(r.what.startswith("Taylor cache over 2 blocks") for r in report.patched), str(report)
    for a, b in zip(_denoise(model, "sana", inputs, TS[:5]), fused):
        assert torch.equal(a, b)
    ditkern.patch(model, cache=TaylorCache(order=1, interval=2), backend="torch")
    _denoise(model, "sana", inputs, TS[:5])
    assert stats(model)["forecast_calls"] == 2 and stats(model)["block_fraction"] < 1
    ditkern.unpatch(model)
    for a, b in zip(_denoise(model, "sana", inputs, TS[:5]), pristine):
        assert torch.equal(a, b)


def test_rising_timestep_forecast_is_newton_extrapolation_of_stack_residual():
    """Lumina2 runs its timestep up from 0 (noise) to 1 (``Stack(timestep_rises=True)``): on a forecast step the stack
    output is its input + the order-2 Newton extrapolation over those rising timesteps, and a timestep back at the
    start resets the state."""
    from tests.patch import tiny_image

    torch.manual_seed(0)
    model, inputs = tiny_image.lumina2(batch=1)
    model.eval()
    blocks = list(model.layers)
    rec = {"in": [], "out": []}
    h1 = blocks[0].register_forward_pre_hook(
        lambda mod, args, kwargs: rec["in"].append(kwargs.get("hidden_states", args[0] if args else None).clone()),
        with_kwargs=True,
    )
    h2 = blocks[-1].register_forward_hook(
        lambda mod, args, kwargs, out: rec["out"].append(out.clone()), with_kwargs=True
    )
    t = [1 - v / 1000 for v in TS[:4]]  # 0.001, 0.05, 0.18, 0.3: rising, non-uniform
    ditkern.patch(model, cache=TaylorCache(order=2, interval=5, warmup=2), backend="torch")
    x = inputs["hidden_states"]
    for v in t:
        with torch.no_grad():
            model(**dict(inputs, hidden_states=x, timestep=torch.tensor([v])), return_dict=False)
        x = 0.95 * x + 0.05 * torch.tanh(x)
    h1.remove(), h2.remove()
    st = stats(model)
    assert st["calls"] == 4 and st["forecast_calls"] == 1 and st["generations"] == 1, st  # steps 0-2 full, 3 forecast
    r = [(o - i).double() for i, o in zip(rec["in"][:3], rec["out"][:3])]
    d1a, d1b = (r[1] - r[0]) / (t[1] - t[0]), (r[2] - r[1]) / (t[2] - t[1])
    d2 = (d1b - d1a) / (t[2] - t[0])
    expected = rec["in"][3].double() + r[2] + d1b * (t[3] - t[2]) + d2 * (t[3] - t[2]) * (t[3] - t[1])
    torch.testing.assert_close(rec["out"][3].double(), expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # back at the start: a new generation
        model(**dict(inputs, timestep=torch.tensor([t[0]])), return_dict=False)
    assert stats(model)["generations"] == 2
    ditkern.unpatch(model)


def test_stack_chain_declarations(monkeypatch):
    """``Stack.cached`` must name a run of the stack's lists; ``uncached_if`` arguments make a call run every block
    and leave the state alone."""
    import dataclasses

    from ditkern.patch import engine
    from ditkern.patch.family import SINGLE, Stack
    from tests.patch import tiny_image

    with pytest.raises(ValueError, match="must be a run of Stack.lists"):
        Stack(lists=("a", "b", "c"), blocks={"X": SINGLE}, cached=("a", "c"))
    with pytest.raises(TypeError, match="not one string"):
        Stack(lists=("a",), blocks={"X": SINGLE}, cached="a")
    family = engine.FAMILIES["Lumina2Transformer2DModel"]
    monkeypatch.setattr(engine, "FAMILIES", dict(engine.FAMILIES))
    engine.register_family(
        dataclasses.replace(family, stack=dataclasses.replace(family.stack, uncached_if=("attention_kwargs",)))
    )
    torch.manual_seed(0)
    model, inputs = tiny_image.lumina2()
    model.eval()
    ditkern.patch(model, backend="torch")
    with torch.no_grad():
        fused = model(**inputs, return_dict=False)[0]
    ditkern.patch(model, cache=TaylorCache(order=1, interval=2), backend="torch")
    with torch.no_grad():
        out = model(**inputs, attention_kwargs={}, return_dict=False)[0]
    assert torch.equal(out, fused) and stats(model)["calls"] == 0
    ditkern.unpatch(model)


def test_step_gain_scales_the_reused_feature_and_the_taylor_increment():
    """schedule + step_gain: a forecast step returns input + mu * r_last + lam * (order-1 Newton increment)."""
    model, inputs = tiny.FAMILIES["dit"](batch=1)
    model.eval()
    blocks = list(model.transformer_blocks)
    rec = {"in": [], "out": []}
    h1 = blocks[0].register_forward_pre_hook(lambda m, a, k: rec["in"].append(k.get("hidden_states", a[0] if a else None).clone()), with_kwargs=True)
    h2 = blocks[-1].register_forward_hook(lambda m, a, k, o: rec["out"].append(o.clone()), with_kwargs=True)
    gains = ((1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (1.3, 0.4), (0.8, 2.0))
    ditkern.patch(model, cache=TaylorCache(order=1, schedule=(0, 1, 2), step_gain=gains), backend="torch")
    _denoise(model, "dit", inputs, TS[:5])
    h1.remove(), h2.remove()
    t = [v / 1000 for v in TS[:5]]
    r1, r2 = ((rec["out"][k] - rec["in"][k]).double() for k in (1, 2))
    slope = (r2 - r1) / (t[2] - t[1])
    for k in (3, 4):
        mu, lam = gains[k]
        expected = rec["in"][k].double() + mu * r2 + lam * slope * (t[k] - t[2])
        torch.testing.assert_close(rec["out"][k].double(), expected, atol=1e-4, rtol=1e-4)
    ditkern.unpatch(model)
    with pytest.raises(ValueError, match="step_gain needs a schedule"):
        TaylorCache(interval=2, step_gain=((1.0, 1.0),))
    with pytest.raises(ValueError, match="step_gain must be"):
        TaylorCache(schedule=(0,), step_gain=((1.0,),))


def test_front_group_has_its_own_state_and_steps():
    """front=2 on a 2 double + 2 single block FLUX: the front group runs on its schedule (0-3), the rest on (0-2); at
    step 3 the rest is forecast from the fresh front output, at step 4 the front's output is its input plus its own
    order-1 forecast (through steps 2, 3) and the rest's through steps 1, 2; both streams of the front are forecast."""
    model, inputs = tiny.FAMILIES["flux"](batch=1)
    model.eval()
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    rec = {k: [] for k in ("in", "front", "back_in", "out")}

    def pre(key):
        return lambda m, a, k: rec[key].append(tuple(x.clone() for x in (k.get("hidden_states", a[0] if a else None),
                                                                             k.get("encoder_hidden_states", a[1] if len(a) > 1 else None))))  # fmt: skip

    def post(key):
        return lambda m, a, k, o: rec[key].append((o[1].clone(), o[0].clone()))  # (hidden, encoder)

    hooks = [blocks[0].register_forward_pre_hook(pre("in"), with_kwargs=True),
             blocks[1].register_forward_hook(post("front"), with_kwargs=True),
             blocks[2].register_forward_pre_hook(pre("back_in"), with_kwargs=True),
             blocks[3].register_forward_hook(post("out"), with_kwargs=True)]  # fmt: skip
    ditkern.patch(model, cache=TaylorCache(order=1, schedule=(0, 1, 2), front=2, front_schedule=(0, 1, 2, 3)), backend="torch")
    _denoise(model, "flux", inputs, TS[:5])
    for h in hooks:
        h.remove()
    st = stats(model)
    assert st["blocks_run"] == 3 * 4 + 2 and st["forecast_calls"] == 2, st
    t = [v / 1000 for v in TS[:5]]

    def newton(r, a, b, k):
        return r[b] + (r[b] - r[a]) / (t[b] - t[a]) * (t[k] - t[b])

    for s in (0, 1):  # hidden, encoder stream of the front group
        rf = [(rec["front"][k][s] - rec["in"][k][s]).double() for k in range(4)]
        torch.testing.assert_close(rec["front"][4][s].double(), rec["in"][4][s].double() + newton(rf, 2, 3, 4), atol=1e-4, rtol=1e-4)
    rb = [(rec["out"][k][0] - rec["back_in"][k][0]).double() for k in range(3)]
    for k in (3, 4):
        torch.testing.assert_close(rec["back_in"][k][0].double(), rec["front"][k][0].double())  # the rest's input: front's output
        torch.testing.assert_close(rec["out"][k][0].double(), rec["back_in"][k][0].double() + newton(rb, 1, 2, k), atol=1e-4, rtol=1e-4)
    ditkern.unpatch(model)
    with pytest.raises(ValueError, match="front=3 needs 2 <= front <= 2"):
        ditkern.patch(model, cache=TaylorCache(schedule=(0, 2), front=3), backend="torch")
    ditkern.unpatch(model)
    with pytest.raises(ValueError, match="front=2 needs a schedule or a budget"):
        TaylorCache(interval=2, front=2)
