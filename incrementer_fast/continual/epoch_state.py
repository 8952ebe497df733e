"""Resume inside a step: the training state at the end of an epoch, written atomically beside the run.

At every epoch end ``train_step`` hands the run its state — model, optimiser, learning-rate scheduler,
gradient scaler, the step's PLOP thresholds, the global random generators and the epoch counter — and the
run writes it to ``<run>/step_<k>.epoch.pt`` (``save_epoch_state``: temporary file, fsync, rename, so a
crash leaves the previous epoch's file or the new one). ``--resume`` then continues step k after that epoch
(``load_epoch_state`` checks that the file is this step's, of this run's shape); the file is removed when
the step is finished (its ``step_<k>.pt`` and metrics record written).

Nothing else needs saving for an exact continuation: the data order of an epoch is a permutation seeded by
(seed, step, epoch), each image's augmentation by (seed, step, epoch, image) and dropout by (seed, step,
micro-batch), all recomputed (``train.EffectiveBatchSampler``, ``train.SeededSamples``); so on the CPU the
resumed step ends with the weights, and the run with the metrics, of an uninterrupted one, bit for bit.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .._files import atomic_write
from ..errors import CheckpointError
from ..model import _WriteErrorRecorder

FORMAT = "incrementer_fast.epoch_state"
VERSION = 1
# What must agree between the file and the step being resumed, so that the state fits what is trained.
SHAPE_KEYS = ("step", "epochs", "updates_per_epoch", "num_classes", "train_images")


def epoch_checkpoint_path(out_dir, step: int) -> Path:
    """``<out_dir>/step_<step>.epoch.pt``."""
    return Path(out_dir) / f"step_{step}.epoch.pt"


def rng_states() -> dict:
    """The states of Python's, NumPy's and torch's global generators (CPU, and CUDA when present)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Set the global generators to ``rng_states()``'s result."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_epoch_state(path, state: dict) -> None:
    """Write ``state`` (``train_step``'s epoch state) to ``path`` atomically and durably."""
    writer = None
    try:
        with atomic_write(path, durable=True) as handle:
            writer = _WriteErrorRecorder(handle)
            torch.save({"format": FORMAT, "version": VERSION, **state}, writer)
    except BaseException as error:
        # As Incrementer.save: torch.save reports a refused write as a RuntimeError without the OS's reason.
        cause = writer.error if writer is not None and writer.error is not None else error
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror, str(path)) from error
        raise


def load_epoch_state(path, expect: dict) -> dict:
    """The epoch state in ``path``, checked against ``expect`` (values of ``SHAPE_KEYS`` for the step
    about to be resumed). ``CheckpointError`` naming the file for an unreadable file, another format or
    any difference (each named)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: torch raises many types
        raise CheckpointError(f"epoch checkpoint {path} cannot be read ({type(error).__name__}: {error}); "
                              "delete it to train the step from its start") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{path} is not an epoch checkpoint of this version; delete it to train the step "
                              "from its start")
    differing = [f"{k}: file has {state.get(k)!r}, step has {v!r}" for k, v in expect.items() if state.get(k) != v]
    if differing:
        raise CheckpointError(f"epoch checkpoint {path} is not this run's step {expect.get('step')} "
                              f"({'; '.join(differing)}); delete it to train the step from its start")
    return state
