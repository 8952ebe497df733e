"""Class-incremental scenarios: which classes each step learns, which images it trains on, how labels read.

A *task* is a list of steps, each step the list of label values it introduces: step 0 holds the
background 0 and the base classes, every later step a block of new classes, all in label order
(``get_task("voc", "15-1") == [[0, ..., 15], [16], [17], [18], [19], [20]]``). Because every task covers
``0..K`` contiguously in label order, the model's output index of a class is its label value: no
reordering of labels is ever needed.

Image selection follows MiB (Cermelli et al., CVPR 2020, ``dataset/utils.py: filter_images``), which PLOP
and SSUL reuse: an image belongs to step t when it holds at least one of step t's classes (the background
does not count); in the *disjoint* setting (``overlap=False``) every label of the image must also be an
old or current class, the background or the void 255, so images showing a future class are dropped.

Checked against published counts, on the per-image class lists of VOC train_aug / val
(``tests/test_scenarios.py``): VOC 19-1 disjoint step 0 has 10,034 training images and 1,421 validation
images (MiB issue fcdl94/MiB#17, log line "Train set: 10034, Val set: 1421, Test set: 1421"); the
"test on seen classes" sets of 15-5s at steps 1 and 2 hold 1,277 and 1,329 images (fcdl94/MiB#24 prints
"Total samples" one above the set size: 1278 and 1330, as #17 prints 1422 for its 1421 and 1450 for the
1449 of the whole val set).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from .._files import atomic_write_json
from ..constants import IGNORE_INDEX

# Label values including the background 0. ADE20K: the 150 SceneParsing classes plus 0 ("other"), which
# MiB and PLOP treat as the background class of the scenario; synthetic: the 12 classes of
# ``incrementer_fast.continual.synthetic`` (which depends on this module, not the other way round).
_NUM_CLASSES = {"voc": 21, "ade": 151, "synthetic": 13}

# Named tasks per dataset, as "BASE-INC": step 0 = [0..BASE], then blocks of INC classes up to the last
# class. The dataset's own names; any other "BASE-INC" that tiles the classes is accepted as well.
TASK_NAMES = {
    "voc": ("19-1", "15-5", "15-1", "10-1", "5-3", "2-2", "5-1", "2-1"),
    "ade": ("100-50", "100-10", "100-5", "50-50"),
    # The synthetic dataset has 12 foreground classes (incrementer_fast.continual.synthetic): a two-step
    # task (8-4), three- and four-step tasks with blocks of 2 (8-2, 6-2), a one-class-per-step task (8-1)
    # and three equal blocks (4-4).
    "synthetic": ("8-4", "8-2", "6-2", "8-1", "4-4"),
}

_NAME_RE = re.compile(r"^(\d+)-(\d+)$")
_SPEC_ITEM_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _named(dataset: str | int) -> str:
    """``dataset 'voc'``, or for a dataset named by its class count ``a dataset of 5 classes``."""
    return f"a dataset of {dataset} classes" if isinstance(dataset, int) else f"dataset {dataset!r}"


def num_classes(dataset: str | int) -> int:
    """Number of label values of ``dataset`` including the background 0 (voc 21, ade 151, synthetic 13).
    A dataset whose class count is read from its files (``--dataset folder``: its ``classes.txt``) is named
    by that count, an int, wherever this module takes a ``dataset``."""
    if isinstance(dataset, int) and not isinstance(dataset, bool) and dataset >= 2:
        return dataset
    if dataset not in _NUM_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of 'voc', 'ade', 'synthetic'")
    return _NUM_CLASSES[dataset]


def _parse_spec(dataset: str, spec: str, n: int) -> list[list[int]]:
    steps = []
    expected = 0
    for item in spec.split(","):
        item = item.strip()
        m = _SPEC_ITEM_RE.match(item)
        if m is None:
            raise ValueError(
                f"task spec {spec!r}: step {item!r} is not 'A' or 'A-B' (steps are separated by commas)"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"task spec {spec!r}: step {item!r} has its end before its start")
        if lo != expected:
            if expected == 0:
                problem = "must start at 0 (the background)"
            elif lo < expected:
                problem = f"overlaps the previous step (expected it to start at {expected})"
            else:
                problem = f"leaves a gap: classes {expected}..{lo - 1} belong to no step"
            raise ValueError(
                f"task spec {spec!r}: step {len(steps)} ({item!r}) {problem}; "
                f"steps must be contiguous from 0 without gaps or overlaps"
            )
        if hi > n - 1:
            raise ValueError(
                f"task spec {spec!r}: class {hi} is out of range for {_named(dataset)} "
                f"(classes 0..{n - 1})"
            )
        steps.append(list(range(lo, hi + 1)))
        expected = hi + 1
    if len(steps[0]) < 2:
        raise ValueError(f"task spec {spec!r}: step 0 must hold the background 0 and at least one class")
    return steps


def get_task(dataset: str, name: str) -> list[list[int]]:
    """The classes of each step of task ``name`` on ``dataset``.

    ``name`` is either ``"BASE-INC"`` (step 0 = ``[0..BASE]``, then blocks of ``INC`` classes up to the
    dataset's last class; the dataset's published tasks are listed in ``TASK_NAMES``) or a user spec of
    comma-separated steps, each ``"A"`` or ``"A-B"`` (inclusive), starting at 0:
    ``"0-15,16,17,18-20"``. A spec may stop before the last class (the remaining classes are never
    learned). Raises ValueError on anything else, naming the problem.
    """
    n = num_classes(dataset)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    name = name.strip()
    m = _NAME_RE.match(name)
    if m is not None and "," not in name and int(m.group(1)) != 0:
        base, inc = int(m.group(1)), int(m.group(2))
        remaining = n - 1 - base
        if inc < 1 or base >= n - 1 or remaining % inc != 0:
            raise ValueError(
                f"task {name!r} does not tile "
                f"{_named(dataset)}: "
                f"{n - 1} foreground classes, "
                f"base {base}, then blocks of {inc} (known tasks: {', '.join(TASK_NAMES.get(dataset, ())) or 'none'}; "
                f"or give steps explicitly, e.g. '0-{n // 2},{n // 2 + 1}-{n - 1}')"
            )
        steps = [list(range(0, base + 1))]
        steps += [list(range(lo, lo + inc)) for lo in range(base + 1, n, inc)]
        return steps
    return _parse_spec(dataset, name, n)


def _check_task(task, dataset: str | None = None) -> None:
    if not isinstance(task, (list, tuple)) or not task:
        raise ValueError(f"task must be a non-empty list of steps (lists of classes), got {task!r}")
    flat = [c for step in task for c in step]
    if flat != list(range(len(flat))) or any(len(step) == 0 for step in task):
        raise ValueError(f"task {task!r}: steps must list classes 0..K contiguously, in label order")
    if dataset is not None and len(flat) > num_classes(dataset):
        raise ValueError(
            f"task {task!r} has {len(flat)} classes but {_named(dataset)} has {num_classes(dataset)}"
        )


def _check_step(task, step: int) -> None:
    _check_task(task)
    if not isinstance(step, int) or not 0 <= step < len(task):
        raise ValueError(f"step {step!r} out of range for a task of {len(task)} steps")


def classes_up_to(task, step: int) -> list[int]:
    """All classes seen up to and including ``step`` (background included)."""
    _check_step(task, step)
    return [c for s in task[: step + 1] for c in s]


def old_classes(task, step: int) -> list[int]:
    """Classes learned before ``step`` (background included from step 1 on; empty at step 0)."""
    _check_step(task, step)
    return [c for s in task[:step] for c in s]


def new_classes(task, step: int) -> list[int]:
    """Classes introduced at ``step`` (at step 0: the background and the base classes)."""
    _check_step(task, step)
    return list(task[step])


def _label_set(image_id, labels, n: int) -> set[int]:
    values = {int(v) for v in labels}
    bad = sorted(v for v in values if not (0 <= v < n or v == IGNORE_INDEX))
    if bad:
        raise ValueError(
            f"image {image_id!r} has label values {bad} outside 0..{n - 1} and {IGNORE_INDEX}"
        )
    return values


def select_images(
    image_labels: Mapping[str, Iterable[int]], dataset: str, task, step: int, overlap: bool
) -> list[str]:
    """Ids of the training images of ``step`` (MiB/PLOP rule, see the module docstring), sorted.

    ``image_labels`` maps an image id to the label values present in its label map (0 and 255 may be
    among them). ``overlap=True`` is the overlapped setting, ``False`` the disjoint one. A label value
    outside the dataset's classes and 255 raises ValueError naming the image.
    """
    _check_step(task, step)
    _check_task(task, dataset)
    n = num_classes(dataset)
    current = set(task[step]) - {0}
    allowed = set(classes_up_to(task, step)) | {0, IGNORE_INDEX}
    selected = []
    for image_id in sorted(image_labels):
        values = _label_set(image_id, image_labels[image_id], n)
        if values & current and (overlap or values <= allowed):
            selected.append(image_id)
    return selected


def select_eval_images(image_labels: Mapping[str, Iterable[int]], dataset: str, task, step: int) -> list[str]:
    """Ids of the validation images scored at ``step``: those holding at least one class seen so far
    (the background does not count), sorted. This is MiB's and PLOP's "test on seen classes" set
    (``test_dst`` built with ``labels_cum`` and the overlapped filter); at the last step of a task that
    covers every class it is the whole validation set."""
    _check_step(task, step)
    _check_task(task, dataset)
    n = num_classes(dataset)
    seen = set(classes_up_to(task, step)) - {0}
    return [i for i in sorted(image_labels) if _label_set(i, image_labels[i], n) & seen]


def _selection_key(image_labels, dataset: str, task, step: int, overlap: bool, kind: str) -> str:
    digest = hashlib.sha256()
    header = {"v": 1, "kind": kind, "dataset": dataset, "task": [list(map(int, s)) for s in task],
              "step": step, "overlap": bool(overlap)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for image_id in sorted(image_labels):
        values = sorted({int(v) for v in image_labels[image_id]})
        digest.update(json.dumps([image_id, values]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def cached_select_images(
    cache_dir, image_labels: Mapping[str, Iterable[int]], dataset: str, task, step: int, overlap: bool
) -> list[str]:
    """``select_images`` through a JSON cache in ``cache_dir``.

    The cache file is named by a sha256 of the dataset, the task definition, the step, the setting and
    the full content of ``image_labels`` (ids and label values), so a change to any of them misses the
    cache: a stale list is never reused. Files are written atomically (temporary file, then rename).
    Hashing the labels of ADE20K's 20,210 images takes tens of milliseconds; the point of the cache is to
    persist the selection a run trained on beside its results.
    """
    key = _selection_key(image_labels, dataset, task, step, overlap, "train")
    path = Path(cache_dir) / f"select-{dataset}-step{step}-{'ov' if overlap else 'dis'}-{key[:32]}.json"
    if path.exists():
        try:
            with open(path, encoding="utf-8") as f:
                cached = json.load(f)
            ids = cached.get("ids") if isinstance(cached, dict) and cached.get("key") == key else None
            if isinstance(ids, list) and all(isinstance(i, str) and i in image_labels for i in ids):
                return ids
        except (OSError, ValueError):
            pass  # an unreadable or malformed cache file is recomputed and overwritten
    ids = select_images(image_labels, dataset, task, step, overlap)
    atomic_write_json(path, {"key": key, "dataset": dataset, "task": task, "step": step,
                             "overlap": bool(overlap), "ids": ids})
    return ids


def _lut_apply(labels, lut: np.ndarray, what: str):
    """Map label values through a 256-entry table, for a torch tensor or a numpy array of integers."""
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{what}: labels must be an integer tensor, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 255):
            raise ValueError(f"{what}: label values must lie in 0..255, got "
                             f"{int(labels.min())}..{int(labels.max())}")
        table = torch.as_tensor(lut, device=labels.device)
        return table[labels.long()].to(labels.dtype)
    arr = np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what}: labels must be an integer array, got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise ValueError(f"{what}: label values must lie in 0..255, got {int(arr.min())}..{int(arr.max())}")
    return lut[arr.astype(np.int64)].astype(arr.dtype)


def remap_train_labels(labels, task, step: int, ignore_index: int = IGNORE_INDEX):
    """Training labels of ``step``: pixels of classes outside step t's classes become background 0.

    Old classes become 0 (the background shift of MiB/PLOP: the old model's knowledge enters through
    distillation and pseudo-labels, not the ground truth); future classes, present in the overlapped
    setting, become 0 too. ``ignore_index`` (void) pixels stay ``ignore_index``. Note: MiB's own loader
    also turns void 255 into 0 in training (its ``inverted_order[255] = masking_value``); PLOP keeps 255
    ignored, and so do we. Accepts a torch tensor or numpy array of integers in 0..255; returns the same
    kind and dtype.
    """
    _check_step(task, step)
    if not 0 <= ignore_index <= 255:
        raise ValueError(f"ignore_index must lie in 0..255, got {ignore_index}")
    lut = np.zeros(256, dtype=np.int64)
    for c in task[step]:
        lut[c] = c
    lut[ignore_index] = ignore_index
    return _lut_apply(labels, lut, "remap_train_labels")


def remap_eval_labels(labels, task, step: int, future: str = "ignore"):
    """Evaluation labels at ``step``: every class seen so far keeps its value; 255 stays ignored.

    Pixels of future classes (not yet learned at an intermediate step) are scored by ``future``:

    - ``"ignore"`` (default): they become 255 and are left out of the confusion matrix. This is MiB's
      "test on seen classes" protocol (its validation/test loader maps labels outside the seen classes
      to ``masking_value = 255`` when ``train=False``). The model has no output for these classes, so
      the pixels carry no verdict on it either way; it is neutral between methods.
    - ``"background"``: they become 0 (PLOP's loader, ``masking_value = 0  # Future classes will be
      considered as background``). This rewards predicting background on still-unknown objects.

    Both agree at the last step of a task covering all classes, the step papers report. Use
    ``select_eval_images`` to score, as MiB/PLOP do, only the validation images with a seen class.
    """
    if future not in ("ignore", "background"):
        raise ValueError(f"future must be 'ignore' or 'background', got {future!r}")
    _check_step(task, step)
    lut = np.full(256, IGNORE_INDEX if future == "ignore" else 0, dtype=np.int64)
    for c in classes_up_to(task, step):
        lut[c] = c
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return _lut_apply(labels, lut, "remap_eval_labels")
