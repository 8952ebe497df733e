"""Fault injection: each fault a demanding user can cause, at tiny size, through the ``incrementer-fast`` command.

Every probe asserts the user-facing contract — one line on stderr naming the cause (exit status 2 for input
that cannot be used as given, 1 for a failure during the work) — and that nothing bad was written: no
config.json for a request refused up front, no checkpoint or metrics record of a step that failed, no
temporary file left behind. The runs use timm's ``test_vit`` (width 64, 16-pixel patches) on eight 32² images
so that the module stays within a few tens of seconds on two cores; only the fresh-process probe starts a new
interpreter (the others call ``cli.main``, which is exactly what ``python -m incrementer_fast`` returns).
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from incrementer_fast import Incrementer
from incrementer_fast import cli as cli_module
from incrementer_fast.cli import main
from incrementer_fast.continual.config import TrainConfig
from incrementer_fast.continual.run import build_model
from incrementer_fast.continual.datasets import SyntheticSegmentation
from incrementer_fast.continual.synthetic import generate_synthetic
from incrementer_fast.errors import CheckpointError, InputError

IMAGES = "VOCdevkit/VOC2012/JPEGImages"
SPLITS = "VOCdevkit/VOC2012/ImageSets/Segmentation"
TINY = ["--dataset", "synthetic", "--synthetic-train-images", "8", "--synthetic-val-images", "4",
        "--synthetic-image-size", "32", "--img-size", "32", "--crop-size", "32", "--val-size", "32",
        "--backbone", "test_vit", "--task", "8-2", "--epochs", "1", "--epochs-incremental", "1",
        "--batch-size", "4", "--eval-batch-size", "4", "--num-visualised", "1", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "data"
    generate_synthetic(root, seed=0, num_train=8, num_val=4, image_size=32)
    return root


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A run directory whose step 0 is finished (checkpoint and metrics record)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--out", str(out), "--data-root", str(data), "--step", "0", *TINY]) == 0
    return out


def cli(argv, capsys):
    """(exit status, stderr, stdout) of ``incrementer-fast ARGV``, asserting the one-line contract."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return code, lines[0], captured.out


def snapshot(folder) -> dict:
    """Relative path -> content hash of every file under ``folder`` (empty if it does not exist)."""
    if not os.path.exists(folder):
        return {}
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


def copy_run(source, target):
    shutil.copytree(source, target)
    return target


# ------------------------------------------------------------------------------------ refused up front
@pytest.mark.parametrize("option, value, message", [
    ("--dropout", "2", "--dropout must be in [0, 1)"),
    ("--n-layers", "0", "--n-layers must be a positive integer"),
    ("--lr", "inf", "--lr must be a finite number"),
    ("--lr-incremental", "nan", "--lr-incremental must be a finite number"),
    ("--momentum", "1", "--momentum must be in [0, 1)"),
    ("--crop-size", "40", "--crop-size 40 is not a multiple of the patch size 16"),
    ("--backbone", "no_such_vit", "no_such_vit"),
    ("--d-model", "129", "d_model=129 must be divisible by n_heads=2"),
])
def test_bad_options_are_refused_before_anything_is_written(option, value, message, data, tmp_path, capsys):
    out = tmp_path / "run"
    code, err, _ = cli(["train", "--out", out, "--data-root", data, *TINY, option, value], capsys)
    assert code == 2 and message in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="probes a machine without CUDA")
