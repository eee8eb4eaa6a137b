"""The ``moe`` feature: every mixture-of-experts layer a family declares (``Family.moe``) runs on ``SparseMoE``.

On by default, because it computes the same function (fp32 arithmetic, same routing); ``moe=`` carries its options
(``MoEConfig``, or False to keep the layers as they are). The family says which layer classes are MoE layers and how
each becomes a ``SparseMoE`` (``MoELayer.build``, with its own structure and source checks); this module does the
rest for all of them: the swap at patch time, the training fallback, the device check, the report row.

In auto mode (no ``backend`` asked for, no ``DITKERN_BACKEND``), where no fused MoE backend (cuda, triton) can run on
the layer's device and dtype, the layer keeps its own forward (report: :data:`~ditkern.patch.report.NATIVE_REASON`):
the ops would land on their fp32 torch references, slower than the layer's native ops. Measured with the previous
default (SparseMoE / ExpertChoiceMoE on the references, adaLN native), whole-model forwards, unpatched / patched
CPU seconds, one thread on 2 shared cores, median of 7 in-process pairs in alternating order: NucleusMoE 0.75x fp32
/ 0.88x bf16 on the tests' tiny model, 0.97x / 0.78x at width 512 (8 experts, 256 tokens); HiDream 0.77x / 0.92x
tiny, 0.99x / 0.66x at width 512 (4 experts top-2, 256 tokens). ``python -m bench.cpu_lossless --ab --pipeline
tiny-nucleusmoe`` (or ``tiny-hidream``; ``--wide``, ``--dtype bfloat16``) times the default against unpatched.
``backend="torch"`` still installs ``SparseMoE`` on the references.
"""

from __future__ import annotations

import torch

from ditkern._backend import choose
from ditkern.moe.config import resolve
from ditkern.ops.moe import BACKENDS
from ditkern.patch.engine import Feature, Plan, device_dtype, register_feature
from ditkern.patch.family import MoELayer
from ditkern.patch.report import native_fallback

WHAT = "MoE dispatch fused: route + align + grouped SwiGLU + combine, no host sync (SparseMoE)"
ATTR = "_ditkern_sparse_moe"  # in the layer's __dict__, not a submodule: the model's state_dict is unchanged


def _layer_rule(decl: MoELayer, block_m: int):
    def rule(m, cfg):
        device, dtype = device_dtype(m)
        sample = torch.empty(1, 1, device=device, dtype=dtype)  # the backends check device and dtype only
        native = native_fallback("moe_grouped_swiglu", BACKENDS, sample, cfg.backend)
        if native is not None:
            return native  # before build: no stacking
        sparse = decl.build(m, block_m, cfg.backend)
        if isinstance(sparse, str):
            return sparse
        backend = choose("moe_grouped_swiglu", BACKENDS, torch.empty(1, sparse.dim, device=device, dtype=dtype),
                         backend=cfg.backend)  # fmt: skip
        mib = sparse.stacked_bytes() / 2**20
        original = type(m).forward
        tie = getattr(sparse, "tie_sources", None)  # SparseMoE: the layer's experts become views of the stack
        untie = getattr(sparse, "untie_sources", None)

        def apply(module):
            module.__dict__[ATTR] = sparse
            if tie is not None:
                tie()

        def undo(module):
            if untie is not None:
                untie()  # independent storage again, same values: unpatched outputs are bit-identical
            module.__dict__.pop(ATTR, None)

        def forward(module, x, *args, **kwargs):  # extra inputs (e.g. Nucleus' router input, temb) pass through
            if decl.original(module):
                return original(module, x, *args, **kwargs)
            moe = module.__dict__[ATTR]
            if moe.w1.device != x.device or moe.w1.dtype != x.dtype:
                raise RuntimeError(
                    f"ditkern: the experts of this MoE layer were stacked on {moe.w1.device} in {moe.w1.dtype} at "
                    f"patch time but the input is {x.device} {x.dtype}; patch after moving / casting the model"
                )
            return moe(x, *args, **kwargs)

        if hasattr(sparse, "report_detail"):  # e.g. ExpertChoiceMoE: no top_k
            detail = sparse.report_detail()
        else:
            held = "experts stacked in place (the layer's weights are views)" if tie is not None else "stacked copy"
            detail = f"{sparse.num_experts} experts top-{sparse.top_k}, {held}: {mib:.2f} MiB"
        return Plan("moe", WHAT, forward, apply, undo, detail=detail, backend=backend)

    return rule


def _rules(family, model, config):
    opts = resolve(config.moe)  # a bad value raises here, naming the option
    if not opts.enabled or not family.moe:
        return None
    return {cls: _layer_rule(decl, opts.block_m) for cls, decl in family.moe.items()}


MOE = register_feature(Feature(name="moe", rules=_rules))
