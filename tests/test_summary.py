"""``incrementer-fast summary``: old / new / all mIoU per step, mean ± std over runs of one task."""
import csv
import json
import shutil
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from folder_data import write_folder_dataset
from incrementer_fast.cli import main
from incrementer_fast.continual.config import TrainConfig
from incrementer_fast.continual.summary import format_summary, summarize_runs
from incrementer_fast.errors import InputError

TINY = ["--dataset", "folder", "--img-size", "32", "--crop-size", "32", "--val-size", "32", "--backbone",
        "test_vit", "--no-pretrained", "--task", "2-1", "--epochs", "1", "--epochs-incremental", "1",
        "--batch-size", "4", "--eval-batch-size", "4", "--num-visualised", "1", "--num-workers", "0",
        "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("summary")
    data = write_folder_dataset(root / "data")
    dirs = []
    for seed in (0, 1):
        out = root / f"seed{seed}"
        assert main(["train", "--out", str(out), "--data-root", str(data), *TINY, "--seed", str(seed)]) == 0
        dirs.append(out)
    torch.set_num_threads(previous)
    return dirs


def test_summary_of_two_seeds(runs, tmp_path, capsys):
    out = tmp_path / "summary"
    assert main(["summary", *map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 runs (seeds [0, 1])" in printed and "±" in printed
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads((run / "metrics.json").read_text()) for run in runs]
    assert [s["step"] for s in summary["steps"]] == [0, 1]
    for s in summary["steps"]:
        for key in ("miou_old", "miou_all") + (("miou_new",) if s["step"] else ()):
            values = [r[s["step"]][key] for r in records]
            assert s[key]["values"] == values
            assert s[key]["mean"] == pytest.approx(statistics.fmean(values))
            assert s[key]["std"] == pytest.approx(statistics.stdev(values))
    assert summary["steps"][0]["miou_new"]["mean"] is None  # nothing is new at step 0
    assert records[0][1]["miou_all"] != records[1][1]["miou_all"]  # the seeds gave different runs
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[1]["miou_all_mean"]) == pytest.approx(summary["steps"][1]["miou_all"]["mean"], abs=1e-6)
    with Image.open(out / "summary.png") as figure:
        assert figure.size[0] > 300


def test_summary_refuses_runs_of_different_tasks_or_steps(runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    stored = json.loads((other / "config.json").read_text())
    stored["config"]["setting"] = "disjoint"
    (other / "config.json").write_text(json.dumps(stored))
    assert main(["summary", str(runs[0]), str(other), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "is not the same task" in err and "setting: 'overlapped'" in err and len(err.strip().splitlines()) == 1
    shorter = tmp_path / "shorter"
    shutil.copytree(runs[1], shorter)
    (shorter / "metrics.json").write_text(json.dumps(json.loads((shorter / "metrics.json").read_text())[:1]))
    assert main(["summary", str(runs[0]), str(shorter), "--out", str(tmp_path / "s")]) == 2
    assert "finished steps [0]" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# Known numbers: mIoU (old, new, all) of three runs after steps 0 and 1 (step 0 has nothing new).
KNOWN = {0: [(0.70, None, 0.70), (0.50, 0.20, 0.40)],
         1: [(0.72, None, 0.72), (0.46, 0.30, 0.41)],
         2: [(0.65, None, 0.65), (0.55, 0.10, 0.37)]}


def fake_run(folder, seed, evaluation=None, **config_changes):
    """A run directory holding only what summary reads: config.json (with ``evaluation``, the validation
    set's fingerprint, when given) and metrics.json (KNOWN[seed])."""
    folder.mkdir(parents=True)
    config = TrainConfig.demo(seed=seed, **config_changes).to_dict()
    (folder / "config.json").write_text(json.dumps({"config": config, "evaluation": evaluation}))
    records = [{"step": step, "miou_old": old, "miou_new": new, "miou_all": all_}
               for step, (old, new, all_) in enumerate(KNOWN[seed])]
    (folder / "metrics.json").write_text(json.dumps(records))
    return folder


def test_summary_mean_and_std_are_numpys_on_known_numbers(tmp_path):
    runs = [fake_run(tmp_path / f"seed{seed}", seed, class_order="random:%d" % seed, num_workers=seed)
            for seed in KNOWN]  # seeds, orders and where a run went may differ
    summary = summarize_runs(runs)
    assert summary["seeds"] == [0, 1, 2] and summary["class_orders"] == ["random:0", "random:1", "random:2"]
    for step in (0, 1):
        for column, key in enumerate(("miou_old", "miou_new", "miou_all")):
            values = [KNOWN[seed][step][column] for seed in KNOWN]
            stats = summary["steps"][step][key]
            assert stats["values"] == values
            if None in values:
                assert stats["mean"] is None and stats["std"] is None
            else:
                assert stats["mean"] == pytest.approx(np.mean(values), rel=1e-12)
                assert stats["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)  # the sample std
    assert summary["steps"][1]["miou_new"]["std"] == pytest.approx(0.1)  # 0.2, 0.3, 0.1
    row = format_summary(summary).splitlines()[-1]
    assert row.split("|")[2].strip() == "20.0 ± 10.0"
    single = summarize_runs(runs[:1])["steps"][1]["miou_all"]
    assert single["mean"] == 0.40 and single["std"] is None  # one run: no spread


@pytest.mark.parametrize("field, value", [("task", "4-4"), ("method", "finetune"), ("dataset", "voc"),
                                          ("epochs", 3), ("lr_incremental", 0.01)])
def test_summary_refuses_runs_of_another_task(tmp_path, field, value):
    first = fake_run(tmp_path / "a", 0)
    other = fake_run(tmp_path / "b", 1, **{field: value})
    with pytest.raises(InputError, match=f"is not the same task as .*{field}: "):
        summarize_runs([first, other])


def test_summary_refuses_runs_scored_on_another_validation_set(tmp_path):
    first = fake_run(tmp_path / "a", 0, {"val_images": 12, "val_sha256": "ab" * 32})
    same = fake_run(tmp_path / "b", 1, {"val_images": 12, "val_sha256": "ab" * 32})
    other = fake_run(tmp_path / "c", 2, {"val_images": 12, "val_sha256": "cd" * 32}, data_root="/elsewhere")
    assert summarize_runs([first, same])["seeds"] == [0, 1]
    with pytest.raises(InputError, match="scored on another validation set .* sha256 cdcdcdcdcdcd vs 12, abababababab"):
        summarize_runs([first, same, other])


def test_summary_refuses_two_runs_of_the_same_seed_and_order(tmp_path, capsys):
    first = fake_run(tmp_path / "a", 0)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    for pair in ([first, copy], [first, first]):  # a copy, or one folder given twice: std 0 from one run
        argv = ["summary", *map(str, pair), "--out", str(tmp_path / "s")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"incrementer-fast summary: error: {pair[0]} and {pair[1]} are the same run configuration "
                       "(seed 0, class order None): a summary needs runs of different seeds or class orders; "
                       "leave one out"], err
    assert not (tmp_path / "s").exists()
    other_order = fake_run(tmp_path / "b", 0, class_order="random:1")
    assert summarize_runs([first, other_order])["class_orders"] == [None, "random:1"]
