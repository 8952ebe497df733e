"""incrementer_fast: a kernel-backed training backend for Incrementer (class-incremental segmentation)."""
from setuptools import find_packages, setup

setup(
    name="incrementer_fast",
    version="0.1.0",
    description="Fused Triton kernels, model and continual-learning pipeline for Incrementer (CVPR 2023)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` is a top-level folder of the repository but is installed as `incrementer_fast.kernels`:
    # a top-level import named `kernels` would clash with an unrelated PyPI package.
    packages=find_packages(include=["incrementer_fast", "incrementer_fast.*"]) + ["incrementer_fast.kernels"],
    package_dir={"incrementer_fast.kernels": "kernels"},
    # The demo's pretrained encoder (scripts/pretrain_demo_encoder.py) and its provenance.
    package_data={"incrementer_fast": ["assets/*.safetensors", "assets/*.json"]},
    install_requires=[
        "torch>=2.6",
        "triton",
        "timm>=1.0",
        "xformers",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",
        "safetensors",
        "pyyaml",
    ],
    extras_require={
        "tensorboard": ["tensorboard"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "tensorboard"],
    },
    entry_points={"console_scripts": ["incrementer-fast=incrementer_fast.cli:main"]},
)
