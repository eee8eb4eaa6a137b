"""Where no fused adaLN backend can run (a user's CPU: no CUDA, no Triton interpreter), the lossless ``ditkern.patch``
leaves every adaLN module, MoE layer (NucleusMoE, HiDream) and Sana linear attention to its own forward: the output is
bit-identical to unpatched, the patched model runs exactly the aten ops the unpatched one runs (no fp32 upcasts), and
the report says why on each row. A backend asked for by
name is still honoured (``backend="torch"``: the fp32 reference), and the op-count check tells the two apart."""

import importlib
from collections import Counter

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import ditkern
from ditkern import _backend
from ditkern.patch.report import NATIVE_NOTE, NATIVE_REASON
from tests.attention.test_sana import tiny_sana
from tests.moe.tiny_hidream import hidream
from tests.patch import tiny, tiny_image, tiny_mmdit, tiny_video

IMAGE = ("lumina2", "zimage", "cogview4", "nucleusmoe", "hunyuanimage")
BUILDERS = {**tiny.FAMILIES, **tiny_mmdit.FAMILIES, **tiny_video.FAMILIES, "hidream": hidream, "sana": tiny_sana,
            **{f: getattr(tiny_image, f) for f in IMAGE}}  # fmt: skip
# the rows of other ops than adaLN that the lossless patch leaves native on a CPU (their own backends' reasons)
OTHER_OPS = {"nucleusmoe": {"NucleusMoELayer"}, "hidream": {"MOEFeedForwardSwiGLU"}, "sana": {"Attention"}}


# the ops each family's other rules run on their fp32 reference when forced (backend="torch")
FUSED_OPS = {"nucleusmoe": {"ditkern.moe_grouped_mlp"}, "hidream": {"ditkern.moe_route", "ditkern.moe_grouped_mlp"},
             "sana": {"ditkern.linear_attention"}}  # fmt: skip


@pytest.fixture
def users_cpu(monkeypatch):
    """The conftest turns the Triton interpreter on for the whole suite; a user's CPU run has it off."""
    monkeypatch.setattr(_backend, "triton_interpreted", lambda: False)
    monkeypatch.delenv("DITKERN_BACKEND", raising=False)


def _build(family):
    torch.manual_seed(0)
    model, inputs = BUILDERS[family]()
    return model.eval(), inputs


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return torch.stack(out) if isinstance(out, list) else out


def _hooks(model):
    return [n for n, m in model.named_modules() if hasattr(m, "_diffusers_hook") or "forward" in m.__dict__]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_lossless_patch_on_cpu_keeps_the_native_forward(family, users_cpu):
    model, inputs = _build(family)
    before = _run(model, inputs)
    report = ditkern.patch(model)
    native = [r for r in report.skipped if r.reason.startswith(NATIVE_REASON)]
    assert native, str(report)
    assert not report.patched, str(report)
    assert OTHER_OPS.get(family, set()) <= {r.cls for r in native}, str(report)
    for r in native:
        assert r.reason.startswith(f"{NATIVE_REASON} cpu float32 (cuda: ") and "; triton: " in r.reason, r.reason
    assert _hooks(model) == []  # nothing installed: the module's own forward, not a copy of it
    if family == "sana":
        assert {type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")} >= {
            "SanaLinearAttnProcessor2_0"}  # fmt: skip
    assert torch.equal(_run(model, inputs), before)  # bit-identical
    ditkern.unpatch(model)


def test_report_says_what_happened(users_cpu):
    model, _ = _build("flux")
    report = ditkern.patch(model)
    text = str(report)
    n = sum(tiny.EXPECTED["flux"].values())
    assert report.summary() == (
        f"ditkern: patched 0 module(s) (none), skipped {n} ({n} keep their native torch ops: no fused kernel on this "
        "device)"
    )
    assert text.count("torch: native ops, no fused kernel on cpu float32 (cuda: ") == n, text
    assert "TRITON_INTERPRET=1 is not set" in text  # each fused backend's own reason
    assert report.notes.count(NATIVE_NOTE) == 1 and f"note: {NATIVE_NOTE}" in text
    assert "backend='torch'" in NATIVE_NOTE
    ditkern.unpatch(model)


