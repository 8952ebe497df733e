"""``build_dataset``: a dataset by its name ("voc", "ade", "synthetic", "folder"), as ``--dataset`` names it."""
from __future__ import annotations

from .datasets import ADE20KSegmentation, SyntheticSegmentation, VOCSegmentation
from .folder import FolderSegmentation
from .synthetic import generate_synthetic, read_manifest


def build_dataset(name: str, root, split: str, transform=None, label_transform=None, cache_dir=None,
                  **folder_options):
    """The dataset ``name`` ("voc", "ade", "synthetic" or "folder") at ``root`` for ``split`` ("train" or
    "val").

    For "synthetic", a root without a synthetic dataset gets one generated with the default parameters
    (``generate_synthetic(root)``); call ``generate_synthetic`` first for other sizes or seeds. For
    "folder", ``folder_options`` are ``FolderSegmentation``'s ``ignore_index`` and ``label_map``.
    """
    if name == "folder":
        return FolderSegmentation(root, split, transform, label_transform, cache_dir, **folder_options)
    if name == "voc":
        return VOCSegmentation(root, split, transform, label_transform, cache_dir)
    if name == "ade":
        return ADE20KSegmentation(root, split, transform, label_transform, cache_dir)
    if name == "synthetic":
        if read_manifest(root) is None:
            generate_synthetic(root)
        return SyntheticSegmentation(root, split, transform, label_transform, cache_dir)
    raise ValueError(f"unknown dataset {name!r}: expected 'voc', 'ade', 'synthetic' or 'folder'")
