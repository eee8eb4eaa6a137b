"""Where a ditkern hook sits in a module's diffusers hook chain, and that unpatch restores the chain exactly.

diffusers' context-parallel hooks (``cp_input---*`` splitting a block's inputs, ``cp_output---*`` gathering
``proj_out``'s output) are ordinary ``ModelHook``s on the module they split or gather at. ditkern's hooks go under
every hook of another party already there, so that enabling parallelism before or after ``ditkern.patch`` builds the
same chain. Tiny modules here, no process group: these run in milliseconds.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ditkern.patch.engine import Plan, _install, _uninstall


class Foreign(ModelHook):
    """A hook of another party: records its pre/post calls and scales the input (as a split would change it)."""

    def __init__(self, tag, log, scale=1.0):
        super().__init__()
        self.tag, self.log, self.scale = tag, log, scale

    def pre_forward(self, module, x):
        self.log.append(f"{self.tag}.pre")
        return (x * self.scale,), {}

    def post_forward(self, module, out):
        self.log.append(f"{self.tag}.post")
        return out + 1.0


class ForeignReplace(ModelHook):
    """A hook of another party with its own ``new_forward`` that calls the forward it replaces."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def new_forward(self, module, x):
        self.log.append("replace.in")
        return self.fn_ref.original_forward(x) * 2.0


def _chain(module):
    """Everything that makes up the chain, by identity: the outermost forward and each link's references."""
    reg = module._diffusers_hook
    links = [(f.forward, f.original_forward, f.pre_forward, f.post_forward) for f in reg._fn_refs]
    return module.forward, list(reg._hook_order), list(reg.hooks.values()), links


def _module(log):
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    reg = HookRegistry.check_if_exists_or_initialize(lin)
    reg.register_hook(Foreign("split", log, scale=0.5), "cp_input---split")
    reg.register_hook(ForeignReplace(log), "other.replace")
    reg.register_hook(Foreign("gather", log), "cp_output---gather")
    return lin, x


def _replacing(log):
    def fwd(module, x):
        log.append("ditkern.forward")
        return nn.functional.linear(x, module.weight, module.bias) - 3.0

    return Plan("block", "test replacement", fwd)


def _wrapping(log):
    def fwd(module, inner, x):
        log.append("ditkern.wrap")
        return inner(x) * 10.0

    return Plan("cache", "test wrapper", fwd, wraps=True)


def test_a_replacing_ditkern_hook_runs_under_every_foreign_hook():
    log = []
    lin, x = _module(log)
    with torch.no_grad():
        plain = nn.functional.linear(x * 0.5, lin.weight, lin.bias)  # the linear of the split input
        torch.testing.assert_close(lin(x), (plain + 1.0) * 2.0 + 1.0)
    log.clear()
    entry = _install(lin, _replacing(log))
    with torch.no_grad():
        out = lin(x)
    assert log == ["gather.pre", "replace.in", "split.pre", "ditkern.forward", "split.post", "gather.post"]
    torch.testing.assert_close(out, ((plain - 3.0) + 1.0) * 2.0 + 1.0)
    assert lin._diffusers_hook._hook_order[0] == "ditkern.block"
    _uninstall(entry)


def test_ditkern_hooks_keep_their_own_order_under_the_foreign_ones():
    log = []
    lin, x = _module(log)
    entries = [_install(lin, _replacing(log)), _install(lin, _wrapping(log))]
    log.clear()
    with torch.no_grad():
        lin(x)
    assert log == ["gather.pre", "replace.in", "split.pre", "ditkern.wrap", "ditkern.forward", "split.post",
                   "gather.post"]  # fmt: skip
    assert lin._diffusers_hook._hook_order[:2] == ["ditkern.block", "ditkern.cache"]
    for e in reversed(entries):
        _uninstall(e)


@pytest.mark.parametrize("undo_order", ["reverse", "install"])
def test_uninstall_restores_the_chain_exactly(undo_order):
    log = []
    lin, x = _module(log)
    with torch.no_grad():
        before_out = lin(x)
    before = _chain(lin)
    entries = [_install(lin, _replacing(log)), _install(lin, _wrapping(log))]
    assert _chain(lin)[1] != before[1]
    for e in reversed(entries) if undo_order == "reverse" else entries:
        _uninstall(e)
    after = _chain(lin)
    assert after[0] is before[0] and after[1] == before[1]
    assert all(a is b for a, b in zip(after[2], before[2]))
    for la, lb in zip(after[3], before[3]):
        assert all(a is b for a, b in zip(la, lb)), "a link of the chain does not call what it called before"
    log.clear()
    with torch.no_grad():
        assert torch.equal(lin(x), before_out)
    assert log == ["gather.pre", "replace.in", "split.pre", "split.post", "gather.post"]


def test_without_foreign_hooks_the_module_is_left_as_found():
    torch.manual_seed(0)
    lin, x = nn.Linear(5, 3), torch.randn(2, 5)
    with torch.no_grad():
        ref = lin(x)
    entries = [_install(lin, _replacing([])), _install(lin, _wrapping([]))]
    with torch.no_grad():
        torch.testing.assert_close(lin(x), (ref - 3.0) * 10.0)
    for e in reversed(entries):
        _uninstall(e)
    assert "_diffusers_hook" not in lin.__dict__ and "forward" not in lin.__dict__
    with torch.no_grad():
        assert torch.equal(lin(x), ref)
