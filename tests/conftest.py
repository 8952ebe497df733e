"""Shared test configuration: hypothesis profiles and the relative-norm error used by parity tests.

Profiles: `ci` (default; derandomised, few examples, so the suite is reproducible and fits the 8-minute
budget on 2 cores), `light` (2 examples: tests/run.sh's interpreter-plan pass), `gpu` (3 examples:
benchmarks/gpu_check.sh's CUDA stage) and `thorough` (random, many examples) for local runs:
    HYPOTHESIS_PROFILE=thorough pytest tests
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings


def _register_profile(name: str, max_examples: int, derandomize: bool = True) -> None:
    """A hypothesis profile: no deadline (interpreted kernels are slow), the failing blob printed."""
    settings.register_profile(name, max_examples=max_examples, derandomize=derandomize, deadline=None,
                              print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


_register_profile("ci", 12)
_register_profile("thorough", 300, derandomize=False)
# `light`: the interpreter-plan pass of tests/run.sh — the same tests as the H100-plan pass, which draws the
# `ci` examples and records kernel lines; this second plan checks its own tiles and grids on fewer draws
# (the explicit @example cases, which reach the multi-tile edges, always run).
_register_profile("light", 2)
# `gpu`: the light profile of benchmarks/gpu_check.sh — a few derandomised examples, since on a GPU every new
# shape or dtype compiles new kernels (seconds each) and the whole CUDA test stage has ~2 minutes.
_register_profile("gpu", 3)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    from incrementer_fast.testing import speed_up_interpreter

    # Helper calls inside a launch skip Triton's redundant re-patching of triton.language (see there).
    assert speed_up_interpreter(), "Triton's interpreter internals changed: see incrementer_fast.testing"

# No test touches the network: the Hugging Face hub (timm's pretrained weights) is offline for the whole
# suite, set before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"

# Devices the parity tests run on: always the CPU (reference path, or the kernels under the interpreter),
# and CUDA when present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Devices whose tensors take the Triton kernels: CUDA, and the CPU under TRITON_INTERPRET=1. Tests of what
# only the kernel path has (its custom ops, output layouts, launch plans) run on these.
KERNEL_DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny training runs (``pytestmark = pytest.mark.usefixtures
    ("one_thread")``): as fast as several contending threads on a shared 2-core machine, and it keeps float
    results independent of the core count. The previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_addoption(parser):
    parser.addoption("--kernel-lines", metavar="FILE", default=None,
                     help="with TRITON_INTERPRET=1: record which lines of @triton.jit functions ran and write "
                          "them to FILE as coverage.py data (tests/run.sh checks it with tests/kernel_coverage.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "slow: a longer test (training runs, DDP)")
    config.addinivalue_line("markers", "plan_independent: checks what no launch plan changes (torch.compile's "
                            "graph, the dispatch); tests/run.sh runs it under one plan only, the H100's")
    if config.getoption("--kernel-lines"):
        if not INTERPRET:
            raise pytest.UsageError("--kernel-lines records kernel lines run by Triton's interpreter: set "
                                    "TRITON_INTERPRET=1")
        from incrementer_fast.testing import record_kernel_lines

        config._kernel_lines = record_kernel_lines()
        if config._kernel_lines is None:
            raise pytest.UsageError("--kernel-lines: Triton's interpreter internals changed: see "
                                    "incrementer_fast.testing.record_kernel_lines")


def pytest_sessionfinish(session):
    hits = getattr(session.config, "_kernel_lines", None)
    if hits is not None:
        from incrementer_fast.testing import write_kernel_lines

        write_kernel_lines(hits, session.config.getoption("--kernel-lines"))


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=KERNEL_DEVICES or [pytest.param("cpu", marks=pytest.mark.skip(
    reason="the Triton kernels run on CUDA, or on the CPU with TRITON_INTERPRET=1"))])
def kernel_device(request):
    return torch.device(request.param)
