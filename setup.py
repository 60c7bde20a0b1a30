"""Install clora_fast.

The package is pure Python + Triton; ``kernels/`` is installed as
``clora_fast.kernels``.  Install torch first, then
``pip install --no-build-isolation -e ".[test]"`` (see README).
"""
from setuptools import setup

setup(
    name="clora_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for C-LoRA continual customization",
    packages=["clora_fast", "clora_fast.integrations", "clora_fast.kernels"],
    package_dir={"clora_fast": "clora_fast", "clora_fast.kernels": "kernels"},
    package_data={"clora_fast": ["configs/*.json", "configs/*/*.json", "assets/*"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "safetensors>=0.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "peft>=0.13",
            "diffusers>=0.30",
            "transformers>=4.45",
            "timm>=1.0",
            "accelerate>=0.30",
            "scikit-learn>=1.3",
            "matplotlib>=3.7",
        ],
    },
    entry_points={"console_scripts": ["clora-fast=clora_fast.cli:main"]},
)
