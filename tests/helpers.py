"""Helpers for the parity tests: the bounds and the error measure live in the package
(``incrementer_fast.testing``), shared with the shipped ``incrementer-fast check``; ``ZeroFills`` sees the
zero tensors autograd makes."""
from torch.utils._python_dispatch import TorchDispatchMode

from incrementer_fast.testing import REL_ERR_BOUND, assert_close_rel, rel_err

__all__ = ["REL_ERR_BOUND", "ZeroFills", "assert_close_rel", "rel_err"]


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
