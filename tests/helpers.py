"""Helpers for the parity tests: the bounds and the error measure live in the package
(``incrementer_fast.testing``), shared with the shipped ``incrementer-fast check``; ``ZeroFills`` sees the
zero tensors autograd makes; ``fewer_examples_interpreted`` caps the heaviest properties under the
interpreter."""
from hypothesis import settings
from torch.utils._python_dispatch import TorchDispatchMode

from incrementer_fast._dispatch import INTERPRET
from incrementer_fast.testing import REL_ERR_BOUND, assert_close_rel, rel_err

__all__ = ["REL_ERR_BOUND", "ZeroFills", "assert_close_rel", "fewer_examples_interpreted", "rel_err"]


def fewer_examples_interpreted(parent: settings | None = None) -> settings:
    """``parent`` (default: the loaded profile) drawing at most 6 examples under ``TRITON_INTERPRET=1``.

    There every example runs the kernels as Python, program by program (the GPU plans launch many small
    ones): the heaviest parity properties draw at most 6 examples there, their explicit examples always
    included; on CUDA and on the reference path they draw the profile's count."""
    parent = parent or settings()
    return settings(parent, max_examples=min(6, parent.max_examples)) if INTERPRET else parent


class ZeroFills(TorchDispatchMode):
    """Records the zero-filling aten ops (``zeros``, ``new_zeros``, ``zeros_like``, ``fill_``) dispatched while
    active, in ``self.ops``: the zero gradients autograd materialises for outputs without a gradient are such
    ops, one launch each on a GPU."""

    PREFIXES = ("aten.zeros", "aten.new_zeros", "aten.fill")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith(self.PREFIXES):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))