def test_a_forced_torch_backend_still_runs_the_fp32_reference(users_cpu):
    model, inputs = _build("flux")
    report = ditkern.patch(model, backend="torch")
    assert Counter(r.cls for r in report.patched) == Counter(tiny.EXPECTED["flux"]) and not report.skipped
    assert {r.backend for r in report.patched} == {"torch"} and NATIVE_NOTE not in report.notes
    ditkern.unpatch(model)


def test_no_usable_backend_on_the_device_is_the_same_as_cpu(monkeypatch):
    """Not only the CPU: any module whose op no fused backend can take (here the interpreter is on, but triton is
    made unable) keeps its forward, with that backend's reason in the row."""
    adaln = importlib.import_module("ditkern.ops.adaln_modulate")
    monkeypatch.setitem(adaln.BACKENDS, "triton", lambda *t: "disabled by the test")
    monkeypatch.delenv("DITKERN_BACKEND", raising=False)
    model, inputs = _build("dit")
    before = _run(model, inputs)
    report = ditkern.patch(model)
    assert not report.patched and all("triton: disabled by the test" in r.reason for r in report.skipped), str(report)
    assert torch.equal(_run(model, inputs), before)
    ditkern.unpatch(model)


@pytest.mark.parametrize(("family", "op"), [("hidream", "moe"), ("sana", "linear_attention")])
def test_no_usable_moe_or_linear_attention_backend_keeps_the_layer(family, op, monkeypatch):
    """The same for the MoE and linear-attention rules: with triton unable (the interpreter on), the layer keeps its
    own forward / processor in auto mode, and is installed on the reference when ``backend='torch'`` is asked for."""
    ops = importlib.import_module(f"ditkern.ops.{op}")
    monkeypatch.setitem(ops.BACKENDS, "triton", lambda *t: "disabled by the test")
    monkeypatch.delenv("DITKERN_BACKEND", raising=False)
    model, _ = _build(family)
    with ditkern.patched(model) as report:
        rows = [r for r in report.skipped if r.cls in OTHER_OPS[family]]
        assert rows and all("triton: disabled by the test" in r.reason for r in rows), str(report)
        assert {r.cls for r in report.patched}.isdisjoint(OTHER_OPS[family]), str(report)
    with ditkern.patched(model, backend="torch") as report:
        assert {r.cls for r in report.patched if r.backend == "torch"} >= OTHER_OPS[family], str(report)


class _Ops(TorchDispatchMode):
    """Counts the aten ops a call runs (inside ditkern's custom ops too), and the fp32 upcasts among them (a cast of
    a bf16 / fp16 tensor to float32)."""

    def __init__(self):
        super().__init__()
        self.ops, self.upcasts = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func.overloadpacket)] += 1
        if func.namespace == "ditkern":  # count what a custom op's body runs, too (the mode is off in here)
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        src = args[0] if args else None
        if (func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to) and isinstance(out, torch.Tensor)
                and out.dtype == torch.float32 and src.dtype in (torch.bfloat16, torch.float16)):  # fmt: skip
            self.upcasts += 1
        return out


def _count(model, inputs) -> _Ops:
    mode = _Ops()
    with torch.no_grad(), mode:
        model(**inputs, return_dict=False)
    return mode


@pytest.mark.parametrize("family", ["flux", "dit", "nucleusmoe", "hidream", "sana"])
def test_patched_runs_no_more_aten_ops_than_unpatched(family, users_cpu):
    """bf16 (the dtype a DiT is served in): the fp32 reference would upcast; the native path must not."""
    model, inputs = _build(family)
    model = model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}  # fmt: skip
    _run(model, inputs)  # NucleusMoE caches its rotary frequencies on the first call: count a warm model
    unpatched = _count(model, inputs)
    with ditkern.patched(model) as report:
        assert not report.patched, str(report)
        native = _count(model, inputs)
    assert native.ops == unpatched.ops, (native.ops - unpatched.ops, unpatched.ops - native.ops)
    assert native.upcasts == unpatched.upcasts
    # the check can fail: the fp32 reference (what the lossless patch ran on CPU before) runs more ops and upcasts
    with ditkern.patched(model, backend="torch"):
        reference = _count(model, inputs)
    assert reference.ops.total() > unpatched.ops.total() and reference.upcasts > unpatched.upcasts
    ours = {op for op in reference.ops if op.startswith("ditkern.")}
    assert ours >= FUSED_OPS.get(family, {"ditkern.adaln_modulate"}), ours
    assert not any(op.startswith("ditkern.") for op in native.ops)
