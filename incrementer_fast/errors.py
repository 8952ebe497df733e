"""The package's error types: what went wrong, in one line that names the cause and says what to do.

The ``incrementer-fast`` command turns every exception into one line on stderr (``incrementer_fast.cli``);
these types decide its exit status:

* ``InputError`` (a ``ValueError``): something given — an option, a file, a folder — cannot be used as it
  is; found before any work starts, so nothing was written. Exit status 2.
* ``CheckpointError`` (an ``InputError``): a checkpoint that cannot be read (truncated, empty, another
  format) or that does not fit what it is loaded for; the message names the file (and the fields).
* ``WorkError`` (a ``RuntimeError``): the work itself failed (a non-finite loss, a write the OS refused);
  what was finished before is kept. Exit status 1.
"""
from __future__ import annotations

__all__ = ["CheckpointError", "InputError", "WorkError"]


class InputError(ValueError):
    """An option, file or folder that cannot be used as given, found before any work started."""


class CheckpointError(InputError):
    """A checkpoint that cannot be read, or does not fit what it is loaded for; the message names the file."""


class WorkError(RuntimeError):
    """The work failed part-way (what was finished before is kept); the message says where and what to do."""
