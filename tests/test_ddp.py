"""DDP through ``torchrun`` with 2 CPU processes (gloo) gives the metrics of 1 process.

Both runs use the same effective batch (4) cut into the same micro-batches (2 images): one process
accumulates 2 micro-batches per update, two processes take one each and DDP averages. The data order,
augmentations and dropout are seeded per micro-batch (continual/train.py), so each micro-batch is the same
computation in both runs and the update differs at most by the order of a two-term float sum — which is
exact here (each term is a gradient halved, a power of two). Tolerance: the metrics must agree to 1e-9
(float noise); in practice they are identical.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from incrementer_fast.cli import main
from incrementer_fast.continual.synthetic import generate_synthetic

OPTIONS = ["--dataset", "synthetic", "--synthetic-train-images", "24", "--synthetic-val-images", "8",
           "--synthetic-image-size", "32", "--img-size", "32", "--crop-size", "32", "--val-size", "32",
           "--task", "8-2", "--epochs", "2", "--epochs-incremental", "1", "--batch-size", "4",
           "--micro-batch-size", "2", "--eval-batch-size", "3", "--quiet"]
TOLERANCE = 1e-9


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= TOLERANCE
    return a == b


@pytest.mark.slow
def test_two_gloo_processes_give_the_metrics_of_one(tmp_path):
    data = tmp_path / "data"
    generate_synthetic(data, seed=0, num_train=24, num_val=8, image_size=32)
    one, two = tmp_path / "one", tmp_path / "two"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the torchrun workers run with OMP_NUM_THREADS=1: same kernels, same rounding
    try:
        assert main(["train", "--out", str(one), "--data-root", str(data), *OPTIONS]) == 0
    finally:
        torch.set_num_threads(previous)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "incrementer_fast", "train", "--out", str(two), "--data-root", str(data), *OPTIONS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    launch_one = json.loads((one / "config.json").read_text())["launch"]
    launch_two = json.loads((two / "config.json").read_text())["launch"]
    assert (launch_one["world_size"], launch_one["accumulation_steps"]) == (1, 2)
    assert (launch_two["world_size"], launch_two["accumulation_steps"]) == (2, 1)
    assert launch_one["effective_batch_size"] == launch_two["effective_batch_size"] == 4

    records_one = json.loads((one / "metrics.json").read_text())
    records_two = json.loads((two / "metrics.json").read_text())
    assert [r["step"] for r in records_two] == [0, 1, 2]
    for a, b in zip(records_one, records_two):
        for key in ("classes", "miou_old", "miou_new", "miou_all", "per_class_iou", "new_fp_rate",
                    "val_images", "train_images"):
            assert _close(a[key], b[key]), (a["step"], key, a[key], b[key])
    # Only rank 0 wrote: one checkpoint per step, no stray temporary files.
    assert sorted(p.name for p in two.glob("step_*.pt")) == ["step_0.pt", "step_1.pt", "step_2.pt"]
    assert not list(two.glob(".*.tmp"))
    weights_one = torch.load(one / "step_2.pt", weights_only=True)["state_dict"]
    weights_two = torch.load(two / "step_2.pt", weights_only=True)["state_dict"]
    worst = max(float((weights_one[k].float() - weights_two[k].float()).abs().max()) for k in weights_one)
    assert worst <= 1e-5, f"weights differ by {worst}"
