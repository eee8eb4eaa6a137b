"""Counters, the calibrated budget / schedule modes and the calibrated gate of ditkern's Taylor cache."""

import itertools
import json
import warnings

import pytest
import torch

import ditkern
from ditkern.cache import TaylorCache, stats
from ditkern.cache.feature import _step_weights, fit_gains, plan_schedule
from tests.cache.test_taylor_cache import TS, _denoise
from tests.patch import tiny


def _tiny_dit():
    torch.manual_seed(0)
    model, inputs = tiny.dit(batch=1)
    return model.eval(), inputs


def _tiny_dit_run():
    """The tiny DiT and a calibration's ``run()``: its denoising over TS, the outputs stacked."""
    model, inputs = _tiny_dit()

    def run():
        return torch.stack([o.detach() for o in _denoise(model, "dit", inputs)])

    return model, run


def test_stats_counters_are_consistent_and_count_generations_from_the_first():
    model, inputs = _tiny_dit()
    n = len(model.transformer_blocks)
    ditkern.patch(model, cache=TaylorCache(order=1, interval=3), backend="torch")
    assert stats(model)["generations"] == 0
    _denoise(model, "dit", inputs)
    st = stats(model)
    assert st["generations"] == 1 and st["calls"] == len(TS), st
    assert st["blocks_total"] == st["calls"] * n
    assert st["blocks_run"] == (st["calls"] - st["forecast_calls"]) * n and st["forecast_calls"] > 0, st
    _denoise(model, "dit", inputs)
    assert stats(model)["generations"] == 2
    ditkern.cache.reset_stats(model)
    assert stats(model)["generations"] == 0 and stats(model)["calls"] == 0
    _denoise(model, "dit", inputs, TS[:3])
    ditkern.cache.reset_stats(model)  # inside a generation: it counts again at its next call
    _denoise(model, "dit", inputs, TS[3:5])
    assert stats(model)["generations"] == 1 and stats(model)["calls"] == 2
    ditkern.cache.reset(model)  # an explicit reset starts a new generation at the next call
    _denoise(model, "dit", inputs, TS[5:7])
    assert stats(model)["generations"] == 2
    # gated: a forecast call runs the first block only
    ditkern.patch(model, cache=TaylorCache(order=1, gate=1e9), backend="torch")
    _denoise(model, "dit", inputs)
    st = stats(model)
    assert st["generations"] == 1 and st["forecast_calls"] == len(TS) - 1, st
    assert st["blocks_run"] == n + st["forecast_calls"] and 0 < st["signal_min"] < 1e9, st
    ditkern.unpatch(model)


def _brute_force(t, feats, m, order):
    """Every schedule of m steps with step 0, each forecast step run as the cache runs it (Newton through the last
    two computed steps, reuse after the first), scored by the same step weights."""
    w = _step_weights(t.double(), False)
    best = None
    for rest in itertools.combinations(range(1, len(t)), m - 1):
        sched = (0, *rest)
        cost = 0.0
        for k in range(len(t)):
            done = [s for s in sched if s < k]
            if k in sched:
                continue
            b = done[-1]
            fc = feats[b].double()
            if order >= 1 and len(done) >= 2:
                a = done[-2]
                fc = fc + (feats[b].double() - feats[a].double()) * float((t[k] - t[b]) / (t[b] - t[a]))
            cost += float(w[k]) * float((feats[k].double() - fc).pow(2).mean(-1).sqrt().mean())
        if best is None or cost < best[0] - 1e-12:
            best = (cost, sched)
    return best[1]


@pytest.mark.parametrize("order", [0, 1])
def test_plan_schedule_is_the_best_schedule(order):
    """The dynamic programme finds the schedule a brute force over every schedule finds, on a trajectory that bends
    (so that where the computed steps go matters)."""
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([1.0, 0.93, 0.8, 0.66, 0.5, 0.37, 0.22, 0.1, 0.03], dtype=torch.float64)
    base, bend = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    feats = torch.stack([base + bend * float(v) ** 3 + 0.05 * torch.randn(3, 40, generator=g) for v in t])
    for m in (2, 3, 4):
        got = plan_schedule(t, feats, m, order)
        assert got[0] == 0 and len(got) == m
        assert got == _brute_force(t, feats, m, order), (m, got)
    assert plan_schedule(t, feats, len(t), order) == tuple(range(len(t)))


