"""The "quant" feature: ``ditkern.patch(model, quant="fp4" | "fp6" | "w4a8" | "w6a8" | QuantConfig(...))``.

Every ``nn.Linear`` (exact class name ``Linear``) inside the family's transformer is replaced, per instance, by a
packed FP4/FP6/int4 layer: the ``weight`` parameter is taken out of the module (offloaded to the CPU when the model is
on a GPU, so ``unpatch`` can put the very same tensor back, bit-exact), the packed codes and scales become buffers
(``qweight_packed``, ``qweight_scales``, optional ``qweight_inv_smooth``; they follow ``model.to(...)``), ``weight`` is
left as a zero-stride placeholder of the original shape/dtype/device (code that reads ``linear.weight.dtype`` keeps
working; nothing reads its values: the forward is replaced), and the forward runs ``fpx_linear`` (weight-only) or
``fpx_fp8_linear`` (W4A8 / W6A8 / W4A6). On the CPU the ops run their torch reference (dequantize + matmul), so a
quantized model runs everywhere. The report row of each layer shows its format and its weight memory before/after.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import OrderedDict

import torch
from torch import nn

from ditkern._backend import BackendUnavailable, choose
from ditkern.formats import QuantizedWeight, inv_smooth, quantize
from ditkern.patch.engine import Feature, Plan, device_dtype, family_of, register_feature
from ditkern.patch.family import COMMON_SKIP, Family, QuantLayout, Stack
from ditkern.quant import fp8_companion, lora
from ditkern.quant.config import AUTO_FORMATS, QuantConfig, as_quant_config

UPGRADE = "fp6_e2m3"  # the format a layer moves to first under a memory budget


def default_skip(model: nn.Module, family: Family | None = None, edges: bool = True) -> list[str]:
    """The default high-precision list of the model's family (``Family.quant``), made explicit: the layers that
    :data:`ditkern.patch.family.COMMON_SKIP` names (the model-level embedders, the final projection, the final adaLN)
    are looked up *outside* the family's block stack and listed by exact path, so a pattern such as ``*embed*`` no
    longer catches the timestep embedders inside every DiT block's ``norm1`` (24% of DiT's block weights); the family's
    own extra patterns and its edge patterns (the adaLN modulation linears, ``norm*``, of the first block of the first
    stack list and the last block of the last one) stay as declared (``edges=False``: without the edge patterns).
    ``family`` defaults to the one registered for the model's class."""
    family = family if family is not None else family_of(model)
    layout = family.quant if family is not None else QuantLayout()
    stack = family.stack if family is not None and isinstance(family.stack, Stack) else None
    pats = layout.default_skip(model, stack if edges else None)
    lists = set(stack.lists) if stack is not None else set()
    if not lists:
        return pats
    common = [p for p in pats if p in COMMON_SKIP]
    outside = [path for path, m in model.named_modules()
               if type(m).__name__ == "Linear" and path.split(".")[0] not in lists]  # fmt: skip
    explicit = [path for path in outside if _matches(path, common)]
    return explicit + [p for p in pats if p not in COMMON_SKIP]


# why each COMMON_SKIP pattern keeps its layers (the report's reason); measured in bench/results/quant/skip_study.md
_COMMON_WHY = {
    "*embed*": "model-level embedder, outside the blocks",
    "proj_out*": "final projection, outside the blocks",
    "norm_out*": "final adaLN modulation, outside the blocks",
}


def _skip_reason(model: nn.Module, path: str, pattern: str, family: Family | None) -> str:
    """Why the default list keeps ``path`` (matched by ``pattern``)."""
    common = _matches(path, COMMON_SKIP)
    if pattern == path and common is not None:
        return _COMMON_WHY.get(common, f"default pattern {common!r}")
    layout = family.quant if family is not None else QuantLayout()
    if any(pattern.endswith("." + e) and pattern.split(".")[1].isdigit() for e in layout.edge_skip):
        return f"adaLN modulation of the first / last block (pattern {pattern!r})"
    return f"the family's skip pattern {pattern!r}"


