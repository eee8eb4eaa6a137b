"""The body of each rank of the context-parallel tests: every scenario runs here, once, in one spawned pool.

Spawning two ranks costs ~15 s on two cores (each imports torch + diffusers), so tests/parallel spawns once per
session (``conftest.py``) and this worker runs every scenario in order, each rank saving what it saw to
``<out>/rank<r>.pt``; the tests then judge those results. A scenario that raises records its traceback instead of
its results, so one failure shows in its own test and the others still run. The single-process references are
computed in the same worker, before or without ``enable_parallelism``, on fresh models built from the same seed.

CPU shim: diffusers 0.42.1 ``ModelMixin._resolve_parallel_config`` picks the device as
``rank % torch.accelerator.device_count()``, which is ``rank % 0`` (ZeroDivisionError) on a CPU-only torch; during
``enable_parallelism`` only, the count reads 1 (the device becomes ``cpu:0``, which every CPU rank is).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import traceback

import torch

STEPS = [999.0, 950.0, 820.0, 700.0, 560.0, 430.0, 300.0, 180.0, 60.0]
WAN_GATE = 0.15  # the tiny Wan's first-block errors run 0.08-0.21 over the steps: some forecast, some not
GATE = 0.6  # between rank 0's and rank 1's local errors at the perturbed step (measured: 0.43 and 0.99)


# ----------------------------------------------------------------------------------------------------------------------
# models and runs
# ----------------------------------------------------------------------------------------------------------------------
def tiny_flux(batch: int = 1, seed: int = 0):
    """tests.patch.tiny.flux with an even text length (diffusers' EquipartitionSharder splits text and image tokens
    each into equal parts: 36 image + 6 text tokens over 2 ranks)."""
    from tests.patch import tiny

    torch.manual_seed(seed)
    model, inputs = tiny.flux(batch=batch)
    g = torch.Generator().manual_seed(seed + 1)
    inputs["encoder_hidden_states"] = torch.randn(batch, 6, 24, generator=g)
    inputs["txt_ids"] = torch.zeros(6, 3)
    return model.eval(), inputs


def tiny_wan(seed: int = 0):
    """tests.patch.tiny.wan, batch 1: 24 image tokens (Wan's _cp_plan splits them at blocks.0; the text stays whole)."""
    from tests.patch import tiny

    torch.manual_seed(seed)
    model, inputs = tiny.wan(batch=1)
    return model.eval(), inputs


@contextlib.contextmanager
def _cpu_device_count():
    if torch.accelerator.device_count() > 0:
        yield
        return
    saved = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = saved


def enable_cp(model, kind: str):
    from diffusers import ContextParallelConfig

    with _cpu_device_count():
        model.enable_parallelism(config=ContextParallelConfig(**{f"{kind}_degree": 2}))
    return model


def run(model, inputs, steps=STEPS, perturb=None, log=None, t_scale=1e-3):
    """A stand-in sampler (the latent drifts smoothly), as in tests/cache. Returns each step's output and whether the
    cache forecast that step (``forecast_calls`` grew; None without the cache). ``log`` (a dict) receives both as they
    are made, so a run that fails part way still shows the decisions up to and including the failing step."""
    from ditkern.cache import stats

    log = {} if log is None else log
    outs, forecast = log.setdefault("outs", []), log.setdefault("forecast", [])
    inputs = dict(inputs)
    x = inputs["hidden_states"].clone()
    for i, t in enumerate(steps):
        inputs["hidden_states"] = x if perturb is None else perturb(i, x)
        inputs["timestep"] = torch.full((x.shape[0],), t * t_scale, dtype=x.dtype)
        before = _forecast_calls(model, stats)
        try:
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
        finally:
            forecast.append(None if before is None else _forecast_calls(model, stats) - before)
        outs.append(out.clone())
        if out.shape != x.shape:  # an output that lost diffusers' gather (the rank's shard): the caller sees it
            break
        x = x * 0.95 + 0.05 * torch.tanh(out[..., : x.shape[-1]])
    return outs, forecast


def _forecast_calls(model, stats):
    try:
        return stats(model)["forecast_calls"]
    except ValueError:  # "this model has no ditkern cache"
        return None


def perturb_second_half(step: int, amount: float = 3.0, seed: int = 7):
    """From ``step`` on, the image tokens of the second half of the sequence (rank 1's shard: EquipartitionSharder
    gives rank r the r-th contiguous chunk) get a fixed random offset, so that rank 1's first-block residual departs
    from its forecast while rank 0's barely moves."""

    def f(i, x):
        if i < step:
            return x
        g = torch.Generator().manual_seed(seed)
        y = x.clone()
        n = x.shape[1] // 2
        y[:, n:] += amount * torch.randn(y[:, n:].shape, generator=g, dtype=x.dtype)
        return y

    return f


class Recorder:
    """Wraps gate_all_reduce where the cache calls it: records (local sums, reduced sums) of every gate decision."""

    def __init__(self, reduce):
        self.reduce = reduce
        self.calls = []

    def __call__(self, model, sums):
        out = self.reduce(model, sums)
        self.calls.append((sums.clone(), out.clone()))
        return out


@contextlib.contextmanager
def gate_reduce(fn):
    """Routes the cache's gate reduction through ``fn`` (feature.py imports the name, so both modules are patched)."""
    import ditkern.cache.distributed as dist_mod
    import ditkern.cache.feature as feat_mod

    saved = dist_mod.gate_all_reduce, getattr(feat_mod, "gate_all_reduce", None)
    dist_mod.gate_all_reduce = fn
    if saved[1] is not None:
        feat_mod.gate_all_reduce = fn
    try:
        yield fn
    finally:
        dist_mod.gate_all_reduce = saved[0]
        if saved[1] is not None:
            feat_mod.gate_all_reduce = saved[1]


# ----------------------------------------------------------------------------------------------------------------------
# scenarios: each returns a dict of picklable results
# ----------------------------------------------------------------------------------------------------------------------
def lossless(kind):
    import ditkern

    model64, inputs = tiny_flux(batch=2)
    ref = run(model64.double(), {k: v.double() for k, v in inputs.items()}, STEPS[:3])[0]
    model, inputs = tiny_flux(batch=2)
    enable_cp(model, kind)
    plain = run(model, inputs, STEPS[:3])[0]
    report = ditkern.patch(model, backend="torch")
    patched = run(model, inputs, STEPS[:3])[0]
    ditkern.unpatch(model)
    unpatched = run(model, inputs, STEPS[:3])[0]
    # the other order: ditkern first, then diffusers' context parallelism
    model2, inputs = tiny_flux(batch=2)
    ditkern.patch(model2, backend="torch")
    enable_cp(model2, kind)
    patched_first = run(model2, inputs, STEPS[:3])[0]
    return dict(ref=ref, plain=plain, patched=patched, unpatched=unpatched, patched_first=patched_first,
                n_patched=len(report.patched), report=str(report))  # fmt: skip


def hook_chains(model):
    """{module path: its diffusers hook names, innermost first} for every module that has hooks."""
    return {p: list(m._diffusers_hook._hook_order) for p, m in model.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook._hook_order}  # fmt: skip


def cache(kind):
    import ditkern

    cfg = ditkern.TaylorCache(order=1, gate=GATE, warmup=1)
    single, inputs = tiny_flux()
    ditkern.patch(single, cache=cfg, backend="torch")
    ref, ref_fc = run(single, inputs)
    model, inputs = tiny_flux()
    enable_cp(model, kind)
    ditkern.patch(model, cache=cfg, backend="torch")
    with gate_reduce(Recorder(_real_reduce())) as rec:
        out, fc = run(model, inputs)
    return dict(ref=ref, ref_forecast=ref_fc, out=out, forecast=fc, sums=rec.calls)


def gate(kind, reduce=None, at=3):
    """The gate-consistency scenario: from step ``at`` rank 1's tokens are perturbed (see perturb_second_half)."""
    import ditkern

    cfg = ditkern.TaylorCache(order=1, gate=GATE, warmup=1)
    perturb = perturb_second_half(at)
    single, inputs = tiny_flux()
    ditkern.patch(single, cache=cfg, backend="torch")
    ref, ref_fc = run(single, inputs, perturb=perturb)
    model, inputs = tiny_flux()
    enable_cp(model, kind)
    ditkern.patch(model, cache=cfg, backend="torch")
    rec = Recorder(reduce or _real_reduce())
    log, error = {}, None
    with gate_reduce(rec):
        try:
            run(model, inputs, perturb=perturb, log=log)
        except Exception as e:  # noqa: BLE001 - without the reduce the ranks' collectives stop matching
            error = f"{type(e).__name__}: {e}"
    return dict(ref=ref, ref_forecast=ref_fc, out=log["outs"], forecast=log["forecast"], sums=rec.calls, error=error)


def wan(kind):
    """Wan under Ulysses. Its _cp_plan splits the image tokens in a hook on ``blocks.0``, a block ditkern replaces
    the forward of (and the cache wraps): ditkern.patch before enable_parallelism and after it (ditkern's hooks go
    under diffusers' split hook either way)."""
    import ditkern

    t = dict(t_scale=1.0)
    model64, inputs = tiny_wan()
    ref = run(model64.double(), {k: v.double() for k, v in inputs.items()}, STEPS[:3], **t)[0]
    model, inputs = tiny_wan()
    enable_cp(model, kind)
    plain = run(model, inputs, STEPS[:3], **t)[0]
    ditkern.patch(model, backend="torch")
    patched_after = run(model, inputs, STEPS[:3], **t)[0]
    model, inputs = tiny_wan()
    ditkern.patch(model, backend="torch")
    enable_cp(model, kind)
    patched = run(model, inputs, STEPS[:3], **t)[0]
    cfg = ditkern.TaylorCache(order=1, gate=WAN_GATE, warmup=1)
    single, inputs = tiny_wan()
    ditkern.patch(single, cache=cfg, backend="torch")
    cache_ref, cache_ref_forecast = run(single, inputs, **t)
    model, inputs = tiny_wan()
    ditkern.patch(model, cache=cfg, backend="torch")
    enable_cp(model, kind)
    with gate_reduce(Recorder(_real_reduce())) as rec:
        cache_out, cache_forecast = run(model, inputs, **t)
    model, inputs = tiny_wan()
    enable_cp(model, kind)
    ditkern.patch(model, cache=cfg, backend="torch")
    cache_after_out, cache_after_forecast = run(model, inputs, **t)
    return dict(ref=ref, plain=plain, patched=patched, patched_after=patched_after, cache_ref=cache_ref,
                cache_ref_forecast=cache_ref_forecast, cache_out=cache_out, cache_forecast=cache_forecast,
                sums=rec.calls, cache_after_out=cache_after_out, cache_after_forecast=cache_after_forecast)  # fmt: skip


def quant(kind, skip=None):
    """int4 weights (group 32) under CP against the same quantization on one process, patched after
    enable_parallelism and before it. ``skip=None``: ditkern's default skip list (the final projection stays dense);
    ``[]``: every linear, ``proj_out`` (which carries diffusers' gather hook) included."""
    import ditkern

    cfg = ditkern.QuantConfig(format="int4", group_size=32, skip=skip)
    single, inputs = tiny_flux(batch=2)
    dense = run(single, inputs, STEPS[:2])[0]
    ditkern.patch(single, quant=cfg, backend="torch")
    ref = run(single, inputs, STEPS[:2])[0]
    model, inputs = tiny_flux(batch=2)
    enable_cp(model, kind)
    ditkern.patch(model, quant=cfg, backend="torch")
    after, chains_after = run(model, inputs, STEPS[:2])[0], hook_chains(model)
    model, inputs = tiny_flux(batch=2)
    ditkern.patch(model, quant=cfg, backend="torch")
    enable_cp(model, kind)
    before = run(model, inputs, STEPS[:2])[0]
    return dict(dense=dense, ref=ref, after=after, before=before, chains_after=chains_after,
                chains_before=hook_chains(model))  # fmt: skip


def window(kind):
    import ditkern

    cfg = ditkern.WindowAttention(window=3)
    model, inputs = tiny_flux()
    enable_cp(model, kind)
    report = ditkern.patch(model, attention=cfg, backend="torch")
    skipped = [(r.module, r.reason) for r in report.skipped]
    out_after = run(model, inputs, STEPS[:1])[0]
    # the other order: windowed first, then context parallelism; the processors see it at call time
    model2, inputs = tiny_flux()
    ditkern.patch(model2, attention=cfg, backend="torch")
    enable_cp(model2, kind)
    error = None
    try:
        run(model2, inputs, STEPS[:1])
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    plain, inputs = tiny_flux()
    enable_cp(plain, kind)
    dense = run(plain, inputs, STEPS[:1])[0]
    return dict(skipped=skipped, out_after=out_after, dense=dense, error=error, report=str(report))


def pipeline(kind):
    """digits-flux (2 + 4 FLUX blocks, 64 image + 4 text tokens), 4 steps with CFG: CP with and without ditkern."""
    import ditkern
    import ditkern.zoo as zoo

    pipe = zoo.load("digits-flux")
    single = zoo.generate(pipe, classes=[3, 8], seeds=[0, 1], num_inference_steps=4)
    enable_cp(pipe.transformer, kind)
    plain = zoo.generate(pipe, classes=[3, 8], seeds=[0, 1], num_inference_steps=4)
    ditkern.patch(pipe, backend="torch")
    patched = zoo.generate(pipe, classes=[3, 8], seeds=[0, 1], num_inference_steps=4)
    return dict(single=single, plain=plain, patched=patched)


@contextlib.contextmanager
def _tp_on_cpu():
    """diffusers 0.42.1 ``apply_tensor_parallel`` refuses a mesh whose device type is not in
    ``_SUPPORTED_TP_DEVICES`` (cuda, neuron, tpu, xpu); the rest of its path (``parallelize_module``, DTensor weights,
    the collectives over gloo) runs on CPU. The one fake: "cpu" in that list, during ``enable_parallelism`` only."""
    import diffusers.hooks.tensor_parallel as tp

    saved = tp._SUPPORTED_TP_DEVICES
    tp._SUPPORTED_TP_DEVICES = (*saved, "cpu")
    try:
        with _cpu_device_count():
            yield
    finally:
        tp._SUPPORTED_TP_DEVICES = saved


def enable_tp(model, fake_cpu=True):
    from diffusers import TensorParallelConfig

    with _tp_on_cpu() if fake_cpu else _cpu_device_count():
        model.enable_parallelism(config=TensorParallelConfig(tp_degree=2))
    return model


def tensor_parallel(kind):
    """diffusers' TensorParallelConfig(tp_degree=2) on the tiny FLUX (its _tp_plan shards the blocks' attention and
    MLP linears): refused as diffusers ships it; then, with the CPU device allowed (``_tp_on_cpu``), TP itself, the
    lossless patch under it, quant refused at patch time, quant of the linears the plan leaves whole, the gated
    cache and window attention."""
    import ditkern
    from ditkern.patch.parallel import tp_sharded_linears
    from ditkern.quant.feature import default_skip

    model64, inputs = tiny_flux(batch=2)
    ref = run(model64.double(), {k: v.double() for k, v in inputs.items()}, STEPS[:2])[0]
    result = {"ref": ref}
    try:
        enable_tp(tiny_flux(batch=2)[0], fake_cpu=False)
    except Exception as e:  # noqa: BLE001
        result["tp_error"] = f"{type(e).__name__}: {e}"
    model, inputs = tiny_flux(batch=2)
    enable_tp(model)
    result["sharded"] = tp_sharded_linears(model)
    result["plain"] = run(model, inputs, STEPS[:2])[0]
    report = ditkern.patch(model, backend="torch")
    result["n_patched"] = len(report.patched)
    result["patched"] = run(model, inputs, STEPS[:2])[0]
    try:
        ditkern.patch(model, quant=ditkern.QuantConfig(format="int4", group_size=32), backend="torch")
    except ValueError as e:
        result["quant_error"] = str(e)
    result["patched_after_refusal"] = ditkern.is_patched(model)
    skip = [*default_skip(model), *type(model)._tp_plan]
    cfg = ditkern.QuantConfig(format="int4", group_size=32, skip=skip)
    report = ditkern.patch(model, quant=cfg, backend="torch")
    result["n_quantized"] = sum(r.what.startswith("quantized linear") for r in report.patched)
    result["quant"] = run(model, inputs, STEPS[:2])[0]
    single, inputs = tiny_flux(batch=2)
    ditkern.patch(single, quant=cfg, backend="torch")
    result["quant_ref"] = run(single, inputs, STEPS[:2])[0]
    model, inputs = tiny_flux(batch=2)
    ditkern.patch(model, backend="torch")
    enable_tp(model)
    result["patched_first"] = run(model, inputs, STEPS[:2])[0]
    for name, opts in (("cache", dict(cache=ditkern.TaylorCache(order=1, gate=GATE, warmup=1))),
                       ("window", dict(attention=ditkern.WindowAttention(window=3)))):  # fmt: skip
        single, inputs = tiny_flux()
        ditkern.patch(single, backend="torch", **opts)
        result[f"{name}_ref"] = run(single, inputs)
        model, inputs = tiny_flux()
        enable_tp(model)
        ditkern.patch(model, backend="torch", **opts)
        result[name] = run(model, inputs)
    # the other order: quantized first, then sharded (diffusers shards what is left of the planned linears' parameters)
    model, inputs = tiny_flux(batch=2)
    ditkern.patch(model, quant=ditkern.QuantConfig(format="int4", group_size=32), backend="torch")
    try:
        enable_tp(model)
        result["quant_first"] = run(model, inputs, STEPS[:1])[0]
    except Exception as e:  # noqa: BLE001
        result["quant_first_error"] = f"{type(e).__name__}: {e}"
    return result


def _real_reduce():
    from ditkern.cache.distributed import gate_all_reduce

    return gate_all_reduce


def _identity(model, sums):
    return sums


# ----------------------------------------------------------------------------------------------------------------------
# the rank's main
# ----------------------------------------------------------------------------------------------------------------------
SCENARIOS = [(f"{fn.__name__}_ulysses", fn, ("ulysses",)) for fn in (lossless, cache, gate, quant, window, wan, pipeline)]
SCENARIOS += [("quant_all_ulysses", lambda kind: quant(kind, skip=[]), ("ulysses",))]
# ring attention: diffusers' only CPU backend (native SDPA) cannot return the LSE that ring attention merges with
SCENARIOS += [("lossless_ring", lossless, ("ring",)), ("tensor_parallel", tensor_parallel, ("tp",))]
# last: without the reduce the ranks' collectives stop matching, which breaks the process group
SCENARIOS += [("gate_identity_ulysses", lambda kind: gate(kind, reduce=_identity), ("ulysses",))]


def main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a hang (mismatched collectives) fails in a minute instead of gloo's default 30
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    for name, fn, args in SCENARIOS:
        if name.startswith("gate_identity"):
            # the divergence is expected here: let the mismatched collective fail in seconds
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(datetime.timedelta(seconds=3))
        else:
            dist.barrier()
        try:
            results[name] = fn(*args)
        except Exception:  # noqa: BLE001 - recorded, judged by the scenario's own test
            results[name] = {"traceback": traceback.format_exc()}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
