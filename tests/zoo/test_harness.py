"""The fidelity harness and the demo, driven by stand-in patches (ditkern.patch is not needed here)."""

import math
import os

import pytest
import torch

import ditkern.zoo as zoo
from ditkern.zoo import fidelity

FAST = {"num_inference_steps": 4}


def _noisy_patch(pipe, scale=1e-2):
    """Stand-in patch: perturbs the transformer's output a little (an imitation of a lossy kernel)."""
    t = pipe.transformer
    orig = t.forward

    def forward(*args, **kwargs):
        out = orig(*args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        noisy = sample + scale * torch.sin(1000 * sample)
        if isinstance(out, tuple):
            return (noisy,) + tuple(out[1:])
        out.sample = noisy
        return out

    t.forward = forward
    t._orig_forward = orig
    return t


def _unpatch(pipe):
    t = pipe.transformer
    t.forward = t._orig_forward
    del t._orig_forward


def test_identity_patch_is_lossless(dit):
    calls = []
    r = fidelity.compare(dit, seeds=[0, 1], sampler=FAST, apply=lambda p: calls.append("apply"),
                         undo=lambda p: calls.append("undo"), progress=False)
    assert calls == ["apply", "undo"]
    assert math.isinf(r.psnr_db) and math.isinf(r.psnr_worst_db) and r.max_abs_err == 0
    assert r.accuracy_patched == r.accuracy_unpatched
    assert r.seconds_unpatched > 0 and r.seconds_patched > 0 and r.speedup > 0
    assert r.images_patched.shape == (2, 1, 32, 32)
    assert "digits-dit" in str(r)


def test_lossy_patch_is_measured_and_undone(flux):
    before = zoo.generate(flux, [4], [7], **FAST)
    r = fidelity.compare(flux, seeds=[7, 8], classes=[4, 2], sampler=FAST, apply=_noisy_patch, undo=_unpatch,
                         progress=False)
    assert 0 < r.max_abs_err and math.isfinite(r.psnr_db) and r.psnr_worst_db <= r.psnr_db
    assert (r.images_unpatched[:1] - before).abs().max() < 1e-4  # batch of 2 vs 1: BLAS rounding only
    assert torch.equal(zoo.generate(flux, [4], [7], **FAST), before)  # undo restored the pipeline
    assert r.setting == "_noisy_patch"


def test_undo_runs_when_generation_fails(dit):
    undone = []

    def broken(pipe):
        pipe.transformer.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))

    def undo(pipe):
        del pipe.transformer.forward  # drop the instance attribute, back to the class method
        undone.append(True)

    with pytest.raises(RuntimeError, match="boom"):
        fidelity.compare(dit, seeds=[0], sampler=FAST, apply=broken, undo=undo, progress=False)
    assert undone == [True]
    zoo.generate(dit, [0], [0], **FAST)


def test_default_patch_calls_ditkern_patch(dit, monkeypatch):
    import ditkern

    seen = []
    monkeypatch.setattr(ditkern, "patch", lambda pipe, **kw: seen.append(("patch", kw)), raising=False)
    monkeypatch.setattr(ditkern, "unpatch", lambda pipe: seen.append(("unpatch", None)), raising=False)
    r = fidelity.compare(dit, seeds=[0], sampler=FAST, patch_options={"window": 4}, progress=False)
    assert seen == [("patch", {"window": 4}), ("unpatch", None)]
    assert r.setting == "window=4"


def test_demo_writes_png_and_table(tmp_path, capsys):
    out = tmp_path / "sub" / "demo.png"
    table = zoo.demo.run_demo(out_path=str(out), seeds=[0, 1], apply=_noisy_patch, undo=_unpatch, sampler=FAST,
                              progress=False)
    assert os.path.getsize(out) > 1000
    assert [r.pipeline for r in table.rows] == list(zoo.FAST_NAMES)
    printed = capsys.readouterr().out
    assert "digits-flux" in printed and "PSNR" in printed
    assert "this machine: " in printed and f"wrote {out}" in printed


def test_demo_times_the_reference_once_per_pipeline(tmp_path, monkeypatch):
    """Every setting of a pipeline is measured against one unpatched run (its images and seconds shared)."""
    runs = []
    real = zoo.demo.unpatched_run
    monkeypatch.setattr(zoo.demo, "unpatched_run", lambda *a, **k: runs.append(1) or real(*a, **k))
    settings = {"noisy": {}, "noisier": {}}
    table = zoo.demo.run_demo(out_path=str(tmp_path / "d.png"), seeds=[0, 1], pipelines=["digits-dit"],
                              settings=settings, apply=_noisy_patch, undo=_unpatch, sampler=FAST, progress=False,
                              verbose=False)
    assert runs == [1]
    a, b = table.rows
    assert [a.setting, b.setting] == ["noisy", "noisier"]
    assert a.seconds_unpatched == b.seconds_unpatched and a.images_unpatched is b.images_unpatched
    assert math.isfinite(a.psnr_db) and a.max_abs_err > 0
    assert os.path.getsize(tmp_path / "d.png") > 1000


def test_compare_rejects_a_reference_of_other_seeds(dit):
    ref = (torch.zeros(3, 1, 32, 32), 1.0)
    with pytest.raises(ValueError, match="reference has 3 images but 2 seeds"):
        fidelity.compare(dit, seeds=[0, 1], sampler=FAST, apply=lambda p: None, undo=lambda p: None, reference=ref,
                         progress=False)


def test_timing_repeats_keep_the_first_images_and_count_each_run(monkeypatch):
    """repeats=n runs each side n times (the seconds are the fastest run's); the images are those of one run."""
    pipe = zoo.load("digits-dit")
    calls = []
    real = zoo.generate
    monkeypatch.setattr(zoo, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    once = fidelity.unpatched_run(pipe, [0, 1], sampler=FAST, warmup=False, progress=False)
    assert len(calls) == 1
    thrice = fidelity.unpatched_run(pipe, [0, 1], sampler=FAST, warmup=False, progress=False, repeats=3)
    assert len(calls) == 4 and torch.equal(thrice[0], once[0]) and thrice[1] > 0
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        fidelity.unpatched_run(pipe, [0, 1], sampler=FAST, warmup=False, progress=False, repeats=0)