def _matches(path: str, patterns) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(path, p)), None)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**16 else f"{n / 2**10:.1f} KiB"


def _fp8_reason(device: torch.device) -> str | None:
    from ditkern._backend import fp8_missing  # noqa: PLC0415

    reason = fp8_missing(device)
    return None if reason is None else f"{reason}: weight-only GEMM"


def quantize_layer(path: str, module: nn.Linear, fmt: str, qc: QuantConfig, stats) -> QuantizedWeight:
    w = module.weight.detach()
    if qc.method == "awq" and stats is not None:
        from ditkern.quant.calibrate import awq_quantize  # noqa: PLC0415

        return awq_quantize(w, fmt, qc.group_size, qc.scale_dtype, stats, name=path)[0]
    if qc.method == "adaround" and stats is not None:
        from ditkern.quant.adaround import adaround_quantize  # noqa: PLC0415

        return adaround_quantize(w, fmt, qc.group_size, qc.scale_dtype, stats, name=path)
    if qc.method == "gptq" and stats is not None:
        from ditkern.quant.calibrate import gptq_quantize  # noqa: PLC0415
        from ditkern.formats import check_finite  # noqa: PLC0415

        check_finite(w, path)
        return gptq_quantize(w, fmt, qc.group_size, qc.scale_dtype, stats, name=path)
    if w.is_cuda:  # the Triton quantize + pack kernel: same codes and scales as the reference, bit for bit
        from ditkern.ops.fpx_quantize import fpx_quantize  # noqa: PLC0415

        return fpx_quantize(w, fmt, qc.group_size, qc.scale_dtype, name=path)
    return quantize(w, fmt, qc.group_size, qc.scale_dtype, name=path)


def kept_reason(model: nn.Module, qc: QuantConfig, family: Family | None = None):
    """``reason(path, module)``: why ``qc`` leaves that linear layer of ``model`` in high precision, or None if it
    quantizes it (the skip list, default or ``qc.skip``, and the 2-D weight check)."""
    family = family if family is not None else family_of(model)
    skip = default_skip(model, family, edges=qc.keep_edge_adaln) if qc.skip is None else list(qc.skip)

    def reason(path: str, m: nn.Module) -> str | None:
        pat = _matches(path, skip)
        if pat is not None:
            why = _skip_reason(model, path, pat, family) if qc.skip is None else f"skip pattern {pat!r}"
            return f"kept in high precision ({why})"
        if "weight" not in m._parameters or m.weight is None or m.weight.dim() != 2:
            return "no 2-D weight parameter"
        return None

    return reason


def plan_model(model: nn.Module, qc: QuantConfig, backend: str | None, family: Family | None = None
               ) -> dict[int, Plan | str]:  # fmt: skip
    """Decide (and quantize) every linear layer: {id(module): Plan, or the reason it stays in high precision}."""
    family = family if family is not None else family_of(model)
    kept = kept_reason(model, qc, family)
    cal = qc.calibration.layers if qc.calibration is not None else {}
    preq = getattr(qc, "_prequantized", None)  # set by load_quantized: {path: QuantizedWeight}
    out: dict[int, Plan | str] = {}
    chosen: dict[str, tuple[nn.Module, QuantizedWeight | None]] = {}
    for path, m in model.named_modules():
        if type(m).__name__ != "Linear":
            continue
        if preq is not None:
            if path in preq:
                chosen[path] = (m, preq[path])
            else:
                out[id(m)] = "kept in high precision (not quantized in the loaded checkpoint)"
            continue
        why = kept(path, m)
        if why is not None:
            out[id(m)] = why
            continue
        chosen[path] = (m, None)

    if preq is None:
        errors: dict[str, dict[str, float]] = {}
        need_err = qc.format in AUTO_FORMATS or qc.memory_budget is not None or qc.bits is not None
        from tqdm.auto import tqdm  # noqa: PLC0415

        from ditkern.quant.calibrate import layer_error  # noqa: PLC0415

        slow = qc.method in ("gptq", "adaround") and bool(cal)
        for path, (m, _) in tqdm(chosen.items(), desc=f"quantize ({qc.method})", unit="layer", disable=not slow):
            stats = cal.get(path)
            base = ("fp4_e2m1", "int4") if qc.format in AUTO_FORMATS else (qc.format,)
            cands = {f: quantize_layer(path, m, f, qc, stats) for f in base}
            if need_err:
                errs = {f: layer_error(m.weight.detach(), q, stats) for f, q in cands.items()}
                best = min(errs, key=errs.get)
                errors[path] = {"base": errs[best]}
                chosen[path] = (m, cands[best])
            else:
                chosen[path] = (m, cands[qc.format])
        if qc.memory_budget is not None or qc.bits is not None:
            _fit_budget(chosen, errors, qc, cal)

    act = qc.act_grid
    for path, (m, qw) in chosen.items():
        if qw is None:
            out[id(m)] = "kept in high precision by memory_budget (largest error per byte saved)"
            continue
        # a loaded checkpoint's layers hold a placeholder, not a full-precision weight: unpatch dequantizes
        out[id(m)] = _plan(m, qw, act, backend, qc, dequantize_on_undo=preq is not None)
    return out


