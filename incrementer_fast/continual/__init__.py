"""Class-incremental segmentation pipeline: scenarios, datasets (VOC, ADE20K, the built-in synthetic
one), evaluation metrics, and training."""
from .dataset_names import build_dataset
from .datasets import ADE20KSegmentation, SegmentationDataset, SyntheticSegmentation, VOCSegmentation
from .metrics import ConfusionMatrix, summarize
from .scenarios import (
    IGNORE_INDEX,
    TASK_NAMES,
    cached_select_images,
    classes_up_to,
    get_task,
    new_classes,
    num_classes,
    old_classes,
    remap_eval_labels,
    remap_train_labels,
    select_eval_images,
    select_images,
)
from .synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from .synthetic import generate_synthetic
from .transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform, val_transform

__all__ = [
    "ADE20KSegmentation",
    "ConfusionMatrix",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_CLASS_NAMES",
    "SegmentationDataset",
    "SyntheticSegmentation",
    "TASK_NAMES",
    "VOCSegmentation",
    "build_dataset",
    "cached_select_images",
    "classes_up_to",
    "generate_synthetic",
    "get_task",
    "new_classes",
    "num_classes",
    "old_classes",
    "remap_eval_labels",
    "remap_train_labels",
    "select_eval_images",
    "select_images",
    "summarize",
    "train_transform",
    "val_transform",
]