def test_budget_self_calibrates_on_the_first_generation_and_saves():
    model, inputs = _tiny_dit()
    cache = TaylorCache(order=1, budget=0.5)
    ditkern.patch(model, cache=cache, backend="torch")
    first = _denoise(model, "dit", inputs)
    st = stats(model)
    assert st["forecast_calls"] == 0 and not st["calibrated"], st  # the calibration generation runs uncached
    second = _denoise(model, "dit", inputs)
    st = stats(model)
    calibrated = model.__dict__["_ditkern_cache_state"].config
    assert st["calibrated"] and calibrated.schedule[0] == 0 and len(calibrated.schedule) == round(len(TS) * 0.5)
    assert calibrated.timesteps == tuple(float(v) for v in TS)
    assert st["forecast_calls"] == len(TS) - len(calibrated.schedule)
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
    ditkern.unpatch(model)


def test_calibrated_budget_json_round_trip_and_timestep_mismatch(tmp_path):
    model, inputs = _tiny_dit()
    ditkern.patch(model, cache=TaylorCache(order=1, budget=0.4, warmup=1), backend="torch")
    cal = ditkern.cache.calibrate(model, lambda: [_denoise(model, "dit", inputs), _denoise(model, "dit", inputs)])
    assert cal.calibrated and cal.budget == 0.4 and len(cal.timesteps) == len(TS)
    outs = _denoise(model, "dit", inputs)
    path = tmp_path / "cache.json"
    cal.save(path)
    assert json.loads(path.read_text())["ditkern.TaylorCache"]["schedule"] == list(cal.schedule)
    loaded = TaylorCache.load(path)
    assert loaded == cal
    fresh, _ = tiny.dit(batch=1)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    ditkern.patch(fresh, cache=loaded, backend="torch")
    for a, b in zip(_denoise(fresh, "dit", inputs), outs):
        assert torch.equal(a, b)
    # another sampler's timesteps: uncached from the first step that differs, and it says so
    ditkern.patch(fresh, cache=loaded, backend="torch")
    with pytest.warns(UserWarning, match="TaylorCache was calibrated on 9 steps .* step 4 has timestep 500"):
        _denoise(fresh, "dit", inputs, TS[:4] + [500.0, 400.0, 250.0])
    assert stats(fresh)["forecast_calls"] == sum(1 for k in range(4) if k not in loaded.schedule)
    ditkern.unpatch(fresh)
    with pytest.raises(ValueError, match="is not a saved ditkern.TaylorCache"):
        (tmp_path / "x.json").write_text("{}")
        TaylorCache.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="unknown field"):
        TaylorCache.from_dict({"budget": 0.2, "intervall": 3})


def test_end_anchored_schedule_computes_the_last_step():
    cfg = TaylorCache.end_anchored(28, 5, warmup=2)
    assert cfg.schedule == (0, 1, 2, 7, 12, 17, 22, 27) and cfg.mode == "schedule"
    from ditkern.cache.feature import spaced_schedule

    assert spaced_schedule(28, 5) == (0, 7, 14, 20, 27) and spaced_schedule(28, 28) == tuple(range(28))
    assert spaced_schedule(10, 9, 1.6) == (0, 1, 2, 3, 4, 5, 6, 7, 9)  # pushed apart, still 9 steps
    model, inputs = _tiny_dit()
    ditkern.patch(model, cache=TaylorCache.end_anchored(len(TS), 3, warmup=1), backend="torch")
    _denoise(model, "dit", inputs)
    # steps 0, 2, 5, 8 computed
    assert stats(model)["forecast_calls"] == len(TS) - 4
    ditkern.unpatch(model)


