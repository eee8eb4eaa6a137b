"""bench.cache_sweep: the A-B-A speedup, the goal, the frontier margins, and one tiny case end to end (a row that
fails is reported, a row that leaves its hook behind is caught by the uncached run after it)."""

import json
import math

import pytest

from bench import cache_sweep as cs


def test_speedup_aba_is_the_mean_of_both_uncached_runs_over_the_row():
    assert cs.speedup_aba(2.0, 1.0, 4.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="method=0"):
        cs.speedup_aba(1.0, 0, 1.0)


def test_meets_goal_needs_every_part():
    ok = dict(block_fraction=0.2, psnr_mean_db=36.0, psnr_worst_db=30.0, accuracy=0.98)
    assert cs.meets_goal(ok, accuracy_uncached=1.0)
    for k, v in (("block_fraction", 0.21), ("psnr_mean_db", 35.9), ("psnr_worst_db", 29.9), ("accuracy", 0.97)):
        assert not cs.meets_goal(dict(ok, **{k: v}), accuracy_uncached=1.0), k


def _row(method, kind, blocks, mean, worst, attn=None):
    return dict(method=method, kind=kind, block_fraction=blocks, attention_fraction=blocks if attn is None else attn,
                psnr_mean_db=mean, psnr_worst_db=worst, error="")  # fmt: skip


def test_frontier_margin_is_the_best_ditkern_row_at_no_more_compute():
    rows = [_row("ditkern a", "ditkern", 0.25, 40.0, 33.0), _row("ditkern a", "ditkern", 0.5, 50.0, math.inf),
            _row("other", "diffusers", 0.3, 42.0, 31.0), _row("other", "diffusers", 0.6, 45.0, 44.0),
            _row("other", "diffusers", 0.1, 20.0, 10.0),  # below every ditkern row: uncovered
            _row("attention-level", "diffusers", 1.0, 47.0, 47.0, attn=0.4),  # judged at its attention fraction
            _row("saved nothing", "diffusers", 1.0, 100.0, math.inf)]  # every block and attention ran: no point
    fr = cs.frontier(rows)
    assert "saved nothing" not in fr
    assert fr["other"]["psnr_mean_db"] == pytest.approx(-2.0)  # 40 (at 0.25) - 42 (at 0.3)
    assert fr["other"]["psnr_worst_db"] == pytest.approx(2.0)  # 33 - 31
    assert fr["other"]["psnr_mean_db_uncovered"] == 1
    assert fr["attention-level"]["psnr_mean_db"] == pytest.approx(-7.0)  # 40 (at 0.25 <= 0.4) - 47
    # a ditkern attention-level row covers attention-level peers only
    rows.append(_row("ditkern attention", "ditkern", 1.0, 60.0, 60.0, attn=0.3))
    fr = cs.frontier(rows)
    assert fr["attention-level"]["psnr_mean_db"] == pytest.approx(13.0)  # 60 (at 0.3 <= 0.4) - 47
    assert fr["other"]["psnr_mean_db"] == pytest.approx(-2.0)  # not 5 (60 - 42 at 0.3, 50 - 45 at 0.6): it does not count
    low = cs.frontier(rows, up_to=0.5)
    assert low["other"]["psnr_worst_db"] == pytest.approx(2.0) and "ditkern a" not in low
    assert low["other"]["psnr_worst_db_uncovered"] == 1


@pytest.fixture
def one_thread():
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep runs (two threads on a busy 2-core machine spin-wait)
    yield
    torch.set_num_threads(saved)


