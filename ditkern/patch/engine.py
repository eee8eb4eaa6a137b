"""The patch engine: walks a model, applies the family's rules to matching submodules, reports and undoes.

Patches are instance-level forward replacements installed through diffusers' public hook machinery
(``diffusers.hooks.HookRegistry`` + ``ModelHook.new_forward``), so they compose with diffusers' own hooks (cache
hooks, offloading, context parallelism's split and gather) and are removed by ``unpatch`` without touching any class.
On a module that already carries another party's hooks, ditkern's go under them (:func:`_insert_inner`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ditkern._backend import BackendUnavailable, requested_backend
from ditkern.config import PatchConfig
from ditkern.patch import parallel
from ditkern.patch.family import Family, Rule
from ditkern.patch.report import PatchReport, Row

logger = logging.getLogger("ditkern")

HOOK_PREFIX = "ditkern."
STATE_ATTR = "_ditkern_patch_state"


@dataclass
class Plan:
    """What a rule decided for one module.

    ``new_forward(module, *args, **kwargs)`` replaces the module's forward through a diffusers hook registered as
    ``"ditkern." + name``. ``apply(module)`` / ``undo(module)`` do any other instance-level change (a processor swap,
    packed weights) and must leave the module bit-identical after ``undo``. ``detail`` is shown in the report
    (a format, a memory figure). ``backend`` is the backend the plan's op runs on for the module's device and dtype,
    resolved by the rule at patch time (``ditkern._backend.choose`` on a sample like the module's inputs; "" for a
    plan that runs no ditkern op): the report's backend column.
    """

    name: str  # short name of the change, e.g. "adaln"; unique per module
    what: str  # human-readable description for the report
    new_forward: Callable | None = None
    apply: Callable[[nn.Module], None] | None = None
    undo: Callable[[nn.Module], None] | None = None
    detail: str = ""
    wraps: bool = False  # new_forward(module, inner, *args, **kwargs): inner is the forward it replaces
    backend: str = ""


@dataclass
class Feature:
    """A capability that applies across families (caching, quantization, attention), switched on by a config field.

    ``rules(family, model, config)`` returns extra rules keyed by exact class name (the model's own class name
    matches the root module), or None when the feature is off in ``config``. A feature reads what it needs of the
    model from ``family`` (a :class:`ditkern.patch.family.Family`) and keeps no per-model table. Features register
    themselves with :func:`register_feature` when their module is imported (``ditkern/patch/__init__.py`` imports
    them).
    """

    name: str
    rules: Callable[[Family, nn.Module, PatchConfig], "dict[str, Rule] | None"]


FEATURES: list[Feature] = []


def register_feature(feature: Feature) -> Feature:
    if any(f.name == feature.name for f in FEATURES):
        raise ValueError(f"feature {feature.name!r} is already registered")
    FEATURES.append(feature)
    return feature


# exact model class name -> its family; filled by ``ditkern/patch/__init__.py`` from the family registry
# (``ditkern/patch/families``): the engine imports no family
FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Match ``family.model_classes`` to ``family`` from now on. A class claimed by a family of another name is an
    error; a family of the same name replaces its earlier declaration (a module reloaded, a declaration retried)."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family takes a ditkern.patch.family.Family, got {type(family).__name__}")
    for cls in family.model_classes:
        if cls in FAMILIES and FAMILIES[cls].name != family.name:
            raise ValueError(f"model class {cls!r} is already registered by family {FAMILIES[cls].name!r}")
    for cls in family.model_classes:
        FAMILIES[cls] = family
    return family


def supported_models() -> list[str]:
    return sorted(FAMILIES)


def device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's first floating-point parameter (what its inputs will be): where a rule resolves
    its plan's backend at patch time. CPU / float32 for a module without one."""
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def family_of(model: nn.Module) -> Family | None:
    """The family registered for the model's exact class name, or None."""
    return FAMILIES.get(type(model).__name__)