def test_configurations_that_never_forecast_warn_naming_the_setting():
    with pytest.warns(UserWarning, match="TaylorCache.max_skip=0 never forecasts"):
        TaylorCache(gate=0.1, max_skip=0)
    with pytest.warns(UserWarning, match="TaylorCache.gate=0 never forecasts"):
        TaylorCache(gate=0)
    model, inputs = _tiny_dit()
    ditkern.patch(model, cache=TaylorCache(order=1, gate=1e-7), backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _denoise(model, "dit", inputs)  # nothing said before the generation ended
    with pytest.warns(UserWarning, match=r"TaylorCache.gate=1e-07 never forecast in a generation of 9 calls"):
        _denoise(model, "dit", inputs)
    with pytest.warns(UserWarning, match=r"TaylorCache.gate=1e-07 is below the lowest forecast error this model"):
        ditkern.cache.calibrate(model, lambda: _denoise(model, "dit", inputs))
    ditkern.unpatch(model)
    with pytest.raises(ValueError, match="calibrate needs a TaylorCache with budget= or gate="):
        ditkern.patch(model, cache=TaylorCache(interval=2), backend="torch")
        ditkern.cache.calibrate(model, lambda: None)
    ditkern.unpatch(model)


def test_measured_calibration_keeps_the_candidate_closest_to_uncached():
    from ditkern.cache import feature

    model, run = _tiny_dit_run()
    ditkern.patch(model, cache=TaylorCache(order=1, budget=0.45), backend="torch")

    seen = {}
    measure = feature.measure_schedules

    def spy(*a, **k):
        best, info = measure(*a, **k)
        seen.update(best=best, info=info)
        return best, info

    feature.measure_schedules = spy
    try:
        cal = ditkern.cache.calibrate(model, run)
    finally:
        feature.measure_schedules = measure
    assert cal == seen["best"] and len(cal.schedule) == 4  # round(9 * 0.45)
    info = seen["info"]
    assert any(k.endswith(" corrected") for k in info) and any(not k.endswith(" corrected") for k in info)
    chosen = max(info, key=lambda k: info[k][1])
    assert info[chosen][0] == cal and chosen.endswith(" corrected") == (cal.step_gain is not None)
    # forecast=None: the best schedules measured again forecasting the output, and the chosen config names its forecast
    outputs = [k for k in info if ", output" in k]
    assert len(outputs) == 2 * feature.OUTPUT_TRIES and all(info[k][0].forecast == "output" for k in outputs)
    assert cal.forecast == ("output" if ", output" in chosen else "residual")
    scheds = [c.schedule for c, _ in info.values() if c.forecast == "residual" and c.step_gain is None]
    assert len(set(scheds)) == len(scheds) and any(1 in s for s in scheds)  # distinct; TaylorSeer's warm-up among them
    assert {(0, 1, 3, 6), (0, 1, 4, 7)} <= set(scheds)  # TaylorSeer's every 3 and the fixed mode's interval=3 (9 steps)
    ditkern.patch(model, cache=TaylorCache(order=1, budget=0.45, forecast="residual"), backend="torch")
    feature.measure_schedules = spy
    try:
        ditkern.cache.calibrate(model, run)
    finally:
        feature.measure_schedules = measure
    assert not any(", output" in k for k in seen["info"]) and seen["best"].forecast == "residual"
    ditkern.unpatch(model)


def _count_blocks(pipe, steps):
    """Seeds 0, 1 (digits 0, 1) at ``steps``: (block executions counted by a pre-hook on each block's attention,
    ditkern.cache.stats)."""
    import ditkern.zoo as zoo

    runs = []
    hooks = [b.attn1.register_forward_pre_hook(lambda *a: runs.append(1)) for b in pipe.transformer.transformer_blocks]
    ditkern.cache.reset_stats(pipe)
    try:
        zoo.generate(pipe, [0, 1], [0, 1], num_inference_steps=steps)
    finally:
        for h in hooks:
            h.remove()
    return len(runs), ditkern.cache.stats(pipe)


def test_budget_is_met_on_a_zoo_pipeline():
    """digits-dit-deep at 20 steps: a budget of 0.25 calibrated on one seed runs 0.25 +- 0.03 of the block executions
    on two others, counted independently (a pre-hook on each block's attention) and by ditkern.cache.stats."""
    import ditkern.zoo as zoo

    pipe = zoo.load("digits-dit-deep")
    ditkern.patch(pipe, cache=TaylorCache(order=1, budget=0.25), backend="torch")
    ditkern.cache.calibrate(pipe, lambda: zoo.generate(pipe, [3], [1000], num_inference_steps=20), measure=False)
    runs, st = _count_blocks(pipe, 20)
    n = len(pipe.transformer.transformer_blocks)
    assert st["calls"] == 20 and st["generations"] == 1 and st["calibrated"], st  # cond + uncond: one batch
    assert abs(runs / (20 * n) - 0.25) <= 0.03 and st["block_fraction"] == runs / (20 * n), (runs, st)
    ditkern.unpatch(pipe)


def test_calibrated_gate_scales_the_signal_per_step():
    """After calibrate, the gate signal is the first block's relative error times the per-step factor: a gate that
    accepted everything raw still decides from the scaled signal, and off the calibrated timesteps the median factor
    is used without a warning (the gate keeps forecasting)."""
    model, inputs = _tiny_dit()
    ditkern.patch(model, cache=TaylorCache(order=1, gate=0.3, warmup=1), backend="torch")
    cal = ditkern.cache.calibrate(model, lambda: _denoise(model, "dit", inputs))
    assert len(cal.gate_scale) == len(TS) and all(v > 0 for v in cal.gate_scale) and cal.timesteps == tuple(TS)
    state = model.__dict__["_ditkern_cache_state"]
    assert state.config == cal
    raw = TaylorCache(order=1, gate=0.3, warmup=1)
    ditkern.patch(model, cache=raw, backend="torch")
    _denoise(model, "dit", inputs)
    raw_min = stats(model)["signal_min"]
    ditkern.patch(model, cache=cal, backend="torch")
    _denoise(model, "dit", inputs)
    assert stats(model)["signal_min"] != raw_min
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _denoise(model, "dit", inputs, [990.0, 900.0, 800.0, 650.0])
    ditkern.unpatch(model)


def test_fit_gains_recovers_the_scale_of_the_reused_feature_and_of_the_increment():
    """Features linear in t on the computed steps; on each forecast step mu * x_last + lam * (t - t_last) * slope
    with known (mu, lam): the fit returns them (after the first computed step alone: mu only, lam 1)."""
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(1.0, 0.1, 9, dtype=torch.float64)
    a, b = torch.randn(3, 50, generator=g, dtype=torch.float64), torch.randn(3, 50, generator=g, dtype=torch.float64)
    sched = (0, 3, 6)
    want = {1: (1.2, 1.0), 2: (0.9, 1.0), 4: (1.1, 0.5), 5: (0.95, 1.7), 7: (1.05, 2.0), 8: (1.0, 0.3)}
    x = torch.stack([a + float(v) * b for v in t])
    for k, (mu, lam) in want.items():
        last = max(j for j in sched if j < k)
        x[k] = mu * x[last] + lam * (t[k] - t[last]) * b if last else mu * x[last]
    got = fit_gains(t, x, sched, order=1)
    for k in range(9):
        exp = want.get(k, (1.0, 1.0))
        assert got[k] == pytest.approx(exp, abs=1e-6), (k, got[k], exp)


def test_budget_with_a_front_group_is_met_and_counts_every_block():
    """digits-dit-deep at 12 steps, front=5: a front candidate of the budget (the front group on more steps than
    the rest) runs 0.25 +- 0.03 of the block executions on other seeds, counted by a pre-hook on each block's
    attention and by ditkern.cache.stats, exactly front * its steps + the rest * its steps."""
    from dataclasses import replace

    import ditkern.zoo as zoo
    from ditkern.cache import feature

    pipe = zoo.load("digits-dit-deep")
    ditkern.patch(pipe, cache=TaylorCache(order=1, budget=0.25, front=5), backend="torch")
    state = pipe.transformer.__dict__["_ditkern_cache_state"]
    cal = ditkern.cache.calibrate(pipe, lambda: zoo.generate(pipe, [3], [1000], num_inference_steps=12), measure=False)
    n = len(pipe.transformer.transformer_blocks)
    fronts = feature.front_candidates(state, 12, len(cal.schedule))
    assert fronts and all(len(f) > len(r) for f, r in fronts.values()), fronts
    for front, rest in list(fronts.values())[-1:]:  # the one closest to the whole-stack count (time)
        ditkern.patch(pipe, cache=replace(cal, schedule=rest, front_schedule=front), backend="torch")
        runs, st = _count_blocks(pipe, 12)
        assert runs == 5 * len(front) + (n - 5) * len(rest) and st["block_fraction"] == runs / (12 * n)
        assert abs(runs / (12 * n) - 0.25) <= 0.03, (front, rest, runs)
    ditkern.unpatch(pipe)


def _spied_calibration(monkeypatch, model, run, config):
    """``ditkern.cache.calibrate(model, run)`` with ``config``, recording the measured pick (``plain``), its
    ``scores``, the uncached ``reference`` and each refinement (``refined``: start, result, score, start's score,
    runs); the result is ``cal``."""
    from ditkern.cache import feature

    measure, refine = feature.measure_schedules, feature.refine_calibration
    seen = {"refined": []}

    def spy_measure(*a, **k):
        seen["plain"], seen["scores"] = out = measure(*a, **k)
        return out

    def spy_refine(state, run_, reference, start, **k):
        seen["reference"] = reference
        out = refine(state, run_, reference, start, **k)
        seen["refined"].append((start, *out))
        return out

    monkeypatch.setattr(feature, "measure_schedules", spy_measure)
    monkeypatch.setattr(feature, "refine_calibration", spy_refine)
    try:
        ditkern.patch(model, cache=config, backend="torch")
        seen["cal"] = ditkern.cache.calibrate(model, run)
    finally:
        monkeypatch.setattr(feature, "measure_schedules", measure)
        monkeypatch.setattr(feature, "refine_calibration", refine)
    return seen


def test_refined_calibration_keeps_the_budget_and_measures_at_least_as_close(monkeypatch, tmp_path):
    """TaylorCache(refine=True) on the measured calibration's pick: with the step moves off, the schedule and forecast
    are kept and the gains become the fitted ones (or 1, 1) times one multiplier pair per run of forecast steps;
    with them on, the count of computed steps (the budget) is kept. Either way, re-measured independently against
    the calibration's uncached result, the refined config is closer than the unrefined one. Refining needs a
    measured budget calibration: a gate refuses it, an unmeasured one warns."""
    from ditkern.cache import feature

    model, run = _tiny_dit_run()

    def calibrate():  # 3 of 9 steps: at 0.45 (4) PSNR is within 5 dB of its cap
        seen = _spied_calibration(monkeypatch, model, run, TaylorCache(order=1, budget=0.3, refine=True))
        (_, _, seen["score"], seen["start"], seen["runs"]), = seen["refined"]  # one start
        return seen

    def score(config, reference):
        ditkern.patch(model, cache=config, backend="torch")
        return feature._score(run(), reference)

    monkeypatch.setattr(feature, "REFINE_MOVE_PASSES", 0)
    seen = calibrate()
    cal, plain = seen["cal"], seen["plain"]
    assert cal.refine and cal.schedule == plain.schedule and cal.forecast == plain.forecast and cal.timesteps == plain.timesteps
    base = plain.step_gain or ((1.0, 1.0),) * len(TS)
    bounds = (*cal.schedule, len(TS))
    for a, b in zip(bounds, bounds[1:]):
        assert cal.step_gain[a] == base[a] == (1.0, 1.0)  # computed steps
        for c in (0, 1):  # one multiplier pair per segment (a gain the fit clamped to 0 stays 0)
            ratios = {round(cal.step_gain[k][c] / base[k][c], 9) for k in range(a + 1, b) if base[k][c]}
            assert len(ratios) <= 1 and all(cal.step_gain[k][c] for k in range(a + 1, b) if base[k][c]), (a, b, c, ratios)
    assert cal.step_gain != base and seen["score"] > seen["start"] and 1 < seen["runs"] <= 1 + 3 * 16, seen
    got = score(cal, seen["reference"])
    assert got == pytest.approx(seen["score"], abs=1e-6) and got > score(plain, seen["reference"])

    monkeypatch.setattr(feature, "REFINE_MOVE_PASSES", 3)
    moved = calibrate()
    cal = moved["cal"]
    assert len(cal.schedule) == len(moved["plain"].schedule) and cal.schedule[0] == 0 and cal.refine
    assert cal.schedule != moved["plain"].schedule  # on this model the last computed step moves (8 -> 7)
    assert moved["score"] >= seen["score"] - 1e-9  # the moves start from the same gain search
    got = score(cal, moved["reference"])
    assert got == pytest.approx(moved["score"], abs=1e-6) and got > score(moved["plain"], moved["reference"])
    cal.save(tmp_path / "refined.cache.json")  # the refinement is paid once: the saved config runs the same
    again = TaylorCache.load(tmp_path / "refined.cache.json")
    assert again == cal and score(again, moved["reference"]) == pytest.approx(got, abs=1e-9)

    with pytest.raises(ValueError, match="TaylorCache.refine needs a budget"):
        TaylorCache(gate=0.1, refine=True)
    ditkern.patch(model, cache=TaylorCache(order=1, budget=0.3, refine=True), backend="torch")
    with pytest.warns(UserWarning, match="TaylorCache.refine needs a measured calibration"):
        ditkern.cache.calibrate(model, run, measure=False)
    assert TaylorCache.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    ditkern.unpatch(model)


def test_refine_starts_refines_the_best_distinct_schedules_and_keeps_the_best_refined(monkeypatch):
    """TaylorCache(refine=True, refine_starts=2): the measured best and the best-measured candidate with another
    schedule are each refined; the one that measures best after refining is kept, and re-measures as recorded."""
    from ditkern.cache import feature

    model, run = _tiny_dit_run()

    monkeypatch.setattr(feature, "REFINE_MOVE_PASSES", 0)  # the schedules stay: each result names its start
    seen = _spied_calibration(monkeypatch, model, run, TaylorCache(order=1, budget=0.3, refine=True, refine_starts=2))
    cal = seen["cal"]
    (start1, out1, score1, *_), (start2, out2, score2, *_) = seen["refined"]
    assert start1 == seen["plain"]
    others = [(s, c) for c, s in seen["scores"].values() if c.schedule != start1.schedule]
    assert start2.schedule == max(others, key=lambda v: v[0])[1].schedule  # the next best schedule, not a variant
    assert out1.schedule == start1.schedule and out2.schedule == start2.schedule
    kept, other = (out1, out2) if score1 >= score2 else (out2, out1)
    assert cal == kept and cal.refine_starts == 2 and "refined from 2 starts" in cal.describe()

    def score(config):
        ditkern.patch(model, cache=config, backend="torch")
        return feature._score(run(), seen["reference"])

    assert score(cal) == pytest.approx(max(score1, score2), abs=1e-6) and score(cal) >= score(other)
    assert TaylorCache.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    ditkern.unpatch(model)


def test_refine_reach_searches_wide_step_moves_to_a_local_best(monkeypatch):
    """TaylorCache(refine=True, refine_reach=6), the gain search and the short moves off: the wide step search keeps
    the budget and step 0, re-measures as recorded, no worse than its start, and ends where no single computed step
    moved by up to 6 steps (with the gains refitted, each neighbour measured here independently) measures closer."""
    from dataclasses import replace

    from ditkern.cache import feature

    model, run = _tiny_dit_run()

    monkeypatch.setattr(feature, "REFINE_PASSES", ())
    monkeypatch.setattr(feature, "REFINE_MOVE_PASSES", 0)
    monkeypatch.setattr(feature, "REFINE_WIDE_PASSES", 9)  # enough to converge on 9 steps
    recorded, calibration_set = {}, feature._calibration_set

    def spy_set(state):  # the recording, which the calibration clears when done
        recorded["state"], recorded["set"] = state, calibration_set(state)
        return recorded["set"]

    monkeypatch.setattr(feature, "_calibration_set", spy_set)
    seen = _spied_calibration(monkeypatch, model, run, TaylorCache(order=1, budget=0.3, refine=True, refine_reach=6))
    (start, cal, best, start_score, runs), = seen["refined"]
    assert seen["cal"] == cal and cal.refine_reach == 6 and "steps moved up to 6" in cal.describe()
    assert len(cal.schedule) == len(start.schedule) and cal.schedule[0] == 0 and best >= start_score and runs > 1
    t, feats = recorded["set"]
    target = feature._gain_targets(recorded["state"], feats)[cal.forecast or "residual"]

    def score(sched):
        gains = feature.fit_gains(t, target, sched, 1) if start.step_gain is not None else None
        ditkern.patch(model, cache=replace(cal, schedule=sched, step_gain=gains), backend="torch")
        return feature._score(run(), seen["reference"])

    assert score(cal.schedule) == pytest.approx(best, abs=1e-6)
    n, s = len(TS), cal.schedule
    neighbours = [(*s[:i], s[i] + d, *s[i + 1:]) for i in range(1, len(s)) for d in range(-6, 7)
                  if d and s[i - 1] < s[i] + d < (s[i + 1] if i + 1 < len(s) else n)]  # fmt: skip
    assert neighbours and max(score(x) for x in neighbours) <= best + 1e-9, (s, neighbours)
    ditkern.unpatch(model)


def test_refine_objective_mean_maximises_the_mean_psnr(monkeypatch):
    """TaylorCache(refine=True, refine_objective="mean"): the refinement's recorded score is the mean per-item PSNR of
    the refined config against the uncached calibration result (computed here from the images), no lower than its
    start's; the objective is named in describe() and saved."""
    from ditkern.cache import feature

    model, run = _tiny_dit_run()

    monkeypatch.setattr(feature, "REFINE_PASSES", ((0.7, 1.4),))
    monkeypatch.setattr(feature, "REFINE_MOVE_PASSES", 0)
    config = TaylorCache(order=1, budget=0.3, refine=True, refine_objective="mean")
    seen = _spied_calibration(monkeypatch, model, run, config)
    (_, cal, best, start_score, _), = seen["refined"]
    assert seen["cal"] == cal and best >= start_score and "mean objective" in cal.describe()
    ditkern.patch(model, cache=cal, backend="torch")
    out, ref = run().double(), seen["reference"].double()
    mse = (out - ref).pow(2).flatten(1).mean(1)
    mean_psnr = float((10 * torch.log10(1.0 / mse)).clamp(max=100.0).mean())
    assert best == pytest.approx(mean_psnr, abs=1e-6)
    assert TaylorCache.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    ditkern.unpatch(model)


@pytest.mark.parametrize("kwargs, match", [
    *((dict(refine=True, refine_starts=bad), "TaylorCache.refine_starts must be a positive int") for bad in (0, True, 1.5)),
    (dict(refine_starts=2), "refine_starts=2 needs refine=True"),
    *((dict(refine=True, refine_reach=bad), "TaylorCache.refine_reach must be an int >= 2") for bad in (1, True, 2.5)),
    (dict(refine_reach=4), "refine_reach=4 needs refine=True"),
    (dict(refine=True, refine_reach=4, front=2), "refine_reach=4 needs front=0"),
    (dict(refine=True, refine_objective="worst"), "TaylorCache.refine_objective must be 'mean\\+worst' or 'mean'"),
    (dict(refine=True, refine_objective=["mean"]), "TaylorCache.refine_objective must be"),
    (dict(refine_objective="mean"), "refine_objective='mean' needs refine=True"),
])  # fmt: skip
def test_refine_settings_are_checked_and_need_refine(kwargs, match):
    """The refinement's settings: a bad value names its field; off its default without refine=True is refused."""
    with pytest.raises(ValueError, match=match):
        TaylorCache(budget=0.3, **kwargs)
