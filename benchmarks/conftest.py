"""pytest-benchmark configuration for ``pytest benchmarks/ --benchmark-only``.

The benchmark modules are named ``bench_*.py`` (so that ``pytest tests`` and the default file pattern never
pick them up); the hook below collects them when pytest is pointed at this folder. Options:

    --bench-device cuda|cpu        default: cuda when present
    --bench-size paper|small|tiny  default: paper on CUDA, small on the CPU (see workloads.cases)
    --bench-dtype fp32,bf16        default: fp32
    --bench-compile-backend NAME   torch.compile backend of the ``compiled`` provider (default inductor)

Each test is one (op case, dtype, provider, mode); ids read e.g.
``test_op[cosine_mask-paper-K151-fp32-fused-forward+backward]``. The ``fused`` provider is skipped on the
CPU (Triton's interpreter is for correctness, not speed).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads as W  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("incrementer_fast benchmarks")
    group.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda when present)")
    group.addoption("--bench-size", default=None, choices=("paper", "small", "tiny"),
                    help="case sizes (default: paper on CUDA, small on the CPU)")
    group.addoption("--bench-dtype", default="fp32", help="comma list of fp32, bf16, fp16")
    group.addoption("--bench-compile-backend", default="inductor", help="backend of the compiled provider")


def pytest_collect_file(file_path: Path, parent):
    # Explicit paths (pytest benchmarks/bench_ops.py) are collected by pytest itself: don't do it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def bench_device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _case_id(case: W.Case) -> str:
    dims = case.d
    k = dims.get("K", dims.get("K_old"))
    return f"{case.op}-{case.size}" + (f"-K{k}" if k is not None else "")


def pytest_generate_tests(metafunc):
    if "bench_params" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = bench_device(config)
    size = config.getoption("--bench-size") or ("paper" if device.type == "cuda" else "small")
    dtypes = [d.strip() for d in config.getoption("--bench-dtype").split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in W.DTYPES]
    if unknown:
        raise pytest.UsageError(f"--bench-dtype: unknown {unknown}; choose from {', '.join(W.DTYPES)}")
    params, ids = [], []
    for case in W.cases(size):
        for dtype in dtypes:
            for provider in W.PROVIDERS:
                for mode in W.OPS[case.op].modes:
                    marks = []
                    if provider == "fused" and device.type == "cpu":
                        marks.append(pytest.mark.skip(reason="fused is not timed on the CPU (Triton's "
                                                             "interpreter is for correctness)"))
                    params.append(pytest.param((case, dtype, provider, mode), marks=marks))
                    ids.append(f"{_case_id(case)}-{dtype}-{provider}-{mode}")
    metafunc.parametrize("bench_params", params, ids=ids)


@pytest.fixture
def device(request) -> torch.device:
    device = bench_device(request.config)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device")
    return device


@pytest.fixture
def compile_backend(request) -> str:
    return request.config.getoption("--bench-compile-backend")