@functools.cache
def _hook_class():
    """diffusers' ModelHook subclass whose ``new_forward`` replaces the module's forward (imported lazily)."""
    from diffusers.hooks import ModelHook  # noqa: PLC0415

    class DitkernHook(ModelHook):
        _is_stateful = False

        def __init__(self, new_forward: Callable, wraps: bool):
            super().__init__()
            self._new_forward = new_forward
            self._wraps = wraps

        def new_forward(self, module, *args, **kwargs):
            if self._wraps:
                return self._new_forward(module, self.fn_ref.original_forward, *args, **kwargs)
            return self._new_forward(module, *args, **kwargs)

    return DitkernHook


@dataclass
class _Installed:
    module: nn.Module
    hook_name: str | None
    created_registry: bool
    had_forward_attr: bool
    undo: Callable[[nn.Module], None] | None = None


@dataclass
class _State:
    config: PatchConfig
    installed: list[_Installed] = field(default_factory=list)
    report: PatchReport | None = None


def targets(obj) -> list[tuple[str, nn.Module]]:
    """The transformer(s) to patch: the module itself, or a pipeline's ``transformer`` (and ``transformer_2``)."""
    if isinstance(obj, nn.Module):
        return [("", obj)]
    found = []
    for name in ("transformer", "transformer_2"):
        m = getattr(obj, name, None)
        if isinstance(m, nn.Module):
            found.append((name, m))
    return found


def _install(module: nn.Module, plan: Plan) -> _Installed:
    created = not hasattr(module, "_diffusers_hook")
    had_forward = "forward" in module.__dict__
    name = None
    if plan.apply is not None:
        plan.apply(module)
    if plan.new_forward is not None:
        from diffusers.hooks import HookRegistry  # noqa: PLC0415

        registry = HookRegistry.check_if_exists_or_initialize(module)
        name = HOOK_PREFIX + plan.name
        try:
            _insert_inner(registry, _hook_class()(plan.new_forward, plan.wraps), name)
        except Exception:
            if plan.undo is not None:
                plan.undo(module)
            raise
    return _Installed(module, name, created, had_forward, plan.undo)


def _insert_inner(registry, hook, name: str) -> None:
    """Register ``hook`` under every hook on the module that is not ditkern's (above ditkern's own, in the order
    they were installed).

    ``HookRegistry.register_hook`` always makes the new hook the outermost one. A ditkern forward (a fused block, a
    quantized linear, the cache's wrapper) is the module's computation, while another party's hooks on the same module
    are about its boundary: diffusers' context-parallel hooks split the inputs of ``blocks.0`` (Wan) or gather the
    output of ``proj_out``; offloading and layerwise casting move and cast the weights. Outermost, a ditkern hook that
    replaces the forward would drop all of them, and one that wraps it would see the unsplit inputs while the block
    under it sees the split ones. Under them, the chain is the one that ``ditkern.patch`` before those hooks builds.

    The chain is a list of ``HookFunctionReference`` (``registry._fn_refs``, innermost first), each calling the next
    inner one through ``forward`` (a hook without ``new_forward``) or ``original_forward`` (a hook with one);
    ``module.forward`` is the outermost. Inserting at position ``i`` points the reference at ``i`` (now ``i + 1``)
    at the new hook's chained forward, which calls what that reference called before.
    """
    from diffusers.hooks.hooks import HookFunctionReference  # noqa: PLC0415

    order = registry._hook_order
    at = 1 + max((i for i, n in enumerate(order) if n.startswith(HOOK_PREFIX)), default=-1)
    if at == len(order):
        registry.register_hook(hook, name)
        return
    if name in registry.hooks:
        raise ValueError(f"ditkern: hook {name!r} is already on {type(registry._module_ref).__name__}")
    module = registry._module_ref = hook.initialize_hook(registry._module_ref)
    above = registry._fn_refs[at]
    fn_ref = HookFunctionReference()
    fn_ref.pre_forward, fn_ref.post_forward = hook.pre_forward, hook.post_forward
    fn_ref.original_forward = _inner_call(above)
    fn_ref.forward = functools.update_wrapper(functools.partial(hook.new_forward, module), hook.new_forward)
    _set_inner_call(above, functools.partial(_chained, fn_ref, module))
    hook.fn_ref = fn_ref
    registry.hooks[name] = hook
    order.insert(at, name)
    registry._fn_refs.insert(at, fn_ref)


