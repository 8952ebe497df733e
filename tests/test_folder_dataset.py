"""``--dataset folder``: your own data in the documented layout, class orders, their errors and results.

The datasets are a few 32² JPEG/PNG images written by PIL (tests/folder_data.py); the runs use timm's
``test_vit`` through ``incrementer-fast train`` (``cli.main``), two steps of one or two epochs.
"""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from folder_data import CLASSES, write_folder_dataset
from incrementer_fast.cli import main
from incrementer_fast.continual import run as run_module
from incrementer_fast.continual.folder import FolderSegmentation, label_lut, read_class_names
from incrementer_fast.continual.orders import PLOP_VOC_ORDERS, ClassOrder, resolve_class_order
from incrementer_fast.errors import InputError

TINY = ["--dataset", "folder", "--img-size", "32", "--crop-size", "32", "--val-size", "32", "--backbone",
        "test_vit", "--no-pretrained", "--task", "2-1", "--epochs", "1", "--epochs-incremental", "1",
        "--batch-size", "4", "--eval-batch-size", "4", "--num-visualised", "2", "--num-workers", "0",
        "--device", "cpu", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # One grayscale training image (converted to RGB when loaded; the run logs it).
    return write_folder_dataset(tmp_path_factory.mktemp("folder") / "data", grayscale=(1,))


def train(out, root, *extra):
    return main(["train", "--out", str(out), "--data-root", str(root), *TINY, *map(str, extra)])


def one_line_error(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return code, err[0]


GRIDS = []  # what the ordered run passed to the prediction grids' writer, one entry per step
MIOU_TITLES = []  # the titles the ordered run gave miou.png, one per finished step


@pytest.fixture(scope="module")
def ordered_run(data, tmp_path_factory):
    """Both steps of task 2-1 with the class order 0,3,1,2: step 0 learns 0, 3, 1 and step 1 learns 2."""
    out = tmp_path_factory.mktemp("ordered") / "run"
    write_grid = run_module.save_comparison_grid

    def record_grid(path, images, labels, predictions, class_names, *args, **kwargs):
        GRIDS.append(dict(name=path.name, labels=labels.clone(), predictions={k: v.clone() for k, v in
                                                                              predictions.items()},
                          class_names=tuple(class_names), title=kwargs.get("title")))
        write_grid(path, images, labels, predictions, class_names, *args, **kwargs)

    plot_miou = run_module.plot_miou

    def record_miou_title(out_dir, records, title=""):
        MIOU_TITLES.append(title)
        plot_miou(out_dir, records, title)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "save_comparison_grid", record_grid)
        patch.setattr(run_module, "plot_miou", record_miou_title)
        assert train(out, data, "--class-order", "0,3,1,2") == 0
    return out


def test_two_steps_train_on_a_folder_dataset_with_the_class_names(ordered_run):
    records = json.loads((ordered_run / "metrics.json").read_text())
    assert [r["step"] for r in records] == [0, 1]
    assert all(r["train_images"] > 0 and r["val_images"] > 0 for r in records)
    launch = json.loads((ordered_run / "config.json").read_text())["launch"]
    assert launch["class_names"] == list(CLASSES)
    log = (ordered_run / "run.log").read_text()
    assert "train: 1 grayscale/CMYK image(s) converted to RGB when loaded: img001" in log
    assert "step 0: classes [0, 3, 1] (background, blue box, red box)" in log
    assert "step 1: classes [2] (green box)" in log
    with open(ordered_run / "per_class_iou.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    records = json.loads((ordered_run / "metrics.json").read_text())
    assert [(row["class"], row["name"]) for row in table] == [(str(c), name) for c, name in enumerate(CLASSES)]
    assert table[2]["step_0"] == "" and float(table[2]["step_1"]) == pytest.approx(records[1]["per_class_iou"][2],
                                                                                 abs=1e-6)
    assert float(table[3]["step_0"]) == pytest.approx(records[0]["per_class_iou"][3], abs=1e-6)
    with Image.open(ordered_run / "predictions_step1.png") as grid:
        assert grid.size[0] > grid.size[1] * 0.8  # three titled columns and the legend beside them


def test_prediction_grids_show_the_class_names_and_images_spread_over_the_val_split(ordered_run, data):
    assert [g["name"] for g in GRIDS] == ["predictions_step0.png", "predictions_step1.png"]
    for grid in GRIDS:
        assert grid["class_names"] == CLASSES and list(grid["predictions"]) == ["prediction"]
        assert set(grid["predictions"]["prediction"].unique().tolist()) <= {0, 1, 2, 3}
    step0, step1 = GRIDS
    assert [g["title"] for g in GRIDS] == [
        f"incrementer on folder 2-1, class order 0,3,1,2, after step {step}: {seen} classes seen"
        for step, seen in ((0, 3), (1, 4))]
    assert MIOU_TITLES == ["incrementer on folder 2-1, class order 0,3,1,2"] * 2
    assert 2 not in step0["labels"].unique().tolist() and 3 in step0["labels"]  # class 2 is unseen at step 0
    # Step 1 has seen every class and scores the 4 val images: the grid shows the first and the last, in the
    # dataset's own indices (the order 0,3,1,2 undone).
    assert json.loads((ordered_run / "metrics.json").read_text())[1]["val_images"] == 4
    val_ids = (data / "splits" / "val.txt").read_text().split()
    expected = [np.asarray(Image.open(data / "labels" / f"{val_ids[i]}.png")) for i in (0, 3)]
    assert step1["labels"].tolist() == [e.tolist() for e in expected]


def test_eval_names_the_classes_of_its_record(ordered_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", str(ordered_run), "--step", "1", "--quiet", "--output",
                 str(ordered_run.parent / "eval.json")]) == 0
    record = json.loads(capsys.readouterr().out)
    stored = json.loads((ordered_run / "metrics.json").read_text())[1]
    assert record["class_names"] == list(CLASSES) and record["per_class_iou"] == stored["per_class_iou"]
    assert record["eval_mode"] == "resize" and record["val_size"] == 32  # how it scored (TINY's --val-size)


def test_class_order_steps_metrics_and_tables_keep_the_dataset_indices(ordered_run):
    records = json.loads((ordered_run / "metrics.json").read_text())
    assert [r["classes"] for r in records] == [[0, 3, 1], [2]]
    step0, step1 = records
    assert len(step0["per_class_iou"]) == len(CLASSES)
    assert step0["per_class_iou"][2] is None  # class 2 (green box) arrives at step 1
    assert step0["per_class_iou"][3] is not None and step1["per_class_iou"][2] is not None
    launch = json.loads((ordered_run / "config.json").read_text())["launch"]
    assert launch["task_steps"] == [[0, 3, 1], [2]] and launch["class_order"] == [0, 3, 1, 2]
    with open(ordered_run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["classes"] == "0 3 1" and rows[1]["classes"] == "2"
    assert rows[0]["iou_2"] == "" and float(rows[1]["iou_2"]) == pytest.approx(step1["per_class_iou"][2], abs=1e-6)


def test_an_order_trains_what_the_relabelled_dataset_trains(ordered_run, data, tmp_path):
    """The order 0,3,1,2 on the dataset is the plain label order on a copy whose label files hold positions
    (3 → 1, 1 → 2, 2 → 3): the same numbers, class by class."""
    relabelled = tmp_path / "relabelled"
    shutil.copytree(data, relabelled)
    position = np.array([0, 2, 3, 1] + list(range(4, 255)) + [255], dtype=np.uint8)
    for path in (relabelled / "labels").iterdir():
        with Image.open(path) as label:
            Image.fromarray(position[np.asarray(label)]).save(path)
    out = tmp_path / "run"
    assert train(out, relabelled) == 0
    plain = json.loads((out / "metrics.json").read_text())
    ordered = json.loads((ordered_run / "metrics.json").read_text())
    for a, b in zip(plain, ordered):
        assert [a[k] for k in ("miou_old", "miou_new", "miou_all")] == [b[k] for k in ("miou_old", "miou_new", "miou_all")]
        assert [a["per_class_iou"][position[c]] if position[c] < len(a["per_class_iou"]) else None
                for c in range(4)] == b["per_class_iou"]


@pytest.mark.parametrize("fault, message", [
    ("no_classes", "class list (one class name per line, the background first) not found"),
    ("label_outside", "holds values [7] outside the classes 0..3"),
    ("no_label", "label of image img001.png not found"),
    ("duplicate_id", "lists 'img000' twice"),
    ("two_images", "two images of the id 'img000'"),
    ("empty_class_line", "line 2 is empty"),
    ("val_label_outside", "holds values [9] outside the classes 0..3"),
    ("size_mismatch", "is 32x32 but its label"),
    ("unreadable_image", "cannot read image"),
    ("no_val_split", "split list not found"),
    ("both_splits_bad", "holds values [7] outside the classes 0..3 and the void 255: fix or replace the file, or "
                        "remove its id from the split; the val split also has 1 bad file"),
    ("jpeg_label_named_png", "labels/img002.png is a JPEG file (lossy: it corrupts class indices): save labels as PNG"),
    ("jpeg_label_only", "found img001.jpg: labels must be PNG"),
])
def test_bad_folders_give_one_line_errors_and_write_nothing(fault, message, data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    if fault == "no_classes":
        (root / "classes.txt").unlink()
    elif fault == "label_outside":
        label = np.zeros((32, 32), dtype=np.uint8)
        label[5, 5] = 7
        Image.fromarray(label).save(root / "labels" / "img002.png")
    elif fault == "both_splits_bad":  # both splits are scanned: the error counts the val split's bad files too
        label = np.zeros((32, 32), dtype=np.uint8)
        label[5, 5] = 7
        Image.fromarray(label).save(root / "labels" / "img002.png")
        Image.fromarray(label).save(root / "labels" / "img010.png")
    elif fault == "val_label_outside":  # the train split is good: its scan must not be cached in --out either
        label = np.zeros((32, 32), dtype=np.uint8)
        label[3, 3] = 9
        Image.fromarray(label).save(root / "labels" / "img010.png")
    elif fault == "size_mismatch":
        Image.fromarray(np.zeros((16, 32), dtype=np.uint8)).save(root / "labels" / "img003.png")
    elif fault == "unreadable_image":
        (root / "images" / "img011.png").write_bytes(b"not a PNG")
    elif fault == "no_val_split":
        (root / "splits" / "val.txt").unlink()
    elif fault == "no_label":
        (root / "labels" / "img001.png").unlink()
    elif fault == "duplicate_id":
        with open(root / "splits" / "train.txt", "a") as handle:
            handle.write("img000\n")
    elif fault == "two_images":
        shutil.copy(root / "images" / "img000.jpg", root / "images" / "img000.png")
    elif fault == "jpeg_label_named_png":
        with Image.open(root / "labels" / "img002.png") as label:
            label.convert("L").save(root / "labels" / "img002.png", format="JPEG")
    elif fault == "jpeg_label_only":
        path = root / "labels" / "img001.png"
        with Image.open(path) as label:
            label.convert("L").save(path.with_suffix(".jpg"))
        path.unlink()
    elif fault == "empty_class_line":
        (root / "classes.txt").write_text("background\n\nred box\n")
    out = tmp_path / "run"
    code, line = one_line_error(["train", "--out", out, "--data-root", root, *TINY], capsys)
    assert code == 2 and message in line, line
    assert not out.exists()


def test_bad_class_orders_are_refused_before_anything_is_written(data, tmp_path, capsys):
    for order, message in (("0,1,2", "missing [3]"), ("1,0,2,3", "starts with 1"), ("0,1,1,2", "repeated [1]"),
                           ("15-5s_b", "unknown order name"), ("random:x", "integer seed")):
        code, line = one_line_error(["train", "--out", tmp_path / "run", "--data-root", data, *TINY,
                                     "--class-order", order], capsys)
        assert code == 2 and message in line, (order, line)
    assert not (tmp_path / "run").exists()


def test_published_and_random_orders():
    for name, text in PLOP_VOC_ORDERS.items():
        order = resolve_class_order(name, "voc", 21)
        assert order[0] == 0 and sorted(order) == list(range(21)), name
    assert len(PLOP_VOC_ORDERS) == 22 and set(PLOP_VOC_ORDERS) == {f"15-5s_{c}" for c in "bcdefghijklmnopqrstuvw"}
    # PLOP's tasks.py, tasks_voc["15-5s_b"]: step 0 [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11],
    # then [17], [3], [6], [18], [10].
    assert resolve_class_order("15-5s_b", "voc", 21)[:3] == [0, 12, 9]
    assert resolve_class_order("15-5s_b", "voc", 21)[16:] == [17, 3, 6, 18, 10]
    first, again, other = (resolve_class_order(f"random:{s}", "ade", 151) for s in (3, 3, 4))
    assert first == again != other and first[0] == 0 and sorted(first) == list(range(151))
    assert resolve_class_order(None, "voc", 21) is None


def test_class_order_maps_labels_and_records_both_ways():
    order = ClassOrder([0, 3, 1, 2])
    labels = torch.tensor([[0, 1, 2, 3, 255]])
    positions = order.to_positions(labels)
    assert positions.tolist() == [[0, 2, 3, 1, 255]]
    assert order.to_dataset(positions).tolist() == labels.tolist()
    record = order.record_to_dataset({"classes": [0, 1, 2], "per_class_iou": [0.9, 0.3, 0.5]})
    assert record["classes"] == [0, 3, 1] and record["per_class_iou"] == [0.9, 0.5, None, 0.3]


def test_ignore_index_and_label_map(data, tmp_path):
    assert read_class_names(data) == CLASSES
    lut = label_lut(4, ignore_index=0)
    assert lut[0] == 255 and lut[3] == 3 and lut[255] == 255
    mapping = tmp_path / "map.txt"
    mapping.write_text("# Cityscapes-like ids\n0 0\n7 1\n8 2 # sidewalk\n11 3\n")
    lut = label_lut(4, label_map=mapping)
    assert [int(lut[v]) for v in (0, 7, 8, 11, 5, 255)] == [0, 1, 2, 3, 255, 255]
    root = tmp_path / "cityscapes_like"
    shutil.copytree(data, root)
    ids = np.array([0, 7, 8, 11] + [5] * 251 + [255], dtype=np.uint8)
    for path in (root / "labels").iterdir():
        with Image.open(path) as label:
            Image.fromarray(ids[np.asarray(label)]).save(path)
    mapped = FolderSegmentation(root, "train", label_map=mapping, cache_dir=tmp_path / "cache")
    plain = FolderSegmentation(data, "train", cache_dir=tmp_path / "cache")
    assert mapped.scan().labels == plain.scan().labels
    assert torch.equal(mapped[0][1], plain[0][1])
    with pytest.raises(InputError, match="outside the classes"):
        FolderSegmentation(root, "train", cache_dir=tmp_path / "cache").scan()
    bad = tmp_path / "bad_map.txt"
    bad.write_text("7 9\n")
    with pytest.raises(ValueError, match="line 1: SOURCE must lie in 0..255 and TARGET be a class 0..3"):
        label_lut(4, label_map=bad)


def test_the_documented_cityscapes_label_map(tmp_path):
    """docs/datasets.md's map: Cityscapes' 19 training classes (label ids 7 … 33) shifted by one, 0 free for the
    background, everything else void."""
    docs = (Path(__file__).parents[1] / "docs" / "datasets.md").read_text()
    block = docs.split("```\n# cityscapes_map.txt", 1)[1].split("```", 1)[0]
    mapping = tmp_path / "cityscapes_map.txt"
    mapping.write_text("# cityscapes_map.txt" + block)
    lut = label_lut(20, label_map=mapping)
    train_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    assert [int(lut[v]) for v in train_ids] == list(range(1, 20))
    assert all(lut[v] == 255 for v in range(256) if v not in train_ids)


def test_a_byte_order_mark_is_not_part_of_a_class_name_or_a_label_map(data, tmp_path):
    """Windows editors start UTF-8 files with a BOM: it must not become part of class 0's name."""
    root = tmp_path / "data"
    shutil.copytree(data, root)
    (root / "classes.txt").write_bytes(b"\xef\xbb\xbf" + "\n".join(CLASSES).encode() + b"\n")
    assert read_class_names(root) == CLASSES
    mapping = tmp_path / "map.txt"
    mapping.write_bytes(b"\xef\xbb\xbf0 0\n7 1\n")
    lut = label_lut(4, label_map=mapping)
    assert [int(lut[v]) for v in (0, 7, 1)] == [0, 1, 255]


def test_the_data_root_hint_only_follows_a_file_missing_under_the_data_root(data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    bad_map = tmp_path / "map.txt"
    bad_map.write_text("0 0\n1 9\n")
    out = tmp_path / "run"
    base = ["train", "--out", out, "--data-root", root, *TINY]
    for extra, message in ((["--label-map", tmp_path / "absent.txt"], "a path relative to the working directory"),
                           (["--label-map", bad_map], "line 2: SOURCE must lie in 0..255"),
                           (["--ignore-index", "300"], "--ignore-index must lie in 0..255")):
        code, line = one_line_error([*base, *extra], capsys)
        assert code == 2 and message in line and "--data-root" not in line, line
    with open(root / "splits" / "train.txt", "a") as handle:
        handle.write("img000\n")
    code, line = one_line_error(base, capsys)
    assert code == 2 and "lists 'img000' twice" in line and "--data-root" not in line, line
    (root / "splits" / "train.txt").write_text("img000\nimg001\n")
    (root / "labels" / "img001.png").unlink()
    code, line = one_line_error(base, capsys)
    assert code == 2 and line.endswith("img001.png (check --data-root)"), line
    assert not out.exists()


def test_a_class_no_label_holds_is_named_in_the_log(data, tmp_path):
    mapping = tmp_path / "map.txt"  # drops class 2: its pixels become void
    mapping.write_text("0 0\n1 1\n3 3\n")
    out = tmp_path / "run"
    assert train(out, data, "--label-map", mapping, "--step", "0") == 0
    log = (out / "run.log").read_text()
    for split in ("training", "validation"):
        assert f"no {split} label holds the class(es) 2 {CLASSES[2]!r} of {data / 'classes.txt'}" in log, log
