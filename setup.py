"""incrementer_fast: a kernel-backed training backend for Incrementer (class-incremental segmentation).

Tested with (the CI stack, CPU): Python 3.11, torch 2.14.1, torchvision 0.29.1, triton 3.8.0, timm 1.0.31;
the Triton kernels also compile for sm_90 on that stack (tests/test_cuda_codegen.py). xformers and
tensorboard are optional: ``pip install incrementer_fast[xformers,tensorboard]``.
"""
from setuptools import find_packages, setup

setup(
    name="incrementer_fast",
    version="0.1.0",
    description="Fused Triton kernels, model and continual-learning pipeline for Incrementer (CVPR 2023)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
    # `kernels/` is a top-level folder of the repository but is installed as `incrementer_fast.kernels`:
    # a top-level import named `kernels` would clash with an unrelated PyPI package.
    packages=find_packages(include=["incrementer_fast", "incrementer_fast.*"]) + ["incrementer_fast.kernels"],
    package_dir={"incrementer_fast.kernels": "kernels"},
    # py.typed: the package is typed; the demo's pretrained encoder (scripts/pretrain_demo_encoder.py) and
    # its provenance.
    package_data={"incrementer_fast": ["py.typed", "assets/*.safetensors", "assets/*.json"]},
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "triton",
        "timm>=1.0",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",
        "safetensors",
        "pyyaml",
    ],
    extras_require={
        # xformers: memory-efficient attention for CUDA half precision (SDPA is used without it).
        "xformers": ["xformers"],
        # tensorboard: the --tensorboard scalars of a run.
        "tensorboard": ["tensorboard"],
        # wheel: tests/test_packaging.py builds a wheel without build isolation; pytest-xdist: two workers
        # for the reference pass; coverage: the kernel line coverage of the H100-plan pass (tests/run.sh).
        "test": ["pytest", "hypothesis", "pytest-benchmark", "tensorboard", "wheel", "pytest-xdist", "coverage"],
    },
    entry_points={"console_scripts": ["incrementer-fast=incrementer_fast.cli:main"]},
)
