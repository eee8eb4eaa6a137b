"""Q-Sched (ditkern/quant/qsched.py): the scheduler wrapper, its JSON file, the calibration search, the errors."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from ditkern.quant import qsched
from ditkern.quant.qsched import QSchedScheduler, calibrate, load, ramp


def _schedulers():
    import diffusers

    return [
        diffusers.FlowMatchEulerDiscreteScheduler(),
        diffusers.DPMSolverMultistepScheduler(),
        diffusers.DDIMScheduler(),
        diffusers.EulerDiscreteScheduler(),
    ]


def _run(sched, steps, x0, outputs):
    """A sampling loop as the pipelines run it: set_timesteps, then one step per timestep."""
    sched.set_timesteps(steps)
    x = x0.clone()
    for t, eps in zip(sched.timesteps, outputs):
        x = sched.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("make", range(len(qsched.SUPPORTED)), ids=list(qsched.SUPPORTED))
def test_identity_is_bit_exact_and_coefficients_change_the_result(make):
    steps = 5
    g = torch.Generator().manual_seed(make)
    x0 = torch.randn(2, 3, 5, 7, generator=g)
    outs = [torch.randn(2, 3, 5, 7, generator=g) for _ in range(steps)]
    plain = _run(_schedulers()[make], steps, x0, outs)
    wrapped = QSchedScheduler(_schedulers()[make], [1.0] * steps, [1.0] * steps)
    same = _run(wrapped, steps, x0, outs)
    assert torch.equal(same, plain)
    for cx, ce in [(ramp(0.97, steps), [1.0] * steps), ([1.0] * steps, ramp(0.97, steps))]:
        moved = _run(QSchedScheduler(_schedulers()[make], cx, ce), steps, x0, outs)
        assert torch.isfinite(moved).all()
        assert (moved - plain).abs().max() > 1e-4


def test_update_is_the_paper_formula_for_flow_matching():
    """Euler flow matching: x_next = c_x * x + (sigma_next - sigma) * c_eps * v, computed independently here."""
    import diffusers

    steps, cx, ce = 3, [0.9, 1.1, 1.0], [1.2, 0.8, 1.05]
    s = QSchedScheduler(diffusers.FlowMatchEulerDiscreteScheduler(), cx, ce)
    s.set_timesteps(steps)
    sig = s.sigmas.double()
    x = torch.randn(4, 6, dtype=torch.float64)
    vs = [torch.randn(4, 6, dtype=torch.float64) for _ in range(steps)]
    want = x.clone()
    got = x.clone()
    for i, (t, v) in enumerate(zip(s.timesteps, vs)):
        want = cx[i] * want + (sig[i + 1] - sig[i]) * ce[i] * v
        got = s.step(v, t, got).prev_sample.double()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the scheduler computes in fp32


def test_delegation_and_signature():
    import diffusers

    base = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    s = QSchedScheduler(base, [1.0] * 4, [1.0] * 4)
    assert "sigmas" in inspect.signature(s.set_timesteps).parameters  # diffusers' retrieve_timesteps checks this
    s.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.7)
    assert len(s.timesteps) == 4 and s.order == 1 and torch.equal(s.sigmas, base.sigmas)
    assert QSchedScheduler(diffusers.DDIMScheduler(), [1.0], [1.0]).init_noise_sigma == 1.0
    assert s.config is base.config
    s.set_begin_index(0)
    assert base.begin_index == 0
    s.custom = 3  # attributes are written through to the wrapped scheduler
    assert base.custom == 3


def test_json_round_trip(tmp_path):
    import diffusers

    s = QSchedScheduler(diffusers.DDIMScheduler(), [0.99, 1.0, 1.01], [1.02, 1.0, 0.98], meta=dict(note="x"))
    path = s.save(tmp_path / "q.json")
    d = json.loads(path.read_text())
    assert d["format"] == qsched.FORMAT and d["scheduler_class"] == "DDIMScheduler"
    back = load(path, diffusers.DDIMScheduler())
    assert back.c_x == s.c_x and back.c_eps == s.c_eps and back.meta == s.meta
    assert load(path, back).base is back.base  # a wrapper is unwrapped
    with pytest.raises(TypeError, match="calibrated for a DDIMScheduler, not a EulerDiscreteScheduler"):
        load(path, diffusers.EulerDiscreteScheduler())
    with pytest.raises(FileNotFoundError, match="no Q-Sched file"):
        load(tmp_path / "missing.json", back)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format 'other'"):
        load(tmp_path / "bad.json", back)


def test_errors():
    import diffusers

    with pytest.raises(ValueError, match="calibrated for num_inference_steps=4, but the scheduler was set to 6"):
        QSchedScheduler(diffusers.DDIMScheduler(), [1.0] * 4, [1.0] * 4).set_timesteps(6)
    with pytest.raises(TypeError, match="HeunDiscreteScheduler is not supported"):
        QSchedScheduler(diffusers.HeunDiscreteScheduler(), [1.0], [1.0])
    with pytest.raises(TypeError, match="already a QSchedScheduler"):
        QSchedScheduler(QSchedScheduler(diffusers.DDIMScheduler(), [1.0], [1.0]), [1.0], [1.0])
    with pytest.raises(ValueError, match="one coefficient per step"):
        QSchedScheduler(diffusers.DDIMScheduler(), [1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        QSchedScheduler(diffusers.DDIMScheduler(), [float("nan")], [1.0])
    s = QSchedScheduler(diffusers.DDIMScheduler(), [1.0] * 2, [1.0] * 2)
    s.set_timesteps(2)
    x = torch.randn(1, 4)
    for t in s.timesteps:
        x = s.step(torch.randn(1, 4), t, x).prev_sample
    with pytest.raises(RuntimeError, match="called 3 times since set_timesteps"):
        s.step(torch.randn(1, 4), s.timesteps[-1], x)

    class Pipe:
        scheduler = diffusers.DDIMScheduler()

    with pytest.raises(ValueError, match="steps must be a positive int"):
        calibrate(Pipe(), [1], steps=0)
    with pytest.raises(ValueError, match="prompts_or_classes is empty"):
        calibrate(Pipe(), [], steps=4)
    with pytest.raises(ValueError, match="2 seeds for 1 conditions"):
        calibrate(Pipe(), [1], steps=4, seeds=[1, 2])
    Pipe.scheduler = diffusers.HeunDiscreteScheduler()
    with pytest.raises(TypeError, match="not supported"):
        calibrate(Pipe(), [1], steps=4)


def test_calibrate_improves_its_own_objective_on_a_reference_pipeline():
    """digits-dit (fp32, 2 steps, 4 images): the search must find coefficients that score higher than identity on the
    reference-free objective, and the returned wrapper must reproduce that score through the pipeline."""
    from ditkern import zoo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 4-image batch: with several threads on a busy 2-core machine it runs ~10x slower
    try:
        _calibrate_and_check(zoo)
    finally:
        torch.set_num_threads(threads)


def _calibrate_and_check(zoo):
    pipe = zoo.load("digits-dit")
    classes, seeds = [0, 3, 5, 8], [2000, 2001, 2002, 2003]
    s = calibrate(pipe, classes, steps=2, seeds=seeds, max_evals=12, grid=(0.98, 1.0), delta=0.02, significance=0,
                  progress=False)  # fmt: skip
    assert pipe.scheduler is s.base  # calibration leaves the pipeline's scheduler as it was
    assert s.meta["evals"] <= 12
    assert s.c_x[-1] == 1.0 and s.c_eps[-1] == 1.0  # the last step stays where the paper's ramps end
    assert s.meta["objective_best"] > s.meta["objective_identity"]
    pipe.scheduler = s
    again = qsched.jaq(zoo.generate(pipe, classes, seeds, num_inference_steps=2), classes)
    assert again == pytest.approx(s.meta["objective_best"], abs=1e-9)
    with pytest.raises(ValueError, match="calibrated for num_inference_steps=2"):
        zoo.generate(pipe, classes, seeds, num_inference_steps=3)
    pipe.scheduler = s.base
    # an improvement smaller than a million standard errors of the per-image differences is not taken
    strict = calibrate(pipe, classes, steps=2, seeds=seeds, max_evals=4, grid=(0.98, 1.0), significance=1e6,
                       progress=False)  # fmt: skip
    assert strict.c_x == [1.0, 1.0] and strict.c_eps == [1.0, 1.0] and strict.meta["evals"] == 4