def _chained(fn_ref, module, *args, **kwargs):
    """One link of a diffusers hook chain: pre_forward, the link's forward, post_forward."""
    args, kwargs = fn_ref.pre_forward(module, *args, **kwargs)
    return fn_ref.post_forward(module, fn_ref.forward(*args, **kwargs))


def _inner_call(fn_ref):
    """What the link ``fn_ref`` calls next: the forward it replaces (a new_forward hook) or the one it hooks."""
    return fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward


def _set_inner_call(fn_ref, fn) -> None:
    if fn_ref.original_forward is not None:
        fn_ref.original_forward = fn
    else:
        fn_ref.forward = fn


def _remove(registry, name: str) -> None:
    """Take hook ``name`` out of the chain, wherever it sits, pointing the link above it (or ``module.forward``) back
    at what it called. Not ``HookRegistry.remove_hook``: that rewires the link above through ``forward`` only, which
    for a link with ``new_forward`` (another ditkern hook, or any hook that replaces a forward) overwrites the
    replacement instead of what it calls."""
    if name not in registry.hooks:
        return
    i = registry._hook_order.index(name)
    inner = _inner_call(registry._fn_refs[i])
    if i == len(registry._hook_order) - 1:
        registry._module_ref.forward = inner
    else:
        _set_inner_call(registry._fn_refs[i + 1], inner)
    registry._module_ref = registry.hooks.pop(name).deinitalize_hook(registry._module_ref)
    registry._hook_order.pop(i)
    registry._fn_refs.pop(i)


def _uninstall(entry: _Installed) -> None:
    registry = getattr(entry.module, "_diffusers_hook", None)
    if entry.hook_name is not None and registry is not None:
        _remove(registry, entry.hook_name)
        if entry.created_registry and not registry.hooks:
            # leave the module exactly as we found it: no registry, no instance-level forward
            del entry.module._diffusers_hook
            if not entry.had_forward_attr and "forward" in entry.module.__dict__:
                del entry.module.forward
    if entry.undo is not None:
        entry.undo(entry.module)


def rules_for(family: Family, model: nn.Module, config: PatchConfig) -> dict[str, list[Rule]]:
    """The family's rules plus those of every enabled feature, keyed by exact class name."""
    merged: dict[str, list[Rule]] = {cls: [rule] for cls, rule in family.rules.items()}
    # features in the order of FEATURE_FIELDS (their hooks stack in that order on a shared module), others after
    rank = {name: i for i, name in enumerate(FEATURE_FIELDS)}
    for feature in sorted(FEATURES, key=lambda f: rank.get(f.name, len(rank))):
        extra = feature.rules(family, model, config)
        for cls, rule in (extra or {}).items():
            merged.setdefault(cls, []).append(rule)
    return merged


