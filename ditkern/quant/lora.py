"""LoRA adapters on ditkern-quantized layers.

peft adapters (``pipe.load_lora_weights(...)``, ``model.add_adapter(LoraConfig(...))``) wrap a quantized linear like
any ``nn.Linear``. ditkern then gives each such peft ``lora.Linear`` (per instance; :func:`adopt`, run by a forward
pre-hook of the quantized transformer and by every fuse / unfuse) its own ``forward``, ``merge`` and ``unmerge``:

Runtime path (:func:`lora_addmm_`): the active adapters of a layer are batched, ``x @ [A_1; ...; A_n]^T`` (rank
``r_1 + ... + r_n``) then one ``addmm_`` of ``[s_1 B_1, ..., s_n B_n]`` (each scaling folded into its B) into the
quantized GEMM's output, in place: ``y = Q(x) + sum_a s_a B_a A_a x``, peft's formula, in two matmuls whatever the
number of adapters, without peft's separate add per adapter. The layers of one attention module that take the same
input tensor (diffusers' ``to_q`` / ``to_k`` / ``to_v``, and ``add_q_proj`` / ``add_k_proj`` / ``add_v_proj``) share
the first matmul: the first of them to run multiplies the input by all their A's at once, the others take their
columns when they are called with that very tensor (self-attention; a cross-attention's ``to_k`` / ``to_v`` get
another input and compute their own). The concatenated A's and scaled B's are cached per layer, keyed by the
adapters, their scalings and their weights' storage and version. Where this path does not apply, peft's own forward
runs (it is correct there: it calls the quantized layer and adds beside it): adapters disabled or merged, a
mixed-batch ``adapter_names=`` call, grad mode on (the pipelines run under ``no_grad``), dropout in training mode,
``lora_bias``, adapters of mixed dtypes. LoRA variants (DoRA and the others peft keeps in ``lora_variant``) read the
base layer's weight, which a quantized layer does not hold: they raise (runtime and merge) instead of computing with
the placeholder.

Fusing: peft's ``merge`` writes into ``base_layer.weight``, a one-element placeholder on a quantized layer. ditkern's
merge (:func:`fuse_lora`; the adopted layer's ``merge``, so ``pipe.fuse_lora()`` and peft's ``merge_and_unload``)
computes ``W' = W_hat + sum_a scaling_a * B_a @ A_a`` and re-quantizes it with the layer's format, group size and
scale dtype (absmax), marking the adapters merged in peft, which then skips their runtime path; ``unmerge``
(:func:`unfuse_lora`; ``pipe.unfuse_lora()``, which calls every layer's ``unmerge``, and
``pipe.transformer.unfuse_lora()``) puts the layer's pre-fusion packed weight back, bit for bit. The quant patch also
gives the patched transformer instance its own ``fuse_lora`` / ``unfuse_lora`` (diffusers' ``ModelMixin``
signatures): the quantized layers as above, diffusers' way for the others; ``unpatch`` removes all of it.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ditkern.formats import SCALE_DTYPES, quantize, scale_kind
from ditkern.patch.engine import is_patched, targets

#: sibling layers of one attention module that diffusers' attention processors call with the same input tensor
SHARED_INPUT = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))

_STATE = "_ditkern_lora"  # the adopted peft layer's state (its caches and its shared-input group)
_ADOPTED = ("forward", "merge", "unmerge")  # the peft layer methods ditkern's instance methods shadow


def _lora_layers(model_or_pipeline, caller: str = "fuse_lora"):
    """(path, peft LoRA layer, its quantized base layer) for each LoRA layer wrapping a ditkern-quantized linear of
    the module, or of the pipeline's transformer(s)."""
    found = targets(model_or_pipeline)
    if not found:
        raise TypeError(f"{caller}: expected a diffusers transformer or a pipeline with a `transformer`, got "
                        f"{type(model_or_pipeline).__name__}")  # fmt: skip
    for prefix, model in found:
        yield from _model_lora_layers(model, prefix)


def _model_lora_layers(model: nn.Module, prefix: str):
    for path, m in model.named_modules():
        base = _quantized_base(m)
        if base is not None:
            yield ".".join(p for p in (prefix, path) if p), m, base