def _fit_budget(chosen, errors, qc: QuantConfig, cal) -> None:
    """Greedy upgrades (4-bit -> fp6_e2m3 -> high precision) by measured error reduction per extra byte, within
    ``memory_budget`` bytes (or a fraction of the bf16 size) or ``bits`` per weight."""
    from ditkern.quant.calibrate import layer_error  # noqa: PLC0415

    numel = sum(m.weight.numel() for m, _ in chosen.values())
    if qc.bits is not None:
        budget, asked = int(qc.bits * numel / 8), f"bits={qc.bits!r}"
    elif isinstance(qc.memory_budget, int):
        budget, asked = qc.memory_budget, f"memory_budget={qc.memory_budget!r}"
    else:
        budget, asked = int(qc.memory_budget * 2 * numel), f"memory_budget={qc.memory_budget!r}"
    level = {p: 0 for p in chosen}
    qws = {p: [qw] for p, (m, qw) in chosen.items()}
    errs = {p: [errors[p]["base"]] for p in chosen}
    cost = {p: [qw.nbytes] for p, (m, qw) in chosen.items()}
    for p, (m, qw) in chosen.items():
        up = quantize_layer(p, m, UPGRADE, qc, cal.get(p)) if qw.format != UPGRADE else None
        if up is not None:
            qws[p].append(up)
            errs[p].append(layer_error(m.weight.detach(), up, cal.get(p)))
            cost[p].append(up.nbytes)
        qws[p].append(None)  # high precision
        errs[p].append(0.0)
        cost[p].append(m.weight.numel() * m.weight.element_size())
    total = sum(c[0] for c in cost.values())
    if total > budget:
        raise ValueError(f"QuantConfig.{asked} ({budget} bytes) is below what the quantized layers need at "
                         f"{qc.format} ({total} bytes, {8 * total / numel:.3g} bits per weight)")  # fmt: skip
    while True:
        best = None
        for p in chosen:
            lv = level[p]
            if lv + 1 >= len(cost[p]):
                continue
            extra = cost[p][lv + 1] - cost[p][lv]
            gain = errs[p][lv] - errs[p][lv + 1]
            if total + extra <= budget and gain > 0:
                score = gain / max(extra, 1)
                if best is None or score > best[0]:
                    best = (score, p, extra)
        if best is None:
            break
        _, p, extra = best
        level[p] += 1
        total += extra
    for p, (m, _) in chosen.items():
        chosen[p] = (m, qws[p][level[p]])


class _InferenceOnly(torch.autograd.Function):
    """The output of a quantized linear computed where autograd is on: the forward result as is, and a backward that
    refuses with the reason (the packed weight has no gradient) instead of torch's "no autograd formula"."""

    @staticmethod
    def forward(ctx, out, fmt, *inputs):
        ctx.fmt = fmt
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            f"ditkern quantization (quant=, {ctx.fmt}) is inference-only: this layer's weight is packed {ctx.fmt} codes "
            "with no gradient. Run the model under torch.no_grad() / torch.inference_mode(), or ditkern.unpatch() it "
            "(or patch without quant=) to train or take gradients."
        )


