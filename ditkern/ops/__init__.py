"""ditkern's public ops, each under its own name: ``ditkern.ops.adaln_modulate(x, shift, scale)``.

Every op ``<op>`` lives in ``ditkern/ops/<module>.py`` beside its pure-torch reference ``<op>_ref``. Where the
module and the op share a name (``adaln_modulate``, ``window_attention``, ``fpx_linear`` ...), ``ditkern.ops.<name>``
is the op; the module's other names are reached with ``from ditkern.ops.<module> import ...`` (or
``importlib.import_module("ditkern.ops.<module>")``), which always gives the module.

The imports are eager: they add no measurable time to ``import ditkern`` (torch dominates; the ops import their
Triton kernels only when a Triton backend runs), and binding the names here, before any op module can be imported
from elsewhere, is what keeps ``ditkern.ops.<name>`` the op rather than the module of the same name (Python sets a
package attribute for a submodule only when the submodule is first imported).
"""

from ditkern.ops.adaln_modulate import (
    adaln_modulate,
    adaln_modulate_ref,
    gated_residual_adaln,
    gated_residual_adaln_ref,
)
from ditkern.ops.adaln_modulate_fp8 import adaln_modulate_fp8, adaln_modulate_fp8_ref
from ditkern.ops.fpx_fp8_linear import fpx_fp8_linear, fpx_fp8_linear_ref, fpx_fp8_matmul, fpx_fp8_matmul_ref
from ditkern.ops.fpx_linear import dequantize_ref, fpx_linear, fpx_linear_ref
from ditkern.ops.fpx_quantize import fpx_quantize
from ditkern.ops.linear_attention import linear_attention, linear_attention_ref
from ditkern.ops.moe import (
    moe_align,
    moe_align_ref,
    moe_combine,
    moe_combine_ref,
    moe_grouped_mlp,
    moe_grouped_mlp_ref,
    moe_grouped_swiglu,
    moe_route,
    moe_route_ref,
)
from ditkern.ops.quantize_fp8 import quantize_fp8, quantize_fp8_ref
from ditkern.ops.taylor import taylor_forecast, taylor_forecast_ref, taylor_update, taylor_update_ref
from ditkern.ops.window_attention import window_attention, window_attention_ref, window_mask, window_sparsity

__all__ = [
    "adaln_modulate", "adaln_modulate_ref", "gated_residual_adaln", "gated_residual_adaln_ref",
    "adaln_modulate_fp8", "adaln_modulate_fp8_ref",
    "taylor_update", "taylor_update_ref", "taylor_forecast", "taylor_forecast_ref",
    "window_attention", "window_attention_ref", "window_mask", "window_sparsity",
    "linear_attention", "linear_attention_ref",
    "quantize_fp8", "quantize_fp8_ref",
    "fpx_linear", "fpx_linear_ref", "dequantize_ref",
    "fpx_fp8_matmul", "fpx_fp8_matmul_ref", "fpx_fp8_linear", "fpx_fp8_linear_ref",
    "fpx_quantize",
    "moe_route", "moe_route_ref", "moe_align", "moe_align_ref", "moe_grouped_swiglu",
    "moe_grouped_mlp", "moe_grouped_mlp_ref", "moe_combine", "moe_combine_ref",
]
