"""Triton kernels of incrementer_fast, installed as `incrementer_fast.kernels`.

One op per module: kernels first, then their launchers. Launchers take and return torch tensors; the
registration as custom ops and the autograd wiring live in `incrementer_fast.ops`.
"""

import contextlib

import torch


def device_guard(device: torch.device):
    """Make ``device`` current for a launch. Triton launches on torch's *current* CUDA device and its current
    stream, not on the device of the tensors it is given: without this, tensors on cuda:1 launched while
    cuda:0 is current run on the wrong GPU (illegal address). A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
