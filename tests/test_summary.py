"""``incrementer-fast summary``: old / new / all mIoU per step, mean ± std over runs of one task."""
import csv
import json
import shutil
import statistics

import pytest
import torch
from PIL import Image

from folder_data import write_folder_dataset
from incrementer_fast.cli import main

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