def patch(model_or_pipeline, config: PatchConfig | None = None, **options) -> PatchReport:
    """Patch a diffusers transformer (or a pipeline's transformer) in place with ditkern's fused kernels.

    ``config`` is a :class:`ditkern.PatchConfig`; keyword ``options`` override its fields (``fused_norms``,
    ``backend``). Default options are lossless. Patching again first undoes the previous patch. Returns a
    :class:`PatchReport` listing what was patched and what was skipped, each with a reason.
    """
    config = _merge(config, options)
    report = PatchReport()
    found = targets(model_or_pipeline)
    if not found:
        report.note(
            f"nothing patched: {type(model_or_pipeline).__name__} is neither a torch module nor a pipeline with a "
            "`transformer` component"
        )
        return report
    for prefix, model in found:  # refusals first, so that no target is patched when one is refused
        refused = parallel.quant_refusal(model, config.quant)
        if refused:  # before the quant feature reads (and packs) a sharded weight
            raise ValueError(f"ditkern.patch: {prefix or type(model).__name__}: {refused}")
    for prefix, model in found:
        unpatch(model)
        family = FAMILIES.get(type(model).__name__)
        label = prefix or type(model).__name__
        if family is None:
            report.add(Row(label, type(model).__name__, "skipped", "", "", f"unknown model class {type(model).__name__!r}; "
                           f"ditkern patches {', '.join(supported_models())}"))  # fmt: skip
            continue
        state = _State(config=config)
        rows_before = len(report.rows)
        try:
            rules = rules_for(family, model, config)
            for path, module in model.named_modules():
                for rule in rules.get(type(module).__name__, ()):
                    full = ".".join(p for p in (prefix, path) if p) or label
                    try:
                        plan = rule(module, config)
                    except BackendUnavailable:
                        raise  # a backend the user forced cannot run here: an error, not a skip
                    except Exception as exc:  # a rule that cannot understand a module must skip it, never half-patch
                        plan = f"rule failed: {type(exc).__name__}: {exc}"
                    if plan is None:
                        continue
                    if isinstance(plan, str):
                        report.add(Row(full, type(module).__name__, "skipped", "", "", plan))
                        continue
                    state.installed.append(_install(module, plan))
                    report.add(Row(full, type(module).__name__, "patched", plan.what, plan.backend, "", plan.detail))
        except Exception as exc:
            for entry in reversed(state.installed):  # never leave a model half-patched
                _uninstall(entry)
            if isinstance(exc, BackendUnavailable):
                raise RuntimeError(f"ditkern.patch: {exc}") from exc
            raise
        if not state.installed and len(report.rows) == rows_before:  # no rule spoke: not even a skip with its reason
            report.note(f"{label}: no module of {type(model).__name__} matched a ditkern rule")
        state.report = report
        setattr(model, STATE_ATTR, state)
    return report


def unpatch(model_or_pipeline) -> None:
    """Undo :func:`patch`: removes every ditkern hook, restoring the original forwards (bit-identical outputs)."""
    for _, model in targets(model_or_pipeline):
        state = model.__dict__.get(STATE_ATTR)
        if state is None:
            continue
        for entry in reversed(state.installed):
            _uninstall(entry)
        delattr(model, STATE_ATTR)


def is_patched(model_or_pipeline) -> bool:
    return any(STATE_ATTR in m.__dict__ for _, m in targets(model_or_pipeline))


@contextlib.contextmanager
def patched(model_or_pipeline, config: PatchConfig | None = None, **options) -> Iterator[PatchReport]:
    """``with ditkern.patched(pipe) as report: ...``: patch on entry, unpatch on exit."""
    report = patch(model_or_pipeline, config, **options)
    try:
        yield report
    finally:
        unpatch(model_or_pipeline)


def _merge(config: PatchConfig | None, options: dict) -> PatchConfig:
    if config is None:
        config = PatchConfig()
    elif not isinstance(config, PatchConfig):
        raise TypeError(f"config must be a ditkern.PatchConfig, got {type(config).__name__}")
    valid = {f.name for f in dataclasses.fields(PatchConfig)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"unknown patch option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(valid))}")
    config = dataclasses.replace(config, **options) if options else config
    for name in FEATURE_FIELDS:
        if getattr(config, name) is not None and not any(f.name == name for f in FEATURES):
            raise ValueError(f"ditkern.patch: option {name}=... is not available in this version of ditkern")
    # DITKERN_BACKEND is read here, once per patch: the rules and the ops they install see the resolved request
    # ("auto" or a backend the user named), never the environment at call time inside a compiled graph
    return dataclasses.replace(config, backend=requested_backend(config.backend))


FEATURE_FIELDS = ("cache", "quant", "attention", "moe")
