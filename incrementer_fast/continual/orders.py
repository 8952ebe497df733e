"""Class orders: the order in which a dataset's classes arrive in a class-incremental task.

Results depend on it, so CISS papers report the mean over several orders (PLOP's tasks.py: 22 shuffled
orders of VOC 15-5s, ``15-5s_b`` ... ``15-5s_w``, besides the label order ``15-5s``).
An order is a permutation of the dataset's classes with the background 0 first; a task's steps count
*positions* in the order, as PLOP's and MiB's orders do: with order ``0,12,9,...`` task 15-1 learns the
classes at positions 0..15 first (0, 12, 9, ...), then one class per step.

Inside training the labels are renumbered by position (``ClassOrder.to_positions``, applied to every label
map as it is loaded), so the model's output p is the class at position p and the rest of the pipeline —
image selection, label remapping, metrics — works unchanged on contiguous steps. What a run writes is
turned back into the dataset's own class indices (``ClassOrder.record_to_dataset``): ``metrics.json``'s
``classes`` and ``per_class_iou``, the tables and the figures name each class by its index and name in the
dataset, whatever the order.

``--class-order`` takes:

* ``0,5,3,...``: the order itself;
* a published order by name: PLOP's VOC orders ``15-5s_b`` ... ``15-5s_w`` (``PLOP_VOC_ORDERS``; with
  ``--task 15-1`` they are PLOP's 15-5s tasks of those names);
* ``random:SEED``: 0, then the other classes shuffled by Python's ``random.Random(SEED)``.
"""
from __future__ import annotations

import random

import numpy as np

from ..constants import IGNORE_INDEX
from .scenarios import _lut_apply

# PLOP's VOC class orders (arthurdouillard/CVPR2021_PLOP, tasks.py, ``tasks_voc["15-5s_b"]`` ...
# ``["15-5s_w"]``, commit 341eecbb2bd202b0afcc8a7e8be09e9fb3f76231): each task's steps concatenated, which is
# the order (step 0 holds 16 classes, then one per step). "15-5s" itself is the label order.
PLOP_VOC_ORDERS = {
    "15-5s_b": "0,12,9,20,7,15,8,14,16,5,19,4,1,13,2,11,17,3,6,18,10",
    "15-5s_c": "0,13,19,15,17,9,8,5,20,4,3,10,11,18,16,7,12,14,6,1,2",
    "15-5s_d": "0,15,3,2,12,14,18,20,16,11,1,19,8,10,7,17,6,5,13,9,4",
    "15-5s_e": "0,7,5,3,9,13,12,14,19,10,2,1,4,16,8,17,15,18,6,11,20",
    "15-5s_f": "0,7,13,5,11,9,2,15,12,14,3,20,1,16,4,18,8,6,10,19,17",
    "15-5s_g": "0,7,5,9,1,15,18,14,3,20,10,4,19,11,17,16,12,8,6,2,13",
    "15-5s_h": "0,12,9,19,6,4,10,5,18,14,15,16,3,8,7,11,13,2,20,17,1",
    "15-5s_i": "0,13,10,15,8,7,19,4,3,16,12,14,11,5,20,6,2,18,9,17,1",
    "15-5s_j": "0,1,14,9,5,2,15,8,20,6,16,18,7,11,10,19,3,4,17,12,13",
    "15-5s_k": "0,16,13,1,11,12,18,6,14,5,3,7,9,20,19,15,4,2,10,8,17",
    "15-5s_l": "0,10,7,6,19,16,8,17,1,14,4,9,3,15,11,12,2,18,20,13,5",
    "15-5s_m": "0,18,4,14,17,12,10,7,3,9,1,8,15,6,13,2,5,11,20,16,19",
    "15-5s_n": "0,5,4,13,18,14,10,19,15,7,9,3,2,8,16,20,1,12,11,6,17",
    "15-5s_o": "0,9,12,13,18,7,1,15,17,10,8,4,5,20,16,6,14,19,11,2,3",
    "15-5s_p": "0,9,12,13,18,2,11,15,17,10,8,4,5,20,16,6,14,19,1,7,3",
    "15-5s_q": "0,3,14,13,18,2,11,15,17,10,8,4,5,20,16,6,12,19,1,7,9",
    "15-5s_r": "0,3,14,13,1,2,11,15,17,7,8,4,5,9,16,19,12,6,18,10,20",
    "15-5s_s": "0,3,14,6,1,2,11,12,17,7,20,4,5,9,16,19,15,13,18,10,8",
    "15-5s_t": "0,3,15,13,1,2,11,18,17,7,20,8,5,9,16,19,14,6,12,10,4",
    "15-5s_u": "0,3,15,13,14,6,11,18,17,7,20,8,4,9,16,10,1,2,12,19,5",
    "15-5s_v": "0,1,2,12,14,6,19,18,17,5,20,8,4,9,16,10,3,15,13,11,7",
    "15-5s_w": "0,1,2,12,14,13,19,18,7,11,20,8,4,9,16,10,3,15,6,5,17",
}

