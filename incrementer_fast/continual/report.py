"""Figures that compare methods on one scenario: the demo's mIoU-per-step plot and its prediction grid.

``plot_comparison`` draws old / new / all mIoU per step (one panel each, one line per method, the joint
upper bound as a dashed level); ``save_comparison_grid`` draws validation images, their ground truth and
each method's prediction side by side, with a legend naming the classes' colours. Both write atomically
(``_files.atomic_write``) and use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from .._files import atomic_write

METRICS = (("miou_old", "old classes (step 0, background included)"),
           ("miou_new", "new classes (added after step 0)"),
           ("miou_all", "all classes seen"))
METHOD_STYLES = {"incrementer": dict(color="#1f77b4", marker="o"), "mib": dict(color="#2ca02c", marker="^"),
                 "plop": dict(color="#9467bd", marker="D"), "finetune": dict(color="#d62728", marker="s")}
# Distinct colours for up to 20 classes (background dark grey, the ignored void band white), for datasets
# without their own palette (see class_palette).
_DISTINCT_COLOURS = np.array([
    (40, 40, 40), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
], dtype=np.uint8)
VOID_COLOUR = (255, 255, 255)


def voc_colour_map() -> np.ndarray:
    """(256, 3) uint8: Pascal VOC's colour map (class c's colour from the bits of c), which covers any class
    index; 255 white."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for c in range(256):
        r = g = b = 0
        value = c
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[c] = (r, g, b)
    palette[255] = VOID_COLOUR
    return palette


def class_palette(dataset: str, num_classes: int | None = None) -> np.ndarray:
    """(classes, 3) uint8 colours of the classes of ``dataset``. The synthetic classes are drawn in their own
    colour family, the first class of a family bright and the second dark (red disc bright red, red square
    dark red, ...), over a light grey background, so that a map reads like the image; other datasets get
    20 distinct colours, or VOC's colour map when they have more than 20 classes (``num_classes``)."""
    if dataset != "synthetic":
        if num_classes is not None and num_classes > len(_DISTINCT_COLOURS):
            return voc_colour_map()
        return _DISTINCT_COLOURS
    import colorsys

    from .synthetic import CLASS_SPECS

    colours = [(200, 200, 200)]
    families = set()
    for name, _shape, _texture, hue in CLASS_SPECS:
        family = name.split("_")[0]
        value = 0.5 if family in families else 1.0
        families.add(family)
        colours.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 1.0, value)))
    return np.array(colours, dtype=np.uint8)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> None:
    """``fig`` as a PNG of at most 256 colours (an adaptive palette: a quarter of the bytes of the RGB file,
    the same picture to the eye — the README ships these figures)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(fig)
    buffer.seek(0)
    with Image.open(buffer) as picture:
        indexed = picture.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                  dither=Image.Dither.NONE)
    with atomic_write(path) as handle:
        indexed.save(handle, format="PNG", optimize=True)


def _percent(value) -> float:
    return math.nan if value is None else 100.0 * value


def plot_miou_panels(path, steps, draw, title: str = "") -> None:
    """One figure, three panels (old / new / all mIoU in %, ``METRICS``), x = ``steps``: ``draw(ax, key)``
    draws one panel's lines (with legend labels); the panels, the shared legend and ``title`` are laid out
    here, and the figure is written atomically to ``path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.3), sharey=True)
    for ax, (key, label) in zip(axes, METRICS):
        draw(ax, key)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(steps)
        ax.set_xlabel("step")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU (%)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, path, dpi=80)


def plot_comparison(path, results: dict[str, list[dict]], joint: dict | None = None, title: str = "") -> None:
    """``plot_miou_panels`` with one line per method of ``results`` (method → its metrics records); ``joint``
    (a record with ``miou_old``/``miou_new``/``miou_all`` of the joint upper bound, scored with the last
    step's old/new split) is drawn as a dashed level."""

    def draw(ax, key):
        for method, records in results.items():
            records = sorted(records, key=lambda r: r["step"])
            ax.plot([r["step"] for r in records], [_percent(r[key]) for r in records], label=method, lw=2,
                    **METHOD_STYLES.get(method, {}))
        if joint is not None and joint.get(key) is not None:
            ax.axhline(_percent(joint[key]), color="0.35", ls="--", lw=1.2, label="joint (upper bound)")

    plot_miou_panels(path, sorted({r["step"] for records in results.values() for r in records}), draw, title)