def _plan(module: nn.Linear, qw: QuantizedWeight, act: str | None, backend: str | None, qc: QuantConfig,
          dequantize_on_undo: bool = False) -> Plan:  # fmt: skip
    N, K = qw.shape
    w = module.weight
    before = w.numel() * w.element_size()
    after = qw.nbytes
    note = ""
    use_act = act
    if act is not None and (reason := _fp8_reason(w.device)):
        use_act, note = None, f"; {reason}"
    a = {None: "", "e4m3": " A8", "fp6_e3m2": " A6"}[use_act]
    sm = " awq" if qw.smooth is not None else ""
    path = {None: "weight-only", "e4m3": "FP8 E4M3 activations", "fp6_e3m2": "FP6 activations on the FP8 GEMM"}
    bits = 8 * after / (N * K)
    detail = (f"{qw.format} g{qw.group_size}{a}{sm}: {path[use_act]}, {bits:.3g} bits/weight, {_mib(before)} -> "
              f"{_mib(after)} ({after / before:.2f}x, saves {_mib(max(before - after, 0))}){note}")  # fmt: skip
    detail += "; inference-only (a backward through it refuses)"
    what = "quantized linear (fpx_fp8_linear)" if use_act else "quantized linear (fpx_linear)"
    fmt, G = qw.format, qw.group_size
    gemm_backend = _gemm_backend(w, qw, use_act, backend)
    # per call, by rows: with FP8 activations a call of at most SMALL_M_ROWS rows (the modulation linears: M = batch)
    # runs the weight-only CUDA GEMV where it can run (a GPU, no forced backend)
    small_m_gemv = use_act is not None and _small_m_backend(w, qw, backend) == "cuda"
    if small_m_gemv:
        detail += f"; calls of <= {SMALL_M_ROWS} rows: weight-only (fpx_linear cuda GEMV)"

    scale_dtype = qw.scales.dtype

    def forward(module, input):
        if torch.is_grad_enabled() and (input.requires_grad or any(p.requires_grad for p in module.parameters())):
            # a forward without no_grad (parameters require grad by default) runs; a backward through it refuses
            with torch.no_grad():
                out = forward(module, input)
            return _InferenceOnly.apply(out, fmt, input, *module.parameters())
        if module.__dict__["weight"].stride() != (0, 0):
            # something wrote a full weight into the placeholder (peft's merge(safe_merge=True) does, then skips the
            # adapter's runtime path): the packed GEMM below would silently drop what was written
            raise RuntimeError("a ditkern-quantized linear's weight placeholder was overwritten (peft merge() / "
                               "merge_and_unload() on a quantized layer?); merge LoRA adapters with pipe.fuse_lora(), "
                               "model.fuse_lora() or ditkern.quant.fuse_lora(), which re-quantize")  # fmt: skip
        # the float buffers are stored as integer views so that model.to(dtype) cannot round them
        scales = module.qweight_scales.view(scale_dtype)
        inv = module._buffers.get("qweight_inv_smooth")
        inv = None if inv is None else inv.view(torch.float32)
        if use_act is not None and inv is None and (comp := fp8_companion.lookup(input, use_act)) is not None:
            out = _fpx_fp8_matmul()(comp[0], comp[1], module.qweight_packed, scales, module.bias, format=fmt,
                                    group_size=G, in_features=K, out_dtype=input.dtype, backend=backend)  # fmt: skip
            return out.view(*input.shape[:-1], N)
        if use_act is None or (small_m_gemv and input.numel() // K <= SMALL_M_ROWS):
            # weight-only; and with FP8 activations too for a few rows on a GPU: memory-bound, where the small-M GEMV
            # reads the same packed weights without the activation quantization (and without its error)
            return _fpx_linear()(input, module.qweight_packed, scales, module.bias, format=fmt,
                                 group_size=G, in_features=K, inv_smooth=inv, backend=backend)  # fmt: skip
        return _fpx_fp8_linear()(input, module.qweight_packed, scales, module.bias, format=fmt,
                                 group_size=G, in_features=K, act=use_act, inv_smooth=inv, backend=backend)  # fmt: skip

    def apply(module):
        order = list(module._parameters)
        p = module._parameters.pop("weight")
        dev = p.device
        if dev.type != "cpu" and not dequantize_on_undo:
            p.data = p.data.to("cpu")  # frees the device copy; unpatch moves this very tensor back
        module._ditkern_quant = {
            "param": p,
            "device": dev,
            "order": order,
            "qweight": qw,
            "activations": qc.activations,
            "calibration": qc.calibration_record(),
        }
        module.register_buffer("qweight_packed", qw.packed.to(dev))
        module.register_buffer("qweight_scales", _int_view(qw.scales.to(dev)))
        if qw.smooth is not None:
            module.register_buffer("qweight_inv_smooth", _int_view(inv_smooth(qw.smooth).to(dev)))
        # a placeholder with the weight's shape, dtype and device, 1 element of storage
        module.__dict__["weight"] = torch.zeros((), dtype=p.dtype, device=dev).expand(N, K)
        module._ditkern_quant["hooks"] = (module.register_state_dict_post_hook(_placeholder_to_state_dict),
                                          module.register_load_state_dict_pre_hook(_placeholder_from_state_dict))

    def undo(module):
        st = module.__dict__.pop("_ditkern_quant")
        for h in st["hooks"]:
            h.remove()
        module.__dict__.pop("weight", None)
        for name in ("qweight_packed", "qweight_scales", "qweight_inv_smooth"):
            module._buffers.pop(name, None)
        p = st["param"]
        if dequantize_on_undo:
            p = nn.Parameter(st["qweight"].dequantize(p.dtype).to(st["device"]), requires_grad=p.requires_grad)
        elif st["device"].type != "cpu":
            p.data = p.data.to(st["device"])
        params = OrderedDict((k, p if k == "weight" else module._parameters[k]) for k in st["order"])
        module._parameters.clear()
        module._parameters.update(params)

    return Plan("quant", what, forward, apply, undo, detail, backend=gemm_backend)


def _placeholder_to_state_dict(module, state_dict, prefix, local_metadata):
    # diffusers' LoRA loader reads ``transformer.state_dict()[<layer>.weight]`` (its shape, device) as it does for
    # bitsandbytes / torchao layers; save_quantized leaves it out
    state_dict[prefix + "weight"] = module.__dict__["weight"]


def _placeholder_from_state_dict(module, state_dict, prefix, *args):
    # the placeholder of our own state_dict loads back as nothing; a real weight stays an unexpected key
    w = state_dict.get(prefix + "weight")
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.stride() == (0, 0):
        del state_dict[prefix + "weight"]


# rows of the activation the GEMM is planned for: a DiT call multiplies thousands of tokens at once (the small-M CUDA
# GEMV of fpx_linear serves only a few rows; at call time each call still picks its own)
PLAN_ROWS = 4096


def _gemm_backend(w: torch.Tensor, qw: QuantizedWeight, act: str | None, backend: str | None,
                  rows: int = PLAN_ROWS) -> str:  # fmt: skip
    """The backend of the layer's GEMM (fpx_linear weight-only, fpx_fp8_matmul with FP8 activations) for its device
    and dtype, at ``rows`` rows (a DiT's row count by default)."""
    N, K = qw.shape
    packed = qw.packed.to(w.device)
    if act is None:
        from ditkern.ops.fpx_linear import BACKENDS  # noqa: PLC0415

        x = torch.empty(1, K, device=w.device, dtype=w.dtype).expand(rows, K)
        return choose("fpx_linear", BACKENDS, x, packed, backend=backend)
    from ditkern.ops.fpx_fp8_linear import BACKENDS  # noqa: PLC0415

    xq = torch.empty(1, K, device=w.device, dtype=torch.float8_e4m3fn).expand(rows, K)
    return choose("fpx_fp8_matmul", BACKENDS, xq, packed, backend=backend)


# With FP8 activations, calls of at most this many rows run the weight-only CUDA GEMV instead (the modulation linears:
# M = batch size). A prediction from the static figures, to be replaced by the measured crossover: the GEMV issues ~5
# instructions per code at M=1 (~1.6x the H200 floor at FLUX's MLP) but its CUDA-core FMAs grow with M (~6.6x the
# floor at M=16), while the FP8 GEMM's cost at a few rows is its weight traffic plus the activation quantization.
SMALL_M_ROWS = 4


def _small_m_backend(w: torch.Tensor, qw: QuantizedWeight, backend: str | None) -> str | None:
    """The weight-only backend for SMALL_M_ROWS rows on the layer's device (None where a forced backend cannot serve
    them: the FP8 path then serves every call)."""
    try:
        return _gemm_backend(w, qw, None, backend, rows=SMALL_M_ROWS)
    except BackendUnavailable:
        return None


_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.uint8: torch.uint8}