def _quantized_base(m: nn.Module) -> nn.Module | None:
    """The ditkern-quantized linear a peft LoRA layer wraps, or None."""
    get_base = getattr(m, "get_base_layer", None)
    if get_base is None or not hasattr(m, "lora_A") or not hasattr(m, "get_delta_weight"):
        return None
    base = get_base()
    return base if "_ditkern_quant" in base.__dict__ else None


# ----------------------------------------------------------------------------------------------------------------------
# the batched low-rank path
# ----------------------------------------------------------------------------------------------------------------------
def lora_addmm_ref(out: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor],
                   scalings: list[float]) -> torch.Tensor:  # fmt: skip
    """``out + sum_i scalings[i] * x @ a[i]^T @ b[i]^T`` in float64, out of place: the oracle of :func:`lora_addmm_`
    (``x [M, K]``, ``a[i] [r_i, K]``, ``b[i] [N, r_i]``, ``out [M, N]``)."""
    acc = out.double()
    for ai, bi, s in zip(a, b, scalings):
        acc = acc + s * (x.double() @ ai.double().T) @ bi.double().T
    return acc


def lora_addmm_(out: torch.Tensor, x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor,
                xa: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``out += (x @ a_cat^T) @ b_cat^T`` with the adapters batched: ``a_cat [R, K]`` the A's of all active adapters
    stacked (``R = r_1 + ... + r_n``), ``b_cat [N, R]`` their B's side by side, each multiplied by its scaling; ``xa``
    (``[M, R]``) where the first product was already made (a shared-input group). ``x`` is cast to ``a_cat``'s dtype
    first, as peft casts the input to the adapter's. Where ``out`` has that dtype and is a contiguous ``[.., N]``
    tensor the second product is accumulated into it in place (``addmm_``); otherwise (a float32 adapter on a bf16
    model) the sum is made in the adapter's dtype and rounded once to ``out``'s, as peft does. Returns ``out`` (or
    the new tensor)."""
    N, R = b_cat.shape
    if xa is None:
        xa = x.reshape(-1, x.shape[-1]).to(a_cat.dtype) @ a_cat.T  # [M, R]
    if out.dtype == a_cat.dtype and out.is_contiguous() and out.shape[-1] == N:
        out.view(-1, N).addmm_(xa, b_cat.T)
        return out
    return torch.addmm(out.reshape(-1, N).to(a_cat.dtype), xa, b_cat.T).to(out.dtype).view(out.shape)


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


def _plan(layer: nn.Module, x: torch.Tensor, args, kwargs) -> list[str] | None:
    """The active adapters the batched path serves for this call, or None where peft's own forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged or not getattr(layer, "cast_input_dtype_enabled", True):
        return None
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    variants = [a for a in names if a in getattr(layer, "lora_variant", {})]
    if variants:
        raise NotImplementedError(f"LoRA variants (DoRA, ...) are not supported on a ditkern-quantized layer (adapters "
                                  f"{variants}): they read the base weight, which the packed layer does not hold; "
                                  "ditkern.unpatch() the model to use them")  # fmt: skip
    if torch.is_grad_enabled():  # autograd (the in-place add would meet the quantized layer's inference-only output)
        return None
    for a in names:
        drop = layer.lora_dropout[a]
        if (drop.training and not isinstance(drop, nn.Identity)) or layer.lora_B[a].bias is not None:
            return None
    if len({layer.lora_A[a].weight.dtype for a in names} | {layer.lora_B[a].weight.dtype for a in names}) > 1:
        return None
    return names


def _stacked(layer: nn.Module, names: list[str]):
    """(key, a_cat [R, K], b_cat [N, R] with the scalings folded in), cached on the layer while the key holds (not
    under torch.compile, which traces the stacking instead: key None)."""
    wa = [layer.lora_A[a].weight for a in names]
    wb = [layer.lora_B[a].weight for a in names]

    def stack():
        with torch.no_grad():
            a_cat = torch.cat(wa) if len(wa) > 1 else wa[0].detach()
            b_cat = torch.cat([(w.float() * layer.scaling[a]).to(w.dtype) for a, w in zip(names, wb)], dim=1)
        return a_cat, b_cat

    if torch.compiler.is_compiling():
        return (None, *stack())
    key = tuple((a, float(layer.scaling[a]), p.data_ptr(), _version(p), q.data_ptr(), _version(q))
                for a, p, q in zip(names, wa, wb))  # fmt: skip
    st = layer.__dict__[_STATE]
    if st.get("key") != key:
        st.update(zip(("key", "a_cat", "b_cat"), (key, *stack())))
    return key, st["a_cat"], st["b_cat"]


class _SharedInput:
    """The layers of one attention module that are called with the same input tensor: the first to run makes
    ``x @ [A's of all of them]^T`` once; the others take their columns while called with that very tensor."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self.x = None  # the input of the last product (held, so that its identity cannot be reused)
        self.version = None
        self.cols: dict[int, tuple] = {}  # id(member) -> (key, xa columns), for the members still to be called
        self.shared = 0  # products taken from another member's matmul (tests read it)

    def columns(self, layer, x, key, a_cat):
        """``x @ a_cat^T`` for ``layer``: from the group's product when it was made from this tensor and the layer's
        adapters are the same, else a new product for every member that can take it."""
        got = self.cols.pop(id(layer), None)
        if got is not None and x is self.x and _version(x) == self.version and got[0] == key:
            self.shared += 1
            if not self.cols:
                self.x = None
            return got[1]
        todo = [(layer, key, a_cat)]
        for m in self.members:
            if m is layer or _STATE not in m.__dict__:
                continue
            names = _plan_or_none(m, x)
            if names and m.lora_A[names[0]].weight.shape[1] == x.shape[-1]:
                k, a, _ = _stacked(m, names)
                if a.dtype == a_cat.dtype and a.device == a_cat.device:
                    todo.append((m, k, a))
        xa = x.reshape(-1, x.shape[-1]).to(a_cat.dtype) @ torch.cat([a for _, _, a in todo]).T
        self.cols, lo = {}, 0
        for m, k, a in todo:
            self.cols[id(m)] = (k, xa[:, lo : lo + a.shape[0]])
            lo += a.shape[0]
        self.x, self.version = x, _version(x)
        return self.cols.pop(id(layer))[1]


def _plan_or_none(layer, x):
    try:
        return _plan(layer, x, (), {})
    except NotImplementedError:
        return None  # it raises when it is called itself


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """An adopted peft ``lora.Linear``'s forward: the quantized GEMM, then the batched low-rank update in place."""
    names = _plan(self, x, args, kwargs) if _quantized_base(self) is not None else None
    if names is None:
        return type(self).forward(self, x, *args, **kwargs)
    out = self.base_layer(x)
    if not names:
        return out
    key, a_cat, b_cat = _stacked(self, names)
    group = self.__dict__[_STATE].get("group")
    xa = None if group is None or torch.compiler.is_compiling() else group.columns(self, x, key, a_cat)
    return lora_addmm_(out, x, a_cat, b_cat, xa)


# ----------------------------------------------------------------------------------------------------------------------
# fusing: merge = re-quantize W_hat + delta; unmerge = the packed weight as before
# ----------------------------------------------------------------------------------------------------------------------
_BUFFERS = ("qweight_packed", "qweight_scales", "qweight_inv_smooth")


def _fuse_layer(path: str, layer: nn.Module, base: nn.Module, names: list[str], safe: bool) -> bool:
    names = [a for a in names if a in layer.lora_A and a not in layer.merged_adapters]
    if not names:
        return False
    variants = [a for a in names if a in getattr(layer, "lora_variant", {})]
    if variants:
        raise NotImplementedError(f"fuse_lora: {path}: LoRA variants (DoRA, ...) cannot be merged into a ditkern-"
                                  f"quantized layer (adapters {variants})")  # fmt: skip
    st = base.__dict__["_ditkern_quant"]
    qw = st["qweight"]
    with torch.no_grad():
        w = qw.dequantize(torch.float32)
        for a in names:
            w = w + layer.get_delta_weight(a).float().to(w.device)
        if safe and not torch.isfinite(w).all():
            raise ValueError(f"fuse_lora: {path}: the merged weight is not finite; adapters {names} seem broken")
        new = quantize(w, qw.format, qw.group_size, SCALE_DTYPES[scale_kind(qw.scales)], name=path)
    if "lora_unfused" not in st:  # the layer as patched, for unfuse_lora
        st["lora_unfused"] = (qw, {k: base._buffers[k] for k in _BUFFERS if k in base._buffers})
    dev = base.qweight_packed.device
    base._buffers["qweight_packed"] = new.packed.to(dev)
    # stored as the integer view the patch chose for this scale dtype (the same as before: same format)
    base._buffers["qweight_scales"] = new.scales.to(dev).view(base._buffers["qweight_scales"].dtype)
    base._buffers.pop("qweight_inv_smooth", None)
    st["qweight"] = new
    layer.merged_adapters.extend(names)
    return True


def _unfuse_layer(layer: nn.Module, base: nn.Module) -> bool:
    st = base.__dict__["_ditkern_quant"]
    if "lora_unfused" not in st:
        return False
    st["qweight"], buffers = st.pop("lora_unfused")
    for k in _BUFFERS:
        base._buffers.pop(k, None)
    base._buffers.update(buffers)
    layer.merged_adapters.clear()
    return True


def fuse_lora(model_or_pipeline, adapter_names: list[str] | None = None, lora_scale: float = 1.0,
              safe_fusing: bool = False) -> list[str]:  # fmt: skip
    """Merge the active (or the named) LoRA adapters into every ditkern-quantized layer they wrap, re-quantizing the
    merged weight; returns the paths of the fused layers. As diffusers' ``fuse_lora``: ``lora_scale`` multiplies the
    active adapters' scaling first (peft ``scale_layer``), ``safe_fusing`` refuses a non-finite merged weight. Layers
    that are not quantized are left to peft (``pipe.fuse_lora()`` / ``layer.merge()``). AWQ-smoothed layers are
    re-quantized without smoothing."""
    if not isinstance(lora_scale, (int, float)) or isinstance(lora_scale, bool):
        raise TypeError(f"fuse_lora: lora_scale must be a number, got {lora_scale!r}")
    fused = []
    for path, layer, base in list(_lora_layers(model_or_pipeline, "fuse_lora")):
        _adopt_layer(layer)
        if lora_scale != 1.0:
            layer.scale_layer(lora_scale)
        names = list(adapter_names) if adapter_names is not None else list(layer.active_adapters)
        if _fuse_layer(path, layer, base, names, safe_fusing):
            fused.append(path)
    return fused


def unfuse_lora(model_or_pipeline) -> list[str]:
    """Undo :func:`fuse_lora` on every quantized layer: its packed weight as before the first fusion, bit for bit,
    and no adapter marked merged (their runtime path runs again). Returns the paths of the restored layers."""
    restored = []
    for path, layer, base in list(_lora_layers(model_or_pipeline, "unfuse_lora")):
        _adopt_layer(layer)
        if _unfuse_layer(layer, base):
            restored.append(path)
    return restored


def _merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
    """An adopted layer's ``merge`` (peft's signature): re-quantizing, as :func:`fuse_lora`."""
    base = _quantized_base(self)
    if base is None:
        return type(self).merge(self, safe_merge=safe_merge, adapter_names=adapter_names)
    names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
    _fuse_layer(f"{type(self).__name__} layer", self, base, names, safe_merge)


def _unmerge(self) -> None:
    """An adopted layer's ``unmerge``: the packed weight as before the first merge (``pipe.unfuse_lora()``)."""
    base = _quantized_base(self)
    if base is None:
        return type(self).unmerge(self)
    _unfuse_layer(self, base)


# ----------------------------------------------------------------------------------------------------------------------
# adoption: ditkern's forward / merge / unmerge on each peft layer that wraps a quantized linear
# ----------------------------------------------------------------------------------------------------------------------
def _adopt_layer(layer: nn.Module) -> bool:
    if _STATE in layer.__dict__:
        return False
    layer.__dict__[_STATE] = {}
    for name, fn in zip(_ADOPTED, (_forward, _merge, _unmerge)):
        layer.__dict__[name] = types.MethodType(fn, layer)
    return True


def adopt(model: nn.Module) -> int:
    """Give every peft LoRA layer of ``model`` that wraps a ditkern-quantized linear ditkern's forward (the batched
    low-rank path), ``merge`` and ``unmerge`` (re-quantizing), and group the ones that share an input
    (:data:`SHARED_INPUT`); returns how many layers were new. Runs before every forward of a quantized transformer
    (a pre-hook), so adapters loaded at any time are served; idempotent."""
    new = 0
    for parent in model.modules():
        for names in SHARED_INPUT:
            members = []
            for n in names:
                m = parent._modules.get(n)
                if m is not None and _quantized_base(m) is not None:
                    new += _adopt_layer(m)
                    members.append(m)
            if len(members) > 1 and any(m.__dict__[_STATE].get("group") is None or
                                        m.__dict__[_STATE]["group"].members != members for m in members):
                group = _SharedInput(members)  # fmt: skip
                for m in members:
                    m.__dict__[_STATE]["group"] = group
    for _, layer, _ in _model_lora_layers(model, ""):
        new += _adopt_layer(layer)
    return new


def _adopt_hook(model, args):
    # peft (inject_adapter_in_model / diffusers' load_lora_adapter) sets ``peft_config`` on the model: without it
    # there is no adapter to adopt, so the module walk is skipped on every denoising step
    if getattr(model, "peft_config", None) and not torch.compiler.is_compiling() and is_patched(model):
        adopt(model)


def _release(model: nn.Module) -> None:
    """Undo :func:`adopt`: peft's own methods again on every layer."""
    for m in model.modules():
        if m.__dict__.pop(_STATE, None) is not None:
            for name in _ADOPTED:
                m.__dict__.pop(name, None)


# ----------------------------------------------------------------------------------------------------------------------
# the transformer's own fuse_lora / unfuse_lora
# ----------------------------------------------------------------------------------------------------------------------
def _tuner_layers(model: nn.Module, quantized: bool):
    quant_ids = {id(layer) for _, layer, _ in _model_lora_layers(model, "")}
    for m in model.modules():
        if hasattr(m, "merge") and hasattr(m, "merged_adapters") and (id(m) in quant_ids) == quantized:
            yield m


def _model_fuse_lora(model, lora_scale=1.0, safe_fusing=False, adapter_names=None):
    """``ModelMixin.fuse_lora`` of a quantized transformer: quantized layers re-quantized, peft's merge elsewhere."""
    if not is_patched(model):  # an unpatched deep copy of a patched transformer: diffusers' own
        return type(model).fuse_lora(model, lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)
    model.lora_scale, model._safe_fusing = lora_scale, safe_fusing  # what diffusers' fuse_lora records
    fuse_lora(model, adapter_names, lora_scale, safe_fusing)
    for m in _tuner_layers(model, quantized=False):
        if lora_scale != 1.0:
            m.scale_layer(lora_scale)
        m.merge(safe_merge=safe_fusing, adapter_names=adapter_names)


def _model_unfuse_lora(model):
    """``ModelMixin.unfuse_lora`` of a quantized transformer."""
    if not is_patched(model):
        return type(model).unfuse_lora(model)
    unfuse_lora(model)
    for m in _tuner_layers(model, quantized=False):
        m.unmerge()


def install_fuse_methods(model: nn.Module) -> None:
    """Give the transformer instance its own ``fuse_lora`` / ``unfuse_lora`` and the pre-hook that adopts its LoRA
    layers (:func:`remove_fuse_methods` undoes). Idempotent (each quantized layer's patch calls it)."""
    model.__dict__["fuse_lora"] = types.MethodType(_model_fuse_lora, model)
    model.__dict__["unfuse_lora"] = types.MethodType(_model_unfuse_lora, model)
    # found by value, not by a handle: a deep copy's handle would point at the original's hook table
    if _adopt_hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_adopt_hook)


def remove_fuse_methods(model: nn.Module) -> None:
    model.__dict__.pop("fuse_lora", None)
    model.__dict__.pop("unfuse_lora", None)
    for k in [k for k, h in model._forward_pre_hooks.items() if h is _adopt_hook]:
        del model._forward_pre_hooks[k]
    _release(model)