def test_a_tiny_case_end_to_end(tmp_path, monkeypatch, one_thread):
    import ditkern
    import ditkern.zoo as zoo
    from ditkern import TaylorCache

    def patch(p):
        # backend="torch": the sweep's CPU path (tests set TRITON_INTERPRET, which the sweep does not)
        ditkern.patch(p, cache=TaylorCache(order=1, interval=2), backend="torch")
        return ""

    def failing(p):
        raise RuntimeError("this baseline does not apply")

    def make(name, steps, quick):
        return [cs.Method("ditkern fixed o1", "interval=2", "ditkern", patch, ditkern.unpatch),
                cs.Method("broken", "x", "diffusers", failing, lambda p: None),
                cs.Method("no-op", "z", "cache-dit", lambda p: "", lambda p: None),
                cs.Method("leaky", "y", "diffusers", patch, lambda p: None)]  # never undone

    pipe = zoo.load("digits-flux")
    monkeypatch.setattr(zoo, "load", lambda name: pipe)  # one object, so the test can undo the leaky row's patch
    try:
        rows = cs.run_case("digits-flux", 4, 2, False, tmp_path, progress=False, make_methods=make)
    finally:
        ditkern.unpatch(pipe)
    by = {r["method"]: r for r in rows}
    assert by["uncached"]["psnr_worst_db"] == math.inf
    ours = by["ditkern fixed o1"]
    assert ours["block_fraction"] < 0.8 and ours["attention_fraction"] == pytest.approx(ours["block_fraction"])
    assert math.isfinite(ours["psnr_mean_db"]) and ours["speedup"] > 0 and "differs" not in ours["note"]
    assert by["broken"]["error"].startswith("RuntimeError: this baseline")
    assert "differs from the reference" in by["leaky"]["note"]
    assert by["no-op"]["note"].startswith("changed nothing") and "changed nothing" not in ours["note"]
    saved = json.loads((tmp_path / "cache_sweep.json").read_text())["rows"]
    assert [r["method"] for r in saved] == ["uncached", "ditkern fixed o1", "broken", "leaky", "no-op"]
    md = (tmp_path / "cache_sweep.md").read_text()
    assert "## digits-flux, 4 steps (2 seeds" in md and "this baseline does not apply" in md
    assert (tmp_path / "cache_sweep_digits-flux_4.png").stat().st_size > 0
    assert (tmp_path / "cache_sweep.csv").read_text().count("\n") == 6


def test_demo_calibrates_its_budget_cache_row_on_its_own_seeds(tmp_path, monkeypatch, one_thread, capsys):
    """The demo's cache row (a budget, from the sweep) is calibrated on zoo.demo.CALIB_SEEDS after it is patched,
    never on the shown seeds, and its block fraction counts only the measured generations (here in the same file as
    the sweep that chose the row)."""
    import ditkern.zoo as zoo
    import ditkern.zoo.demo as demo
    from ditkern import TaylorCache

    seen = []
    real = zoo.generate
    monkeypatch.setattr(zoo, "generate", lambda pipe, classes, seeds, **kw: seen.append(list(seeds)) or
                        real(pipe, classes, seeds, **kw))  # fmt: skip
    settings = {"budget": {"cache": TaylorCache(order=1, budget=0.5), "backend": "torch"}}
    demo.run_demo(out_path=str(tmp_path / "d.png"), seeds=[0, 1], pipelines=["digits-flux"], settings=settings,
                  sampler={"num_inference_steps": 6}, progress=False, verbose=True)
    calib = list(demo.CALIB_SEEDS)
    assert seen.count(calib) >= 2  # the recording run and the measured candidates
    assert all(s in ([0], [0, 1], calib) for s in seen), seen  # shown seeds, warm-up image, calibration seeds only
    line = next(x for x in capsys.readouterr().out.splitlines() if "digits-flux [budget]" in x and "blocks" in x)
    frac = int(line.split("blocks executed ")[1].split("%")[0]) / 100
    assert abs(frac - 0.5) <= 0.1, line  # 3 of 6 steps; uncalibrated it would run every block (off its timesteps)


def test_a_case_header_names_the_rows_merged_in_from_a_later_run():
    def row(method, setting, kind, sha, date="2026-12-01"):
        return dict(pipeline="digits-dit", steps=28, seeds=8, date=date, sha=sha, method=method, kind=kind,
                    setting=setting, block_fraction=0.5, attention_fraction=0.5, psnr_mean_db=40.0,
                    psnr_worst_db=35.0, accuracy=1.0, meets_goal=False, note="")

    rows = [row("uncached", "", "uncached", "aaaaaaa"), row("ditkern fixed o1", "interval=2", "ditkern", "aaaaaaa"),
            row("ditkern budget o1 refined", "budget=0.18", "ditkern", "bbbbbbb", "2026-12-04")]
    md = cs.markdown(rows)
    assert ("## digits-dit, 28 steps (8 seeds, 2026-12-01 at aaaaaaa; ditkern budget o1 refined budget=0.18: "
            "2026-12-04 at bbbbbbb)") in md
    assert "## digits-dit, 28 steps (8 seeds, 2026-12-01 at aaaaaaa)" in cs.markdown(rows[:2])