def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.dtype])


def _fpx_linear():
    from ditkern.ops.fpx_linear import fpx_linear  # noqa: PLC0415

    return fpx_linear


def _fpx_fp8_matmul():
    from ditkern.ops.fpx_fp8_linear import fpx_fp8_matmul  # noqa: PLC0415

    return fpx_fp8_matmul


def _fpx_fp8_linear():
    from ditkern.ops.fpx_fp8_linear import fpx_fp8_linear  # noqa: PLC0415

    return fpx_fp8_linear


# ----------------------------------------------------------------------------------------------------------------------
# adaLN -> FP8 fusion: the norm modules whose output feeds quantized linears emit its FP8 form in the same kernel
# ----------------------------------------------------------------------------------------------------------------------
FUSED_FP8_WHAT = "adaLN + FP8 activation quantization fused (adaln_modulate_fp8)"


def _modulate_fp8(norm, x, shift, scale, backend, grid):
    from ditkern.ops.adaln_modulate_fp8 import adaln_modulate_fp8  # noqa: PLC0415
    from ditkern.patch.common import _promoted, _unit_stride, norm_spec  # noqa: PLC0415

    spec = norm_spec(norm)
    out, xq, sx = adaln_modulate_fp8(_unit_stride(x), shift, scale, norm=spec.kind, weight=spec.weight, bias=spec.bias,
                                     eps=spec.eps, grid=grid, backend=backend)  # fmt: skip
    out = _promoted(out, shift, scale)  # an upcast keeps the values, so the FP8 form still matches
    fp8_companion.attach(out, xq, sx, grid)
    return out


