"""clora_fast: fused kernels for C-LoRA continual customization."""
__version__ = "0.1.0"
