"""Checks of a run's request that need the scanned data, made before the run writes anything.

``run.run_scenario`` validates options, the run directory, the model and every image and label first; what
needs the label values of the whole training split comes here, so that a request that cannot finish is refused
before step 0 trains (for hours, at paper scale) rather than when the step it cannot train begins.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..errors import InputError
from .scenarios import select_images

__all__ = ["check_split_overlap", "check_step_selections"]


def check_split_overlap(train_set, val_set) -> None:
    """InputError when the training and validation splits share images (by id): an image scored after being
    trained on inflates every number of the run. Names both lists and a few of the shared ids."""
    shared = sorted(set(train_set.ids) & set(val_set.ids))
    if not shared:
        return
    lists = [str(d.split_list) for d in (train_set, val_set) if getattr(d, "split_list", None) is not None]
    where = f" ({' and '.join(lists)})" if lists else ""
    examples = ", ".join(map(repr, shared[:3])) + (", …" if len(shared) > 3 else "")
    raise InputError(f"the train and val splits{where} share {len(shared)} image(s): {examples}; an image scored "
                     "must not be trained on: remove them from one list")


def check_step_selections(train_labels: Mapping[str, Iterable[int]], dataset, task, steps: Sequence[int], *,
                          overlap: bool, dataset_classes: list[list[int]], class_names: Sequence[str],
                          task_name: str, data_root) -> None:
    """InputError naming the first of ``steps`` that has no training image (MiB/PLOP's selection,
    ``scenarios.select_images``), with its classes.

    Args:
        train_labels: image id -> label values of the training split (class positions when the run has a
            class order).
        dataset: what ``scenarios`` names the dataset by.
        task: the run's steps (class positions).
        steps: the steps this command trains.
        overlap: the overlapped setting (False: disjoint, where an image holding a future class is left out).
        dataset_classes: each step's classes in the dataset's indices (what the message shows).
        class_names: the dataset's class names, by index.
        task_name: the task as the user gave it (``--task``).
        data_root: where the data is (for the message).
    """
    for step in steps:
        if select_images(train_labels, dataset, task, step, overlap):
            continue
        classes = [c for c in dataset_classes[step] if c != 0]
        names = ", ".join(class_names[c] for c in classes)
        rule = "" if overlap else " without a class of a later step (the disjoint setting)"
        raise InputError(f"step {step} of task {task_name!r} has no training image in {data_root}: no image of the "
                         f"train split holds its classes {classes} ({names}){rule}; found before any step "
                         "trained: choose another --task or --class-order, or add images of these classes")
