"""What a run reports: ``logging`` records (rank-aware), ``epochs.csv``, ``run.log`` and optional TensorBoard.

* Messages go through the standard ``logging`` module, under the logger ``incrementer_fast`` (the pipeline's
  modules log to its children). The library adds no handler: the ``incrementer-fast`` command installs one
  (``configure_logging``) that prints rank 0's records and only warnings and errors of the other ranks of a
  ``torchrun`` launch, prefixed ``[rank r]``; in your own code, configure ``logging`` as you like.
* ``epochs.csv`` in the run directory: one row per finished epoch of every step — ``step``, ``epoch``, every
  loss term (``total``, ``ce``, ``dice``, ``fod_visual``, ``fod_class``, ``kd``, ``pod``: means over the
  epoch's micro-batches of every process), ``lr`` (the epoch's last update's) and ``seconds`` — rewritten
  atomically after each epoch; a step that is trained again (resumed after a crash, or ``--step k``) replaces its rows.
* ``run.log`` in the run directory: the records of the run that the logger's level lets through.
* ``--tensorboard``: the same per-epoch numbers and each step's mIoU as TensorBoard scalars in
  ``<run>/tensorboard`` (x axis: the run's epoch count, and the step for mIoU).
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

from .._files import atomic_write

__all__ = ["EpochLog", "RankFilter", "RunReports", "TensorBoardLog", "configure_logging", "run_log_file",
           "tensorboard_available"]

ROOT_LOGGER = "incrementer_fast"


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))  # torchrun sets it before the process group exists


class RankFilter(logging.Filter):
    """Passes every record of rank 0 and the warnings and errors of the other ranks, which it marks with
    ``record.rank_prefix = "[rank r] "`` (empty on rank 0) for the formatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = _rank()
        record.rank_prefix = f"[rank {rank}] " if rank else ""
        return rank == 0 or record.levelno >= logging.WARNING


def configure_logging(level: int = logging.INFO, stream=None) -> logging.Handler:
    """Print the package's records at ``level`` and above to ``stream`` (default stderr; the command passes
    stdout), rank-aware (``RankFilter``).
    For commands: a library leaves handlers to its user. Calling it again replaces the earlier handler."""
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in [h for h in logger.handlers if getattr(h, "_incrementer_fast_console", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._incrementer_fast_console = True
    handler.addFilter(RankFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(rank_prefix)s%(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


class _RunFileHandler(logging.FileHandler):
    """A FileHandler that creates nothing until the run directory exists (a run validates everything before
    it writes anything; records emitted before that are left to the other handlers)."""

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None and not Path(self.baseFilename).parent.is_dir():
            return
        super().emit(record)


@contextlib.contextmanager
def run_log_file(out_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Append the package's records to ``out_dir/run.log`` for the duration of the block (``enabled``:
    rank 0 only)."""
    if not enabled:
        yield
        return
    handler = _RunFileHandler(Path(out_dir) / "run.log", encoding="utf-8", delay=True)
    handler.addFilter(RankFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger(ROOT_LOGGER)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def _cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class EpochLog:
    """``epochs.csv`` of a run directory (see the module docstring). Columns: ``step``, ``epoch``, the loss
    terms in the order the summaries give them, ``lr``, ``seconds``."""

    FILE = "epochs.csv"
    LAST = ("lr", "seconds")

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / self.FILE
        self.rows: list[dict] = []
        self.columns = ["step", "epoch"]
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.rows = list(reader)
                self.columns = list(reader.fieldnames or self.columns)

    def start_step(self, step: int, after_epoch: int = 0) -> None:
        """Forget the rows of ``step`` after epoch ``after_epoch`` (they are about to be trained again; a step
        resumed from its epoch checkpoint keeps the rows of the epochs it does not train again)."""
        self.rows = [row for row in self.rows if int(row["step"]) != step or int(row["epoch"]) <= after_epoch]

    def add(self, step: int, summary: dict) -> None:
        """Append the summary of a finished epoch (``train_step``'s) and rewrite the file atomically."""
        terms = [k for k in summary if k not in ("epoch", *self.LAST)]
        middle = [c for c in self.columns if c not in ("step", "epoch", *self.LAST)]
        self.columns = ["step", "epoch", *middle, *[t for t in terms if t not in middle], *self.LAST]
        self.rows.append({"step": step, **{k: _cell(v) for k, v in summary.items()}})
        self.rows.sort(key=lambda row: (int(row["step"]), int(row["epoch"])))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_write(self.path) as handle:
            handle.write(buffer.getvalue().encode("utf-8"))


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write (the ``tensorboard`` package is installed)."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """TensorBoard scalars of a run in ``<run>/tensorboard``: ``loss/<term>``, ``lr`` and ``seconds`` per epoch
    (x: the run's epoch count), ``miou/old|new|all`` per step (x: the step)."""

    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (an extra)

        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def epoch(self, run_epoch: int, summary: dict) -> None:
        for name, value in summary.items():
            if name not in ("epoch", "lr", "seconds"):
                self.writer.add_scalar(f"loss/{name}", value, run_epoch)
        self.writer.add_scalar("lr", summary["lr"], run_epoch)
        self.writer.add_scalar("seconds", summary["seconds"], run_epoch)
        self.writer.flush()

    def step(self, record: dict) -> None:
        for part in ("old", "new", "all"):
            value: Optional[float] = record.get(f"miou_{part}")
            if value is not None:
                self.writer.add_scalar(f"miou/{part}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunReports:
    """The per-epoch and per-step reports of one run: ``epochs.csv`` and, with ``config.tensorboard``,
    TensorBoard. Only where ``enabled`` (rank 0); nothing is written before the first epoch ends."""

    def __init__(self, out_dir: Path, config, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.use_tensorboard = bool(config.tensorboard)
        self.current_step = 0
        self.epochs_before = 0
        self._epochs: Optional[EpochLog] = None
        self._board: Optional[TensorBoardLog] = None

    def __enter__(self) -> "RunReports":
        return self

    def __exit__(self, *_exc) -> None:
        if self._board is not None:
            self._board.close()

    def _epoch_log(self) -> EpochLog:
        if self._epochs is None:
            self._epochs = EpochLog(self.out_dir)
        return self._epochs

    def _tensorboard(self) -> Optional[TensorBoardLog]:
        if self.use_tensorboard and self._board is None:
            self._board = TensorBoardLog(self.out_dir)
        return self._board

    def start_step(self, step: int, epochs_before: int, after_epoch: int = 0) -> None:
        """Step ``step`` begins (after its epoch ``after_epoch`` when resumed); the run trained
        ``epochs_before`` epochs before it (TensorBoard's x axis)."""
        self.current_step, self.epochs_before = step, epochs_before
        if self.enabled:
            self._epoch_log().start_step(step, after_epoch)

    def epoch(self, summary: dict) -> None:
        """An epoch of the current step ended (``train_step``'s ``on_epoch``)."""
        if not self.enabled:
            return
        self._epoch_log().add(self.current_step, summary)
        board = self._tensorboard()
        if board is not None:
            board.epoch(self.epochs_before + summary["epoch"], summary)

    def step(self, record: dict) -> None:
        """A step finished with its metrics record."""
        board = self._tensorboard() if self.enabled else None
        if board is not None:
            board.step(record)
