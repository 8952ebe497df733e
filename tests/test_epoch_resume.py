"""Resume inside a step: a run killed in the middle of step 1, after an epoch checkpoint, continues from it
with ``--resume`` and ends with the metrics and weights of an uninterrupted run, bit for bit on the CPU, without
training a finished epoch again."""
import csv
import json

import pytest
import torch

import incrementer_fast.continual.run as run_module
import incrementer_fast.continual.train as train_module
from folder_data import write_folder_dataset
from incrementer_fast.cli import main
from incrementer_fast.continual.epoch_state import epoch_checkpoint_path, load_epoch_state
from incrementer_fast.continual.logs import RunReports
from incrementer_fast.errors import CheckpointError

TINY = ["--dataset", "folder", "--img-size", "32", "--crop-size", "32", "--val-size", "32", "--backbone",
        "test_vit", "--no-pretrained", "--task", "2-1", "--epochs", "1", "--epochs-incremental", "3",
        "--batch-size", "4", "--eval-batch-size", "4", "--num-visualised", "1", "--num-workers", "0",
        "--device", "cpu", "--quiet"]


class Killed(BaseException):
    """The process dying (not an Exception: nothing in the run may catch it)."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("resume") / "data")


def train(out, data, *extra):
    return main(["train", "--out", str(out), "--data-root", str(data), *TINY, *extra])


def without_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


# mib and plop: their old class tokens train; plop's POD hooks and thresholds come back with the resumed step,
# mib has no thresholds.
@pytest.mark.parametrize("method", ["incrementer", "mib", "plop"])
def test_a_run_killed_in_step_1_resumes_after_its_last_epoch_and_matches_an_uninterrupted_one(
        data, tmp_path, monkeypatch, capsys, method):
    reference = tmp_path / "reference"
    assert train(reference, data, "--method", method) == 0
    assert not epoch_checkpoint_path(reference, 0).exists() and not epoch_checkpoint_path(reference, 1).exists()

    # Kill the run in the middle of step 1's epoch 3, after its epoch-2 checkpoint was written.
    out = tmp_path / "run"
    saved = []
    save = run_module.save_epoch_state
    compute_losses = train_module.compute_losses

    def save_and_note(path, state):
        save(path, state)
        saved.append((state["step"], state["epoch"]))

    def dying_losses(*args, **kwargs):
        if saved and saved[-1] == (1, 2):
            raise Killed
        return compute_losses(*args, **kwargs)

    monkeypatch.setattr(run_module, "save_epoch_state", save_and_note)
    monkeypatch.setattr(train_module, "compute_losses", dying_losses)
    with pytest.raises(Killed):
        train(out, data, "--method", method)
    assert saved == [(0, 1), (1, 1), (1, 2)]
    assert (out / "step_0.pt").exists() and not (out / "step_1.pt").exists()
    assert [r["step"] for r in json.loads((out / "metrics.json").read_text())] == [0]
    assert not epoch_checkpoint_path(out, 0).exists()  # step 0 is finished: its epoch checkpoint is gone
    assert load_epoch_state(epoch_checkpoint_path(out, 1), {"step": 1})["epoch"] == 2

    monkeypatch.setattr(train_module, "compute_losses", compute_losses)
    trained = []
    epoch = RunReports.epoch
    monkeypatch.setattr(RunReports, "epoch", lambda self, summary: (trained.append((self.current_step,
                                                                                     summary["epoch"])),
                                                                     epoch(self, summary)))
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert "step 1: resuming after epoch 2 of 3" in capsys.readouterr().out
    assert trained == [(1, 3)]  # no finished epoch is trained again
    assert not epoch_checkpoint_path(out, 1).exists()
    assert without_time(json.loads((out / "metrics.json").read_text())) == \
        without_time(json.loads((reference / "metrics.json").read_text()))
    resumed = torch.load(out / "step_1.pt", map_location="cpu", weights_only=False)
    uninterrupted = torch.load(reference / "step_1.pt", map_location="cpu", weights_only=False)
    keys = [k for k, v in uninterrupted.items() if isinstance(v, dict) and all(map(torch.is_tensor, v.values()))]
    assert keys
    for key in keys:
        for name, tensor in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], tensor), (key, name)
    with open(out / "epochs.csv", newline="") as handle:
        rows = [(int(r["step"]), int(r["epoch"])) for r in csv.DictReader(handle)]
    assert rows == [(0, 1), (1, 1), (1, 2), (1, 3)]


def test_an_epoch_is_logged_once_its_checkpoint_is_written_and_an_interruption_goes_to_run_log(
        data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    save = run_module.save_epoch_state

    def dying_save(path, state):
        if state["step"] == 1 and state["epoch"] == 2:
            raise Killed  # the process dies while it writes step 1's epoch-2 checkpoint
        save(path, state)

    monkeypatch.setattr(run_module, "save_epoch_state", dying_save)
    with pytest.raises(Killed):
        train(out, data)
    log = (out / "run.log").read_text()
    assert "step 1 epoch 1/3" in log and "step 1 epoch 2/3" not in log, log  # resume continues after epoch 1

    def interrupted_save(path, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "save_epoch_state", interrupted_save)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 130
    message = "interrupted; finished steps are kept: rerun with --resume to continue"
    assert capsys.readouterr().err.strip() == f"incrementer-fast train: error: {message}"
    assert (out / "run.log").read_text().splitlines()[-1].endswith(f"WARNING incrementer_fast.continual.run: {message}")


def test_an_epoch_checkpoint_of_another_step_shape_is_refused(data, tmp_path):
    out = tmp_path / "run"
    path = epoch_checkpoint_path(out, 1)
    path.parent.mkdir(parents=True)
    run_module.save_epoch_state(path, {"step": 1, "epoch": 1, "epochs": 5})
    with pytest.raises(CheckpointError, match="epochs: file has 5, step has 3"):
        load_epoch_state(path, {"step": 1, "epochs": 3})
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_epoch_state(path, {"step": 1})