def _fp8_norm_backend(module: nn.Module, cfg) -> str:
    from ditkern.ops.adaln_modulate_fp8 import BACKENDS  # noqa: PLC0415
    from ditkern.patch.common import norm_width  # noqa: PLC0415

    device, dtype = device_dtype(module)
    x = torch.empty(1, 1, norm_width(module.norm) or 64, device=device, dtype=dtype)
    return choose("adaln_modulate_fp8", BACKENDS, x, backend=cfg.backend)


def _norm_fp8_rules(family: Family, grid: str, backend: str | None):
    """The family's adaLN norm rules whose output feeds linear layers, each emitting the FP8 form of its output in
    the same kernel (validated like the fused-norm rules: fingerprints, norm kinds)."""
    from ditkern.patch.common import AdaLNNormRule  # noqa: PLC0415

    def mod(norm, x, shift, scale):
        return _modulate_fp8(norm, x, shift, scale, backend, grid)

    def fp8_rule(base: AdaLNNormRule):
        def rule(module, cfg):
            reason = base.check(module)
            if reason:
                return reason
            return Plan("quant_fp8", FUSED_FP8_WHAT, base.build(mod), detail=f"emits {grid} activations",
                        backend=_fp8_norm_backend(module, cfg))  # fmt: skip

        return rule

    return {
        cls: fp8_rule(rule)
        for cls, rule in family.rules.items()
        if isinstance(rule, AdaLNNormRule) and rule.feeds_linears
    }


