"""Atomic file writes: a reader, or a run resumed after a crash, sees the old file or the new one, never a part.

One helper for every file the package writes (checkpoints, metrics, caches, figures): write into a temporary
file in the target's folder, then ``os.replace`` it over the target (atomic on POSIX and Windows within one
file system). The temporary file is created like any other file (the umask applies), and removed when the
write fails. This protects against a crashed or killed process; ``durable=True`` also fsyncs the content
before the rename (checkpoints), against a power cut.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator, Union

__all__ = ["atomic_write", "atomic_write_json"]


@contextlib.contextmanager
def atomic_write(path: Union[str, os.PathLike], durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into; it replaces ``path`` when the block exits cleanly.

    Examples:
        >>> with atomic_write(run_dir / "step_1.pt") as f:  # doctest: +SKIP
        ...     torch.save(state, f)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_write_json(path: Union[str, os.PathLike], obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_write(path) as handle:
        handle.write(json.dumps(obj).encode("utf-8"))
