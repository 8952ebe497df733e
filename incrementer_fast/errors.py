"""The package's error types: what went wrong, in one line that names the cause and says what to do.

The ``incrementer-fast`` command turns every exception into one line on stderr (``incrementer_fast.cli``);
these types decide its exit status:

* ``InputError`` (a ``ValueError``): something given — an option, a file, a folder — cannot be used as it
  is; found before any work starts, so nothing was written. Exit status 2.
* ``CheckpointError`` (an ``InputError``): a checkpoint that cannot be read (truncated, empty, another
  format) or that does not fit what it is loaded for; the message names the file (and the fields).
* ``WorkError`` (a ``RuntimeError``): the work itself failed (a non-finite loss, a write the OS refused);
  what was finished before is kept. Exit status 1.
* ``Terminated`` (a ``KeyboardInterrupt``): the command received SIGTERM (what ``timeout`` and job schedulers
  send); it unwinds exactly as Ctrl-C does, so temporary files are removed. Exit status 143.
"""
from __future__ import annotations

__all__ = ["CheckpointError", "InputError", "Terminated", "WorkError", "interruption_message"]


class InputError(ValueError):
    """An option, file or folder that cannot be used as given, found before any work started."""


class CheckpointError(InputError):
    """A checkpoint that cannot be read, or does not fit what it is loaded for; the message names the file."""


class WorkError(RuntimeError):
    """The work failed part-way (what was finished before is kept); the message says where and what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command was when it arrived; a KeyboardInterrupt, so that everything that
    cleans up after Ctrl-C (atomic writes removing their temporary file, data loader workers) does so too."""


def interruption_message(error: KeyboardInterrupt) -> str:
    """The one line for Ctrl-C or SIGTERM (``Terminated``): what stopped the command and how to continue (the
    command's error line, and the run's ``run.log``)."""
    cause = "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted"
    return f"{cause}; finished steps are kept: rerun with --resume to continue"
