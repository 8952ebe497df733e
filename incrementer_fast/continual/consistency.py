"""Before a run directory is continued: do config.json, metrics.json and the checkpoints still tell one story?

A finished step is described three times: by config.json (its task, method and architecture say what step k
is), by its metrics record (the classes it was trained on, written by the run) and by its checkpoint (its
classes per step and architecture, written by the run). When one of them was edited or replaced, resuming
from the others would train the wrong step or report every step finished; deleting a checkpoint that agrees
with its own record would lose a finished step for nothing. So ``check_finished_steps`` compares the three
for every finished step and names the one that changed:

* config.json's task or method gives a finished step other classes than its record and its checkpoint
  agree on: config.json was edited — restore it (the checkpoints are fine), or start the new task elsewhere;
* a checkpoint disagrees with its own record and config.json: the checkpoint was replaced — restore it, or
  move it out of the folder and ``--resume`` trains that step again;
* the architecture fields (``model_options``) of every finished checkpoint agree with each other but not
  with config.json: config.json was edited; one finished step alone cannot tell, and the message says both.

Unreadable checkpoints, and those whose metadata is malformed, are left to the loader, which names them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..checkpoint_loading import architecture_config
from ..errors import CheckpointError, InputError
from ..model import checkpoint_differences, read_checkpoint

__all__ = ["check_finished_steps"]


def _listed(items: list[str], limit: int = 3) -> str:
    return "; ".join(items[:limit]) + (f"; … ({len(items)} in all)" if len(items) > limit else "")


def _move_away(out_dir: Path, step: int) -> str:
    return (f"restore the right file, or move it out of {out_dir} and rerun with --resume to train step {step} "
            "again")


def check_finished_steps(out_dir, records: Sequence[Mapping], checkpoints: Mapping[int, Path],
                         task_steps: Sequence[Sequence[int]], architecture: Mapping, task_name: str,
                         method: str) -> None:
    """Refuse (naming what changed, see the module docstring) a run directory whose config.json, metrics
    records and checkpoints disagree about a finished step.

    Args:
        out_dir: the run directory (for messages).
        records: its metrics records.
        checkpoints: finished step -> its checkpoint.
        task_steps: the steps config.json's task and method give, in the dataset's class indices (the
            records' ``classes``).
        architecture: ``run.model_options`` of config.json (what every checkpoint must have been built with).
        task_name, method: config.json's ``task`` and ``method`` (for messages).

    Raises:
        InputError: config.json (or metrics.json) was changed after the steps were trained.
        CheckpointError: a finished step's checkpoint is not the one its record describes.
    """
    out_dir = Path(out_dir)
    trained = {r["step"]: sorted(r["classes"]) for r in records if isinstance(r.get("classes"), list)}
    counts = {}  # finished step -> the checkpoint's classes per step (readable checkpoints only)
    for step, path in checkpoints.items():
        try:
            checkpoint = read_checkpoint(path)
            architecture_config(checkpoint["config"], path)  # (malformed metadata is the checkpoint's fault)
            counts[step] = list(checkpoint["classes_per_step"])
        except (CheckpointError, FileNotFoundError):
            pass  # the loader names it when the step is loaded
    config_changed = []
    for step in sorted(checkpoints):
        if step not in trained:
            continue
        described = sorted(task_steps[step]) if step < len(task_steps) else None
        have = counts.get(step)
        fits_record = have is None or (len(have) == step + 1 and have[-1] == len(trained[step]))
        if described == trained[step] and fits_record:
            continue
        if described != trained[step] and fits_record:
            config_changed.append(f"step {step} " + ("is not in it" if described is None else
                                                     f"adds {described}") + f" (trained: {trained[step]})")
            continue
        expect = dict(architecture, classes_per_step=[len(s) for s in task_steps[:step + 1]])
        if described == trained[step]:  # the checkpoint alone disagrees
            raise CheckpointError(f"checkpoint {checkpoints[step]} does not fit: "
                                  f"{'; '.join(checkpoint_differences(checkpoints[step], expect))} — it is not "
                                  f"this run's step {step} (config.json and metrics.json agree on its classes "
                                  f"{trained[step]}): {_move_away(out_dir, step)}")
        raise InputError(f"{out_dir}: step {step} is described three ways: config.json's task {task_name!r} "
                         f"({method}) gives it {described}, metrics.json {trained[step]}, "
                         f"{checkpoints[step].name} {have[-1]} classes; restore the files that were changed, "
                         "or start the run again in another --out")
    if config_changed:
        raise InputError(f"{out_dir / 'config.json'} does not describe the steps this run finished: its task "
                         f"{task_name!r} ({method}) {_listed(config_changed)}. config.json was changed after "
                         "those steps were trained (their metrics records and checkpoints agree): restore its task "
                         "and method, or train that task in another --out; keep the checkpoints")
    _check_architecture(out_dir, {s: checkpoints[s] for s in counts}, architecture)


def _check_architecture(out_dir: Path, checkpoints: Mapping[int, Path], architecture: Mapping) -> None:
    """Every readable finished checkpoint against config.json's architecture fields."""
    differences = {step: checkpoint_differences(path, architecture) for step, path in checkpoints.items()}
    differing = sorted(step for step, found in differences.items() if found)
    if not differing:
        return
    first = differing[0]
    fields = "; ".join(differences[first])
    if len(differing) < len(checkpoints):
        agree = sorted(set(checkpoints) - set(differing))
        raise CheckpointError(f"checkpoint {checkpoints[first]} does not fit: {fields} — unlike the checkpoints of "
                              f"steps {agree}, which agree with config.json, it is not this run's step {first}: "
                              f"{_move_away(out_dir, first)}")
    if len(checkpoints) > 1 and all(differences[s] == differences[first] for s in differing):
        raise InputError(f"{out_dir / 'config.json'} does not describe the model this run trained: every finished "
                         f"step's checkpoint (steps {differing}) differs from it alike ({fields}); config.json was "
                         "changed after they were trained: restore these fields (keep the checkpoints), or start "
                         "the run again in another --out")
    raise CheckpointError(f"checkpoint {checkpoints[first]} does not fit config.json ({fields}): either config.json "
                          f"was changed after step {first} was trained (restore these fields), or the checkpoint "
                          f"was replaced ({_move_away(out_dir, first)})")
