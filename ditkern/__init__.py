"""ditkern: fused Triton and CUDA kernels for Diffusion Transformer inference, applied with ``ditkern.patch(model)``.

Public API::

    report = ditkern.patch(pipe)          # or ditkern.patch(pipe.transformer); prints as a table
    ditkern.unpatch(pipe)                 # bit-identical outputs again
    with ditkern.patched(pipe): ...
    ditkern.info()                        # versions, GPU, which backend runs each op and why the others cannot

Importing ditkern never initialises CUDA, compiles anything, or touches the network.
"""

from ditkern.attention import WindowAttention
from ditkern.cache import TaylorCache
from ditkern.config import PatchConfig
from ditkern.info import info
from ditkern.moe import MoEConfig, densify_to_moe
from ditkern.nn import SparseMoE
from ditkern.patch import PatchReport, is_patched, patch, patched, supported_models, unpatch
from ditkern.quant import QuantConfig, load_quantized, save_quantized

from ditkern._version import __version__

__all__ = ["TaylorCache", "patch", "unpatch", "patched", "is_patched", "PatchConfig", "PatchReport", "info", "supported_models",
           "WindowAttention", "SparseMoE", "MoEConfig", "densify_to_moe"]
__all__ += ["QuantConfig", "save_quantized", "load_quantized"]

# Subpackages reached as attributes after ``import ditkern`` (``ditkern.zoo.load("digits-flux")``), imported on first
# use: ``ditkern.zoo`` loads diffusers pipelines and its harness pulls in scikit-learn and matplotlib when asked.
_SUBMODULES = ("ops", "zoo")


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib  # noqa: PLC0415

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