def test_cuda_without_a_gpu(data, tmp_path, capsys):
    code, err, _ = cli(["train", "--out", tmp_path / "run", "--data-root", data, *TINY, "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: CUDA is not available" in err and "--device cpu" in err
    assert not (tmp_path / "run").exists()


def test_out_under_a_file(data, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    code, err, _ = cli(["train", "--out", blocker / "run", "--data-root", data, *TINY], capsys)
    assert code == 2 and f"is under {blocker}, which is a file" in err
    assert blocker.read_text() == "a file, not a folder"


def _unwritable_folder(tmp_path):
    """A folder this process cannot write in: read-only permissions, or (as root, whom permissions do not
    stop) a sysfs folder, where creating a file is refused."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if os.path.isdir("/sys/kernel"):
        return "/sys/kernel"
    pytest.skip("running as root without /sys: no folder refuses writes")


def test_read_only_output_folder(data, tmp_path, capsys):
    folder = _unwritable_folder(tmp_path)
    code, err, _ = cli(["train", "--out", f"{folder}/run", "--data-root", data, *TINY], capsys)
    assert code == 2 and f"cannot write in {folder}" in err


def _broken_copy(data, tmp_path):
    return copy_run(data, tmp_path / "data")


def test_duplicate_id_in_a_split_list(data, tmp_path, capsys):
    root = _broken_copy(data, tmp_path)
    split = root / SPLITS / "train_aug.txt"
    split.write_text(split.read_text() + "syn_train_00002\n")
    code, err, _ = cli(["train", "--out", tmp_path / "run", "--data-root", root, *TINY], capsys)
    assert code == 2 and f"{split} lists 'syn_train_00002' twice (lines 3 and 9)" in err
    assert not (tmp_path / "run" / "config.json").exists()


def test_truncated_validation_image_is_found_before_step_0(data, tmp_path, capsys):
    root = _broken_copy(data, tmp_path)
    image = root / IMAGES / "syn_val_00002.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    out = tmp_path / "run"
    code, err, _ = cli(["train", "--out", out, "--data-root", root, *TINY], capsys)
    assert code == 2 and f"cannot read image {image}" in err
    assert not (out / "config.json").exists() and not list(out.glob("step_*"))


def test_wrong_mode_images_are_named(data, tmp_path):
    root = _broken_copy(data, tmp_path)
    rgb = Image.open(root / IMAGES / "syn_train_00001.png")
    rgb.convert("L").save(root / IMAGES / "syn_train_00001.png")  # grayscale: converted, and listed
    scan = SyntheticSegmentation(root, "train", cache_dir=tmp_path / "cache").scan()
    assert scan.converted == {"syn_train_00001": "L"}
    rgb.convert("RGBA").save(root / IMAGES / "syn_train_00004.png")  # transparency: refused, named
    with pytest.raises(InputError, match="syn_train_00004.png has mode RGBA"):
        SyntheticSegmentation(root, "train", cache_dir=tmp_path / "cache").scan()


# ------------------------------------------------------------------------------------ checkpoints
def _resume(run, capsys):
    before = snapshot(run)
    code, err, _ = cli(["train", "--out", run, "--resume", "--quiet"], capsys)
    after = snapshot(run)
    assert after == before  # nothing written: no config.json rewrite, no step 1, no record
    return code, err


@pytest.mark.parametrize("corruption, cause", [
    ("truncated", "truncated or corrupt"),
    ("empty", "is empty"),
    ("random", "not a torch checkpoint of tensors"),
    ("other format", "not an Incrementer checkpoint"),
])
def test_corrupt_checkpoint_is_named(corruption, cause, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    path = run / "step_0.pt"
    if corruption == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif corruption == "empty":
        path.write_bytes(b"")
    elif corruption == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        torch.save({"model": {"weight": torch.ones(3)}, "epoch": 4}, path)
    code, err = _resume(run, capsys)
    assert code == 2 and f"checkpoint {path}" in err and cause in err and "step 0" in err


def test_checkpoint_of_another_architecture_is_named_field_by_field(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    config = TrainConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
    other = TrainConfig.from_dict({**config.to_dict(), "n_layers": 1, "dropout": 0.0})
    build_model(other, 7).save(run / "step_0.pt")
    code, err = _resume(run, capsys)
    assert code == 2 and f"checkpoint {run / 'step_0.pt'} does not fit" in err
    for field in ("n_layers: file 1, expected 2", "dropout: file 0.0, expected 0.1",
                  "classes_per_step: file [7], expected [9]"):
        assert field in err


def test_demo_checkpoint_loads_in_a_fresh_process_and_errors_are_one_line(finished, tmp_path):
    """A fresh interpreter (the only one this module starts: imports cost seconds) first loads a checkpoint
    of the demo backbone through the documented API alone, then runs the command on a corrupt checkpoint:
    exit status 2 and exactly one line on stderr, through the real entry point's sys.exit."""
    demo = build_model(TrainConfig.demo(img_size=32), 9)
    demo.save(tmp_path / "demo.pt")
    run = copy_run(finished, tmp_path / "run")
    (run / "step_0.pt").write_bytes(b"\x00" * 100)
    script = textwrap.dedent("""
        import sys
        import incrementer_fast as inc
        model = inc.Incrementer.from_checkpoint(sys.argv[1])
        print(model.config["backbone"], model.num_classes, tuple(model(inc_images := __import__("torch").zeros(
            1, 3, 32, 32)).masks.shape))
        from incrementer_fast.cli import main
        sys.exit(main(["train", "--out", sys.argv[2], "--resume", "--quiet"]))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "demo.pt"), str(run)],
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["vit_demo_patch8", "9", "(1,", "9,", "4,", "4)"], result.stderr
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"checkpoint {run / 'step_0.pt'}" in result.stderr


def test_from_checkpoint_names_the_file_and_refuses_non_finite_weights(tmp_path):
    model = build_model(TrainConfig.demo(backbone="test_vit", img_size=32), 3)
    with torch.no_grad():
        model.proj_patch[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite weights in proj_patch"):
        model.save(tmp_path / "nan.pt")
    assert not list(tmp_path.iterdir())
    state = model.state_dict()
    torch.save({"format": "incrementer_fast.Incrementer/1", "config": model.config, "classes_per_step": [3],
                "state_dict": state}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nan.pt'} holds non-finite weights"):
        Incrementer.from_checkpoint(tmp_path / "nan.pt")


# ------------------------------------------------------------------------------------ failures during the work
def test_non_finite_loss_stops_and_resume_takes_the_advice(data, tmp_path, capsys):
    out = tmp_path / "run"
    # lr 1e30: the first update leaves huge weights, the loss of the second is inf/nan.
    code, err, _ = cli(["train", "--out", out, "--data-root", data, *TINY, "--step", "0", "--lr", "1e30"], capsys)
    assert code == 1 and "step 0, epoch 1, iteration 2 of 2: the loss is not finite" in err
    assert "--resume --lr 1e+29" in err
    assert not (out / "step_0.pt").exists() and not (out / "metrics.json").exists()

    # A crash's leftovers: a checkpoint being written, an atomic write, a dataset staging folder.
    (out / "step_0.pt.k2j3h4.tmp").write_bytes(b"partial")
    (out / ".metrics.json.x8y9.tmp").write_text("[")
    (data / ".generate-q1w2e3").mkdir()
    code = main(["train", "--out", str(out), "--data-root", str(data), "--resume", "--step", "0", "--lr", "0.01",
                 "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "removed 2 unfinished temporary file(s) left by an interrupted run" in printed
    assert "removed 1 unfinished dataset staging folder(s)" in printed
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp")) and not list(data.glob(".generate-*"))
    stored = json.loads((out / "config.json").read_text())
    assert stored["config"]["lr"] == 0.01 and stored["changes"] == [{"from_step": 0, "lr": [1e30, 0.01]}]
    weights = torch.load(out / "step_0.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_non_finite_weights_after_the_last_update_are_never_saved(data, tmp_path, capsys):
    out = tmp_path / "run"
    # One update per step (8 images, batch 8): its loss is finite, the weights it leaves are not.
    code, err, _ = cli(["train", "--out", out, "--data-root", data, *TINY, "--step", "0", "--batch-size", "8",
                        "--lr", "1e38"], capsys)
    assert code == 1 and "step 0, epoch 1, iteration 1 of 1: the weights are not finite" in err
    assert not (out / "step_0.pt").exists() and not (out / "metrics.json").exists()


@contextlib.contextmanager
def refused_large_writes():
    """Writes past 256 KiB fail in this process as on a full disk (RLIMIT_FSIZE: EFBIG instead of
    ENOSPC); SIGXFSZ is ignored so the write fails instead of killing the process. Both are restored."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_refused_checkpoint_write_is_named_and_leaves_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    with refused_large_writes():
        code, err, _ = cli(["train", "--out", out, "--data-root", data, *TINY, "--step", "0"], capsys)
    # The first checkpoint written is the epoch checkpoint (step_0.epoch.pt), at the end of the epoch.
    assert code == 1 and f"{out / 'step_0.epoch.pt'}: File too large" in err and "--resume" in err
    assert not list(out.glob("step_0*")) and not list(out.glob(".step_0*")) and not (out / "metrics.json").exists()


def test_debug_shows_the_traceback_and_keeps_the_message_and_exit_status(data, tmp_path, capsys, monkeypatch):
    argv = ["train", "--out", str(tmp_path / "run"), "--data-root", str(data), *TINY, "--dropout", "2"]
    assert main(argv) == 2
    plain = capsys.readouterr().err.strip()
    assert main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and "Error: --dropout must be in" in err[-2]
    assert err[-1] == plain and "--dropout must be in" in plain
    assert not (tmp_path / "run").exists()

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_summary", interrupted)
    assert main(["summary", str(tmp_path), "--debug"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "KeyboardInterrupt" in err[-2] and err[-1].startswith("incrementer-fast summary: error: interrupted")


# ------------------------------------------------------------------------------------ eval scores what was trained
@pytest.fixture(scope="module")
def own_data_run(tmp_path_factory):
    """A finished step 0 whose synthetic data the run generated itself, in ``run/data`` (8/4 images at 32²)."""
    out = tmp_path_factory.mktemp("own-data") / "run"
    assert main(["train", "--out", str(out), "--step", "0", *TINY]) == 0
    return out


def _eval_record(run, capsys, *extra):
    code = main(["eval", "--run", str(run), "--step", "0", "--quiet", "--output", str(run.parent / "eval.json"),
                 *map(str, extra)])
    captured = capsys.readouterr()
    return code, captured


def test_eval_rebuilds_the_runs_own_synthetic_set(own_data_run, tmp_path, capsys):
    run = copy_run(own_data_run, tmp_path / "run")
    stored = json.loads((run / "metrics.json").read_text())[0]
    shutil.rmtree(run / "data")
    code, _ = _eval_record(run, capsys)
    assert code == 0
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["val_images"] == stored["val_images"]  # not the default 120-image set's share
    assert record["miou_all"] == stored["miou_all"]
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert (manifest["num_train"], manifest["num_val"], manifest["image_size"]) == (8, 4, 32)


def test_eval_refuses_another_synthetic_set_in_the_runs_folder(own_data_run, tmp_path, capsys):
    run = copy_run(own_data_run, tmp_path / "run")
    shutil.rmtree(run / "data")
    generate_synthetic(run / "data", seed=0, num_train=8, num_val=6, image_size=32)
    code, err, _ = cli(["eval", "--run", run, "--step", "0", "--quiet", "--output", tmp_path / "eval.json"], capsys)
    assert code == 2 and "holds another synthetic dataset than the run's: synthetic_val_images 6 (the run's 4)" in err
    assert not (tmp_path / "eval.json").exists()


def test_eval_checks_the_set_against_the_fingerprint_stored_at_training(own_data_run, tmp_path, capsys):
    run = copy_run(own_data_run, tmp_path / "run")
    assert json.loads((run / "config.json").read_text())["evaluation"]["val_images"] == 4
    other = generate_synthetic(tmp_path / "other", seed=5, num_train=8, num_val=4, image_size=32)
    code, err, _ = cli(["eval", "--run", run, "--step", "0", "--quiet", "--data-root", other,
                        "--synthetic-seed", "5", "--output", tmp_path / "eval.json"], capsys)
    assert code == 2 and f"the validation set at {other} (4 images" in err and f"is not the one {run} was scored on" in err
    assert not (tmp_path / "eval.json").exists()


def test_eval_refuses_a_run_whose_data_root_is_gone(finished, data, tmp_path, capsys):
    moved = copy_run(data, tmp_path / "data")
    run = copy_run(finished, tmp_path / "run")
    stored = json.loads((run / "config.json").read_text())
    stored["config"]["dataset"], stored["config"]["data_root"] = "voc", str(moved)
    (run / "config.json").write_text(json.dumps(stored))
    shutil.rmtree(moved)
    code, err, _ = cli(["eval", "--run", run, "--step", "0", "--quiet", "--output", tmp_path / "eval.json"], capsys)
    assert code == 2 and f"data root not found: {moved}" in err and "--data-root" in err
    assert not moved.exists() and not (tmp_path / "eval.json").exists()


# ------------------------------------------------------------------------------------ nothing finished is overwritten
@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, data):
    """A run directory with all three steps of task 8-2 finished."""
    out = tmp_path_factory.mktemp("three") / "run"
    assert main(["train", "--out", str(out), "--data-root", str(data), *TINY]) == 0
    return out


@pytest.mark.parametrize("how", [["--step", "1", "--data-root", "DATA", *TINY], ["--resume", "--step", "1", "--quiet"]])
def test_a_finished_step_is_not_retrained_without_retrain_from(how, three_steps, data, tmp_path, capsys):
    run = copy_run(three_steps, tmp_path / "run")
    before = snapshot(run)
    argv = ["train", "--out", run, *[str(data) if a == "DATA" else a for a in how], "--lr-incremental", "0.002"]
    code, err, _ = cli(argv, capsys)
    assert code == 2 and "step 1 is finished" in err and "--retrain-from 1" in err and "steps 1, 2 are removed" in err
    assert snapshot(run) == before


def test_retrain_from_removes_the_stale_steps_and_records_changes_exactly(three_steps, tmp_path, capsys):
    run = copy_run(three_steps, tmp_path / "run")
    before = snapshot(run)
    lr = json.loads((run / "config.json").read_text())["config"]["lr_incremental"]

    def retrain(step, value):
        code = main(["train", "--out", str(run), "--resume", "--retrain-from", str(step), "--lr-incremental",
                     str(value), "--quiet"])
        return code, capsys.readouterr().out

    code, printed = retrain(1, 0.002)
    assert code == 0 and "--retrain-from 1: step(s) 1, 2 trained from the old step 1 or later: removing" in printed
    after = snapshot(run)
    assert after["step_0.pt"] == before["step_0.pt"]  # kept
    assert after["step_1.pt"] != before["step_1.pt"] and after["step_2.pt"] != before["step_2.pt"]  # retrained
    assert [r["step"] for r in json.loads((run / "metrics.json").read_text())] == [0, 1, 2]
    changes = lambda: json.loads((run / "config.json").read_text())["changes"]  # noqa: E731
    assert changes() == [{"from_step": 1, "lr_incremental": [lr, 0.002]}]
    assert retrain(2, 0.003)[0] == 0
    assert changes() == [{"from_step": 1, "lr_incremental": [lr, 0.002]},
                         {"from_step": 2, "lr_incremental": [0.002, 0.003]}]
    assert retrain(1, 0.004)[0] == 0  # the entry of step 2 described a step trained again: gone
    assert changes() == [{"from_step": 1, "lr_incremental": [lr, 0.004]}]


def test_resume_on_a_folder_without_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err, _ = cli(["train", "--out", tmp_path / "empty", "--resume", "--quiet"], capsys)
    assert code == 2 and "holds no run to continue" in err and "drop --resume" in err
    assert not list((tmp_path / "empty").iterdir())


# ------------------------------------------------------------------------------------ one writer per run folder
def test_a_second_command_on_a_locked_run_folder_is_refused_naming_the_holder(finished, tmp_path, capsys):
    """The holder is another command's lock as the OS sees it: ``run/.lock`` flock-ed (per open file, so it
    conflicts even within one process) and holding its pid."""
    run = copy_run(finished, tmp_path / "run")
    with open(run / ".lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242\n")
        holder.flush()
        before = snapshot(run)
        code, err, _ = cli(["train", "--out", run, "--resume", "--quiet"], capsys)
        assert code == 2 and f"{run} is in use by another incrementer-fast command (pid 4242)" in err
        assert snapshot(run) == before  # no step trained, no log line, no config.json rewrite
    # Released (the holder closed its file): the next command takes the lock and trains.
    assert main(["train", "--out", str(run), "--resume", "--step", "1", "--quiet"]) == 0


def test_cleanup_removes_only_the_temporaries_of_dead_writers(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_temporary = run / f".step_1.pt.{writer.pid}.0123abcd.tmp"  # another process's checkpoint being written
        dead_temporary = run / f".metrics.json.{dead}.89abcdef.tmp"
        live_temporary.write_bytes(b"being written")
        dead_temporary.write_text("[")
        code = main(["train", "--out", str(run), "--resume", "--step", "1", "--quiet"])
        assert code == 0 and "removed 1 unfinished temporary file(s)" in capsys.readouterr().out
        assert live_temporary.read_bytes() == b"being written" and not dead_temporary.exists()
    finally:
        writer.kill()
        writer.wait()


def test_run_folder_lock_is_exclusive_and_released(tmp_path):
    from incrementer_fast.continual.lock import RunFolderBusy, RunFolderLock

    assert not RunFolderLock(tmp_path / "absent").acquire_if_present()  # nothing to lock: nothing created
    assert not (tmp_path / "absent").exists()
    with RunFolderLock(tmp_path) as first:
        assert first.held
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            RunFolderLock(tmp_path).acquire_if_present()
    with RunFolderLock(tmp_path) as again:
        assert again.held


# ------------------------------------------------------------------------------------ bounded checkpoint loading
def _tampered(finished, tmp_path, **config_changes):
    """step_0.pt of the finished run with its metadata edited (``classes_per_step`` and ``config`` keys; a
    value None removes the key)."""
    checkpoint = torch.load(finished / "step_0.pt", weights_only=True)
    if "classes_per_step" in config_changes:
        checkpoint["classes_per_step"] = config_changes.pop("classes_per_step")
    for key, value in config_changes.items():
        if value is None:
            checkpoint["config"].pop(key)
        else:
            checkpoint["config"][key] = value
    path = tmp_path / "tampered.pt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def constructions(monkeypatch):
    """The device of every Incrementer built while the test runs (``meta`` allocates nothing)."""
    devices = []
    original = Incrementer.__init__

    def recording_init(self, *args, **kwargs):
        devices.append(torch.empty(0).device.type)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Incrementer, "__init__", recording_init)
    return devices


@pytest.mark.parametrize("change, message", [
    (dict(classes_per_step=[3_000_000]), "classes_per_step [3000000] do not match its class tokens"),
    (dict(n_layers=3000), "its config says n_layers=3000 but its weights hold 2 decoder block(s)"),
    (dict(weights="/etc/passwd"), "config fields a checkpoint may not hold: weights"),
    (dict(pretrained=True), "config fields a checkpoint may not hold: pretrained"),
    (dict(surprise=1), "config fields a checkpoint may not hold: surprise"),
    (dict(backbone=None), "lacks config field(s) backbone"),
    (dict(dropout="0.1"), "dropout must be a number, got '0.1'"),
])
def test_checkpoint_metadata_cannot_make_the_loader_build_read_or_download(change, message, finished, tmp_path,
                                                                            constructions, capsys):
    path = _tampered(finished, tmp_path, **change)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        Incrementer.from_checkpoint(path)
    assert constructions == []  # refused before any model was built, on any device
    code, err, _ = cli(["eval", "--checkpoint", path, "--data-root", finished.parent.parent / "missing", *TINY,
                        "--step", "0"], capsys)
    assert code == 2 and f"checkpoint {path}" in err and message in err


def test_checkpoint_tensors_are_checked_against_a_meta_model_before_allocation(finished, tmp_path, constructions):
    path = _tampered(finished, tmp_path, d_model=4096, n_heads=64)
    with pytest.raises(CheckpointError, match=r"proj_dec.weight: file \(64, 64\) torch.float32 vs model \(4096, 64\)"):
        Incrementer.from_checkpoint(path)
    assert constructions == ["meta"]  # the 4096-wide decoder was only ever a blueprint
    checkpoint = torch.load(finished / "step_0.pt", weights_only=True)
    checkpoint["state_dict"]["proj_patch"] = checkpoint["state_dict"]["proj_patch"].double()
    torch.save(checkpoint, tmp_path / "double.pt")
    with pytest.raises(CheckpointError, match=r"proj_patch: file \(64, 64\) torch.float64 vs model \(64, 64\) "
                                              r"torch.float32"):
        Incrementer.from_checkpoint(tmp_path / "double.pt")


# ------------------------------------------------------------------------------------ encoder weights
def _encoder_state():
    import timm

    return timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict()


@pytest.mark.parametrize("fault, message", [
    ("nan", "hold non-finite values in blocks.0.attn.qkv.weight"),
    ("inf", "hold non-finite values in pos_embed"),
    ("shape", "shapes differ: norm.weight: file (7,) vs model (64,)"),
])
def test_bad_encoder_weights_are_refused_before_anything_is_written(fault, message, tmp_path, capsys):
    state = _encoder_state()
    if fault == "nan":
        state["blocks.0.attn.qkv.weight"][3, 5] = float("nan")
    elif fault == "inf":
        state["pos_embed"][0, 0, 0] = float("-inf")
    else:
        state["norm.weight"] = torch.ones(7)
    path = tmp_path / "encoder.pth"
    torch.save(state, path)
    out = tmp_path / "run"
    code, err, _ = cli(["train", "--out", out, *TINY, "--weights", path], capsys)  # the data would go in out/data
    assert code == 2 and f"encoder weights '{path}'" in err and message in err
    assert not out.exists()  # no config.json, run.log, generated data or lock


@pytest.mark.parametrize("content", [b"PK\x03\x04" + b"\x00" * 60, b"not an archive at all"])
def test_an_unreadable_npz_encoder_file_is_named(content, tmp_path, capsys):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    out = tmp_path / "run"
    code, err, _ = cli(["train", "--out", out, *TINY, "--weights", path], capsys)
    assert code == 2 and f"could not load the .npz checkpoint '{path}'" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------ every step's images
def test_a_step_without_training_images_is_refused_before_step_0_trains(data, tmp_path, capsys):
    root = _broken_copy(data, tmp_path)
    split = root / SPLITS / "train_aug.txt"
    # Step 2 of task 8-2 adds classes 11 and 12: only syn_train_00003 (11) and syn_train_00006 (12) hold them.
    kept = [line for line in split.read_text().splitlines() if line not in ("syn_train_00003", "syn_train_00006")]
    split.write_text("\n".join(kept) + "\n")
    out = tmp_path / "run"
    code, err, _ = cli(["train", "--out", out, "--data-root", root, *TINY], capsys)
    assert code == 2 and "step 2 of task '8-2' has no training image" in err
    assert "no image of the train split holds its classes [11, 12] (purple_square, cyan_ring)" in err
    assert not out.exists()  # the scan caches written before the refusal went with the folder it created


# ------------------------------------------------------------------------------------ resume: which file changed
def _edit_config(run, **changes):
    stored = json.loads((run / "config.json").read_text())
    stored["config"].update(changes)
    (run / "config.json").write_text(json.dumps(stored))


@pytest.mark.parametrize("run_fixture, edit, message", [
    ("finished", dict(task="10-1"), "its task '10-1' (incrementer) step 0 adds [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10] "
                                    "(trained: [0, 1, 2, 3, 4, 5, 6, 7, 8])"),
    ("three_steps", dict(task="8-4"), "step 1 adds [9, 10, 11, 12] (trained: [9, 10]); step 2 is not in it"),
    ("three_steps", dict(method="joint"), "its task '8-2' (joint) step 0 adds [0, 1, 2"),
    ("three_steps", dict(n_layers=1), "every finished step's checkpoint (steps [0, 1, 2]) differs from it alike "
                                      "(n_layers: file 2, expected 1)"),
])
def test_resume_names_config_json_when_it_changed_and_keeps_the_checkpoints(run_fixture, edit, message, request,
                                                                            tmp_path, capsys):
    run = copy_run(request.getfixturevalue(run_fixture), tmp_path / "run")
    _edit_config(run, **edit)
    code, err = _resume(run, capsys)  # (today: "does not fit … delete it", or "every step is finished", exit 0)
    assert code == 2 and message in err and "config.json was changed after" in err
    assert "delete" not in err and "keep the checkpoints" in err


def test_a_replaced_checkpoint_is_named_and_never_advised_deleted(three_steps, tmp_path, capsys):
    run = copy_run(three_steps, tmp_path / "run")
    shutil.copy(run / "step_0.pt", run / "step_1.pt")  # step 1's file replaced by step 0's (9 classes, not 11)
    code, err = _resume(run, capsys)
    assert code == 2 and f"checkpoint {run / 'step_1.pt'} does not fit: classes_per_step: file [9], expected [9, 2]" in err
    assert "config.json and metrics.json agree on its classes [9, 10]" in err and f"move it out of {run}" in err
    assert "delete" not in err


# ------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_is_handled_like_ctrl_c(data, tmp_path):
    """What ``timeout`` and schedulers send: the child pauses inside the write of step 0's metrics record (an
    atomic write's temporary file open) and says so; this process then sends SIGTERM. The command ends with
    one line and exit status 143, the temporary file is removed, and the step's figures were written before
    its record (a record without its figure would stay so: the step counts as finished)."""
    out = tmp_path / "run"
    script = textwrap.dedent("""
        import sys, time
        from incrementer_fast import _files
        from incrementer_fast.cli import main
        from incrementer_fast.continual import run

        def paused_write(path, obj):
            if path.name != "metrics.json":
                return _files.atomic_write_json(path, obj)
            with _files.atomic_write(path) as handle:
                handle.write(b"[")
                handle.flush()
                print("writing", flush=True)
                time.sleep(60)  # SIGTERM arrives here

        run.atomic_write_json = paused_write
        sys.exit(main(sys.argv[1:]))
    """)
    child = subprocess.Popen([sys.executable, "-c", script, "train", "--out", str(out), "--data-root", str(data),
                              *TINY, "--step", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.strip() == "writing":
                break
        assert list(out.glob(".metrics.json.*.tmp")), "the child did not pause inside the write"
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 143
    assert stderr.count("\n") == 1 and "terminated (SIGTERM)" in stderr and "--resume" in stderr, stderr
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert (out / "predictions_step0.png").exists() and (out / "miou.png").exists()
    assert not (out / "metrics.json").exists()  # step 0 is not finished: --resume trains it again


# ------------------------------------------------------------------------------------ unexpected errors, named
def _png_header_only(path, width, height):
    """A PNG whose header claims ``width`` × ``height`` pixels (PIL refuses it at open, before decoding)."""
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_a_decompression_bomb_image_is_named(data, tmp_path, capsys):
    root = _broken_copy(data, tmp_path)
    image = root / IMAGES / "syn_train_00005.png"
    _png_header_only(image, 14000, 14000)  # 196 million pixels: over PIL's limit
    out = tmp_path / "run"
    code, err, _ = cli(["train", "--out", out, "--data-root", root, *TINY], capsys)
    assert code == 2 and f"cannot read image {image}" in err and "decompression bomb" in err
    assert not (out / "config.json").exists() and not (out / "run.log").exists()


def test_a_checkpoint_without_its_backbone_is_named_on_resume(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    checkpoint = torch.load(run / "step_0.pt", weights_only=True)
    del checkpoint["config"]["backbone"]
    torch.save(checkpoint, run / "step_0.pt")
    code, err = _resume(run, capsys)
    assert code == 2 and f"checkpoint {run / 'step_0.pt'} lacks config field(s) backbone" in err


@pytest.mark.parametrize("content", [{"labels": [1, 2], "converted": {}}, {"labels": None},
                                     {"labels": "many", "converted": 5}, "[not json"])
def test_a_corrupt_scan_cache_is_named_and_rebuilt(content, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    caches = sorted((run / "cache").glob("scan-*.json"))
    assert len(caches) == 2  # train and val
    for path in caches:
        if isinstance(content, str):
            path.write_text(content)
        else:
            key = json.loads(path.read_text())["key"]
            path.write_text(json.dumps({"key": key, **content}))
    code = main(["train", "--out", str(run), "--resume", "--step", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    for path in caches:
        assert f"scan cache {path} is corrupt" in printed
        assert isinstance(json.loads(path.read_text())["labels"], dict)  # rebuilt


def test_check_names_an_unknown_device(capsys):
    code = main(["check", "--quick", "--device", "tpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "incrementer-fast check: error: --device tpu: expected cpu, cuda or cuda:N"


# ------------------------------------------------------------------------------------ values read from files
@pytest.mark.parametrize("name, content, message", [
    ("run.yaml", "dataset: synthetic\nlr: .inf\n", 'run.yaml: key "lr" must be a finite number'),
    ("run.json", '{"dataset": "synthetic", "dropout": 2}', 'run.json: key "dropout" must be in [0, 1)'),
    ("twice.yaml", "dataset: synthetic\nlr: 0.1\nepochs: 2\nlr: 0.2\n", "key 'lr' given twice (line 4)"),
    ("twice.json", '{"dataset": "synthetic", "lr": 0.1, "lr": 0.2}', "key(s) 'lr' given twice"),
])
def test_a_config_files_values_are_named_by_its_keys(name, content, message, tmp_path, capsys):
    (tmp_path / name).write_text(content)
    out = tmp_path / "run"
    code, err, _ = cli(["train", "--out", out, "--config", tmp_path / name, "--quiet"], capsys)
    assert code == 2 and message in err and str(tmp_path / name) in err
    assert not out.exists()


def test_a_bad_value_in_config_json_is_named_as_its_key(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    _edit_config(run, dropout=2)
    code, err = _resume(run, capsys)
    assert code == 2 and f'{run / "config.json"}: key "config.dropout" must be in [0, 1)' in err
    assert "--dropout" not in err


# ------------------------------------------------------------------------------------ split lists
@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace("syn_train_00003", "syn_train 00003"),
     "line 4: 'syn_train 00003' is not one id (an id cannot hold whitespace"),
    (lambda text: text + "syn_val_00001\nsyn_val_00002\n",
     "share 2 image(s): 'syn_val_00001', 'syn_val_00002'; an image scored must not be trained on"),
])
def test_a_malformed_split_list_is_refused_naming_the_line(edit, message, data, tmp_path, capsys):
    root = _broken_copy(data, tmp_path)
    split = root / SPLITS / "train_aug.txt"
    split.write_text(edit(split.read_text()))
    out = tmp_path / "run"
    code, err, _ = cli(["train", "--out", out, "--data-root", root, *TINY], capsys)
    assert code == 2 and message in err and str(split) in err
    assert not out.exists()


def test_a_byte_order_mark_is_not_part_of_the_first_id(data, tmp_path):
    root = _broken_copy(data, tmp_path)
    split = root / SPLITS / "train_aug.txt"
    split.write_bytes(b"\xef\xbb\xbf" + split.read_bytes())  # as Notepad saves UTF-8
    ids = SyntheticSegmentation(root, "train", cache_dir=tmp_path / "cache").ids
    assert ids[0] == "syn_train_00000" and len(ids) == 8


# ------------------------------------------------------------------------------------ a refused command leaves nothing
def test_a_refused_command_removes_the_folders_it_created(data, tmp_path, capsys):
    """Refused after the run had created and locked its new folder and written caches into it (the val
    split's truncated image is found by the scan, after the train split's cache was written)."""
    root = _broken_copy(data, tmp_path)
    image = root / IMAGES / "syn_val_00001.png"
    image.write_bytes(image.read_bytes()[:100])
    out = tmp_path / "new" / "nested" / "run"
    code, err, _ = cli(["train", "--out", out, "--data-root", root, *TINY], capsys)
    assert code == 2 and f"cannot read image {image}" in err
    assert not (tmp_path / "new").exists()


def test_a_refused_command_leaves_an_existing_folder_as_it_was(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "run")
    (tmp_path / "bad.pth").write_bytes(b"not weights")
    code, err, _ = cli(["train", "--out", tmp_path / "run", *TINY, "--weights", tmp_path / "bad.pth"], capsys)
    assert code == 2 and "could not read encoder weights" in err
    assert snapshot(tmp_path / "run") == before and not (tmp_path / "run" / ".lock").exists()


def test_converted_images_do_not_replace_the_class_names(data, tmp_path, capsys):
    from incrementer_fast.continual.synthetic import CLASS_NAMES

    root = _broken_copy(data, tmp_path)
    Image.open(root / IMAGES / "syn_train_00001.png").convert("L").save(root / IMAGES / "syn_train_00001.png")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data-root", str(root), *TINY, "--step", "0"]) == 0
    assert "1 grayscale/CMYK image(s) converted to RGB when loaded: syn_train_00001" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["launch"]["class_names"] == list(CLASS_NAMES)