ORDERS = {"voc": PLOP_VOC_ORDERS}


def _parse_list(text: str, num_classes: int, what: str) -> list[int]:
    try:
        order = [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"--class-order {what}: expected comma-separated class indices, a published order "
                         f"name or random:SEED") from None
    if sorted(order) != list(range(num_classes)) or order[0] != 0:
        missing = sorted(set(range(num_classes)) - set(order))
        repeated = sorted({c for c in order if order.count(c) > 1})
        outside = sorted(c for c in set(order) if not 0 <= c < num_classes)
        problems = [f"{label} {values}" for label, values in (("missing", missing), ("repeated", repeated),
                                                              ("outside the classes", outside)) if values]
        if order[0] != 0:
            problems.append(f"starts with {order[0]}")
        raise ValueError(f"--class-order {what}: must be a permutation of the classes 0..{num_classes - 1} "
                         f"starting with the background 0 ({'; '.join(problems)})")
    return order


def resolve_class_order(spec: str | None, dataset: str, num_classes: int) -> list[int] | None:
    """The class order ``spec`` means for ``dataset`` with ``num_classes`` classes (see the module
    docstring), or ``None`` for the label order (``spec`` None or empty). ValueError naming the problem."""
    if spec is None or not spec.strip():
        return None
    spec = spec.strip()
    if spec.startswith("random:"):
        try:
            seed = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--class-order {spec}: random:SEED takes an integer seed") from None
        rest = list(range(1, num_classes))
        random.Random(seed).shuffle(rest)
        return [0, *rest]
    named = ORDERS.get(dataset, {})
    if spec in named:
        return _parse_list(named[spec], num_classes, spec)
    if "," not in spec and not spec.isdigit():
        known = ", ".join(named) or "none for this dataset"
        raise ValueError(f"--class-order {spec}: unknown order name (published orders: {known}; or give the "
                         "order as 0,5,3,... or random:SEED)")
    return _parse_list(spec, num_classes, spec)


class ClassOrder:
    """A class order and the maps between dataset indices and positions.

    Args:
        order: the dataset's class indices in their order of arrival (``order[p]`` is at position p).
    """

    def __init__(self, order: list[int]):
        self.order = list(order)
        self.lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
        self.lut[self.order] = np.arange(len(self.order))

    def to_positions(self, labels):
        """A label map (torch tensor or numpy array of integers in 0..255) renumbered by position; 255 stays
        void. A dataset's ``label_transform``."""
        return _lut_apply(labels, self.lut, "class order")

    __call__ = to_positions

    def to_dataset(self, positions):
        """Position-numbered labels or predictions back in dataset indices (255 stays 255)."""
        back = np.full(256, IGNORE_INDEX, dtype=np.int64)
        back[:len(self.order)] = self.order
        return _lut_apply(positions, back, "class order")

    def positions_of(self, image_labels: dict) -> dict:
        """A scan's image id → label values, renumbered by position."""
        return {i: sorted(int(self.lut[v]) for v in values) for i, values in image_labels.items()}

    def task_to_dataset(self, task) -> list[list[int]]:
        """A task's steps (positions) as dataset class indices."""
        return [[self.order[p] for p in step] for step in task]

    def record_to_dataset(self, record: dict) -> dict:
        """A metrics record (positions) with ``classes`` in dataset indices and ``per_class_iou`` indexed by
        dataset class (one entry per class of the dataset, ``None`` for a class not seen yet or without
        ground truth); the means are the same in either numbering."""
        record = dict(record)
        record["classes"] = [self.order[p] for p in record["classes"]]
        ious = [None] * len(self.order)
        for position, value in enumerate(record["per_class_iou"]):
            ious[self.order[position]] = value
        record["per_class_iou"] = ious
        return record