def _rules(family, model, config):
    if config.quant is None:
        return None
    qc = as_quant_config(config.quant)
    plans = plan_model(model, qc, config.backend, family)
    own = {id(m) for m in model.modules()}

    def linear_rule(module, cfg):
        plan = plans.get(id(module))
        if not isinstance(plan, Plan):
            return plan
        # each quantized layer also (re)installs the transformer's own fuse_lora / unfuse_lora (ditkern.quant.lora),
        # and the first one undone removes them (unpatch undoes them all); a deep copy's layers leave the original's
        # alone (on the copy, once unpatched, they hand over to diffusers' own)
        def undo(m):
            plan.undo(m)
            if id(m) in own:
                lora.remove_fuse_methods(model)

        return dataclasses.replace(plan, apply=lambda m: (plan.apply(m), lora.install_fuse_methods(model)), undo=undo)

    rules = {"Linear": linear_rule}
    p = next(model.parameters(), None)
    if qc.act_grid is not None and qc.fuse_adaln and p is not None and _fp8_reason(p.device) is None:
        rules.update(_norm_fp8_rules(family, qc.act_grid, config.backend))
    return rules


QUANT = register_feature(Feature("quant", _rules))


def quantized_layers(model: nn.Module) -> dict[str, QuantizedWeight]:
    """{module path: QuantizedWeight} of a patched model's quantized linear layers."""
    return {
        p: m.__dict__["_ditkern_quant"]["qweight"] for p, m in model.named_modules() if "_ditkern_quant" in m.__dict__
    }


def bit_counts(model: nn.Module, family: Family | None = None) -> dict[str, float | None]:
    """Weight bits per weight of a (patched) transformer's linear layers, scales and smoothing factors included:

    ``quantized``: over the quantized layers only; ``blocks``: over every linear weight of the family's block stack,
    the layers left in high precision counted at their real bits (their dtype: 32 in an fp32 model);
    ``blocks_bf16``: the same with those layers counted at 16 bits (the model in bf16); ``all``: over every linear
    weight of the transformer, real bits; ``blocks_kept``: the fraction of the block stack's linear weights left in
    high precision. None where there is nothing to count."""
    family = family if family is not None else family_of(model)
    lists = set(family.stack.lists) if family is not None and isinstance(family.stack, Stack) else set()
    acc = {k: [0, 0] for k in ("quantized", "blocks", "blocks_bf16", "all", "blocks_kept")}  # [bits, weights]
    for path, m in model.named_modules():
        if type(m).__name__ != "Linear":
            continue
        st = m.__dict__.get("_ditkern_quant")
        w = m.weight
        n = w.numel() if st is None else st["qweight"].shape[0] * st["qweight"].shape[1]
        bits = 8 * (st["qweight"].nbytes if st is not None else n * w.element_size())
        in_blocks = path.split(".")[0] in lists
        for k, b, on in [("quantized", bits, st is not None), ("all", bits, True), ("blocks", bits, in_blocks),
                         ("blocks_bf16", bits if st is not None else 16 * n, in_blocks),
                         ("blocks_kept", 0 if st is not None else n, in_blocks)]:  # fmt: skip
            if on:
                acc[k][0] += b
                acc[k][1] += n
    return {k: (b / n if n else None) for k, (b, n) in acc.items()}


def weight_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of linear-layer weights now (packed + scales for quantized layers) and before quantization."""
    now = before = 0
    for _, m in model.named_modules():
        if type(m).__name__ != "Linear":
            continue
        st = m.__dict__.get("_ditkern_quant")
        if st is not None:
            now += st["qweight"].nbytes
            before += st["param"].numel() * st["param"].element_size()
        elif isinstance(m._parameters.get("weight"), torch.Tensor):
            n = m.weight.numel() * m.weight.element_size()
            now += n
            before += n
    return {"quantized_bytes": now, "original_bytes": before}
