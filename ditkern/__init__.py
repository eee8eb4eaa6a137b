"""ditkern: fused Triton and CUDA kernels for Diffusion Transformer inference, applied with ``ditkern.patch(model)``."""

__version__ = "0.1.0"
