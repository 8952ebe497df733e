"""Helpers for the parity tests: the bounds and the error measure live in the package
(``incrementer_fast.testing``), shared with the shipped ``incrementer-fast check``."""
from incrementer_fast.testing import REL_ERR_BOUND, assert_close_rel, rel_err

__all__ = ["REL_ERR_BOUND", "assert_close_rel", "rel_err"]
