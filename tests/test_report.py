"""The comparison figures (incrementer_fast/continual/report.py): the joint split, the choice of images (the
demo's, and the run grids' spread over the validation set), the class colours, the grid's titled columns
and class legend, and that both figures are written as PNGs."""
import numpy as np
import pytest
import torch
from PIL import Image

from incrementer_fast.continual.report import (class_palette, colourise, comparison_grid, first_step_split,
                                                pick_comparison_images, plot_comparison, save_comparison_grid,
                                                spread_indices)
from incrementer_fast.continual.synthetic import CLASS_NAMES


def test_first_step_split_uses_the_classes_of_step_0_and_skips_classes_without_iou():
    record = {"per_class_iou": [0.9, 0.5, None, 0.3, 0.1]}
    split = first_step_split(record, [[0, 1, 2], [3], [4]])
    assert split["miou_old"] == pytest.approx((0.9 + 0.5) / 2)  # class 2 has no ground truth: left out
    assert split["miou_new"] == pytest.approx((0.3 + 0.1) / 2)
    assert split["miou_all"] == pytest.approx((0.9 + 0.5 + 0.3 + 0.1) / 4)


def test_comparison_images_show_old_and_last_classes_first():
    labels = {"a": [0, 1], "b": [0, 4], "c": [0, 1, 4], "d": [0, 3], "e": [0]}
    task = [[0, 1, 2], [3], [4]]
    assert pick_comparison_images(labels, task, 3) == ["c", "b", "d"]
    assert pick_comparison_images(labels, task, 10) == ["c", "b", "d", "a", "e"]


def test_synthetic_palette_is_one_distinct_colour_per_class_and_void_is_white():
    palette = class_palette("synthetic")
    assert palette.shape == (len(CLASS_NAMES), 3)
    assert len({tuple(c) for c in palette}) == len(CLASS_NAMES)
    rgb = colourise(np.array([[0, 1], [255, 12]]), palette)
    assert rgb[1, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == palette[1].tolist()
    with pytest.raises(ValueError, match="palette covers classes 0..12"):
        colourise(np.array([[13]]), palette)


def test_both_figures_are_written(tmp_path):
    def record(step, old, new):
        return {"step": step, "miou_old": old, "miou_new": new, "miou_all": new if old is None else (old + new) / 2}

    plot_comparison(tmp_path / "comparison.png",
                    {"incrementer": [record(0, None, 0.6), record(1, 0.5, 0.4)],
                     "finetune": [record(0, None, 0.6), record(1, 0.1, 0.5)]},
                    {"miou_old": 0.7, "miou_new": 0.6, "miou_all": 0.65}, title="t")
    images = torch.zeros(2, 3, 16, 16)
    labels = torch.randint(0, 13, (2, 16, 16))
    labels[:, 0] = 255
    save_comparison_grid(tmp_path / "predictions.png", images, labels,
                         {"incrementer": labels.clamp(max=12), "finetune": torch.zeros(2, 16, 16, dtype=torch.long)},
                         CLASS_NAMES, class_palette("synthetic"), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), title="t")
    for name in ("comparison.png", "predictions.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100
    assert not list(tmp_path.glob(".*.tmp"))


def test_grid_images_are_spread_evenly_over_the_validation_set():
    assert spread_indices(10, 4) == [0, 3, 6, 9]
    assert spread_indices(100, 5) == [0, 25, 50, 74, 99]
    assert spread_indices(3, 8) == [0, 1, 2]  # fewer images than asked: all of them
    assert spread_indices(7, 1) == [0] and spread_indices(0, 4) == [] and spread_indices(5, 0) == []
    for total in range(1, 40):
        for count in range(1, total + 1):
            picks = spread_indices(total, count)
            gaps = np.diff(picks)
            assert len(picks) == count and picks[0] == 0
            assert count < 2 or picks[-1] == total - 1 and gaps.max() - gaps.min() <= 1, (total, count, picks)  # even spacing


def test_grid_columns_are_titled_and_the_legend_names_the_classes_shown():
    names = ("background", "road", "car", "person", "sky")
    labels = torch.tensor([[[0, 1], [255, 3]], [[0, 0], [1, 1]]]).repeat_interleave(4, 1).repeat_interleave(4, 2)
    prediction = torch.tensor([[[0, 1], [4, 3]], [[0, 0], [1, 1]]]).repeat_interleave(4, 1).repeat_interleave(4, 2)
    figure = comparison_grid(torch.zeros(2, 3, 8, 8), labels, {"prediction": prediction}, names,
                             class_palette("folder", len(names)), (0.5,) * 3, (0.25,) * 3, title="after step 1")
    try:
        rows = [[ax.get_title() for ax in figure.axes[i * 3:(i + 1) * 3]] for i in range(2)]
        assert rows == [["image", "ground truth", "prediction"], ["", "", ""]]
        [legend] = figure.legends
        # every class in the ground truth or the prediction (class 2 appears in neither), then the void
        assert [t.get_text() for t in legend.get_texts()] == ["0 background", "1 road", "3 person", "4 sky",
                                                              "void (not scored)"]
        palette = class_palette("folder", len(names))
        assert [tuple(np.round(np.array(p.get_facecolor()[:3]) * 255).astype(int)) for p in legend.get_patches()[:4]] \
            == [tuple(int(v) for v in palette[c]) for c in (0, 1, 3, 4)]
        assert figure.get_suptitle() == "after step 1"
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