def colourise(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class map (255 = void) → (H, W, 3) uint8 with ``palette`` (see ``class_palette``)."""
    labels = np.asarray(labels)
    if labels.size and labels[labels != 255].max(initial=0) >= len(palette):
        raise ValueError(f"the palette covers classes 0..{len(palette) - 1}, got {labels.max()}")
    rgb = palette[np.where(labels == 255, 0, labels)]
    rgb[labels == 255] = VOID_COLOUR
    return rgb


def save_comparison_grid(path, images: torch.Tensor, labels: torch.Tensor, predictions: dict[str, torch.Tensor],
                         class_names, palette, mean, std, title: str = "") -> None:
    """``comparison_grid`` (same arguments) written to ``path`` as a PNG."""
    _save(comparison_grid(images, labels, predictions, class_names, palette, mean, std, title), path, dpi=80)


def comparison_grid(images: torch.Tensor, labels: torch.Tensor, predictions: dict[str, torch.Tensor],
                    class_names, palette, mean, std, title: str = ""):
    """The prediction grid as a matplotlib figure. Rows: validation images; columns, titled: the image
    (normalisation undone), its ground truth (void band white), then each method's prediction
    (``predictions``: method → (B, H, W)), coloured with ``palette`` (``class_palette``); a legend names the
    colour of every class that appears in the grid as "<index> <name>" (``class_names``, by index), then
    the void.

    Args:
        images: (B, 3, H, W) normalised images; labels: (B, H, W) ground truth in the dataset's indices.
        predictions: column title → (B, H, W) predicted classes.
        class_names: the dataset's class names by index; palette: (classes, 3) uint8 colours.
        mean, std: the normalisation to undo; title: the figure's title.

    Returns:
        The ``matplotlib.figure.Figure`` (``_save`` writes and closes it).
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    columns = ["image", "ground truth", *predictions]
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.55 * len(columns) + 1.6, 1.55 * rows + 0.4),
                             squeeze=False)
    shown = set()
    for i in range(rows):
        rgb = ((images[i].cpu().float() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        maps = [labels[i].cpu().numpy(), *(p[i].cpu().numpy() for p in predictions.values())]
        for m in maps:
            shown.update(int(c) for c in np.unique(m) if c != 255)
        for j, picture in enumerate([rgb, *(colourise(m, palette) for m in maps)]):
            ax = axes[i][j]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=9)
    handles = [Patch(facecolor=palette[c] / 255.0, edgecolor="0.5", label=f"{c} {class_names[c]}")
               for c in sorted(shown)]
    handles.append(Patch(facecolor="white", edgecolor="0.5", label="void (not scored)"))
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (1.55 * len(columns) + 1.6), 1))
    return fig


def spread_indices(total: int, count: int) -> list[int]:
    """``min(count, total)`` indices of ``range(total)`` spread evenly from the first to the last (the
    prediction grids' images: a set cut from videos holds runs of near-identical frames)."""
    count = min(count, total)
    return sorted({int(i) for i in np.linspace(0, total - 1, count).round()}) if count > 0 else []


def first_step_split(record: dict, task) -> dict:
    """old / new / all mIoU of a record holding every class of ``task`` (the joint upper bound's single
    step), with the papers' split: old = the classes of step 0 (background included), new = every class
    added after it; classes without an IoU (no ground-truth pixel) are left out of the means."""
    ious = record["per_class_iou"]
    first = set(task[0])

    def mean(classes):
        values = [ious[c] for c in classes if ious[c] is not None]
        return sum(values) / len(values) if values else None

    everything = range(len(ious))
    return {"miou_old": mean([c for c in everything if c in first]),
            "miou_new": mean([c for c in everything if c not in first]), "miou_all": mean(everything)}


def pick_comparison_images(image_labels: dict, task, count: int) -> list[str]:
    """``count`` validation ids (sorted order) for the prediction grid: first the images holding both a
    class of the last step and a foreground class of step 0 (where forgetting and learning both show),
    then images with any class added after step 0, then any."""
    last, first = set(task[-1]), set(task[0]) - {0}
    later = {c for step in task[1:] for c in step}
    ids = sorted(image_labels)

    def having(predicate):
        return [i for i in ids if predicate(set(image_labels[i]))]

    ordered = having(lambda s: bool(s & last) and bool(s & first)) + having(lambda s: bool(s & later)) + ids
    return list(dict.fromkeys(ordered))[:count]
