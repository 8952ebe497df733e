"""The ``incrementer-fast`` command: argument errors, bad data roots, corrupt data, resumption, the table."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from incrementer_fast.cli import build_parser, config_from_args, demo_table, main
from incrementer_fast.continual.config import TrainConfig
from incrementer_fast.continual.synthetic import generate_synthetic

TINY = ["--dataset", "synthetic", "--synthetic-train-images", "24", "--synthetic-val-images", "6",
        "--synthetic-image-size", "32", "--img-size", "32", "--crop-size", "32", "--val-size", "32",
        "--task", "8-2", "--epochs", "1", "--epochs-incremental", "1", "--batch-size", "4", "--quiet"]


def run_cli(argv, capsys):
    """(exit code, stderr) of ``incrementer-fast ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root, seed=0, num_train=24, num_val=6, image_size=32)
    return root


@pytest.mark.parametrize("argv, message", [
    (["train"], "--out"),
    (["train", "--out", "x", "--dataset", "cityscapes"], "dataset must be one of"),
    (["train", "--out", "x", "--lr", "fast"], "--lr: expects float"),
    (["train", "--out", "x", "--setting", "mixed"], "setting must be one of"),
    (["train", "--out", "x", "--epochs", "0"], "epochs must be a positive integer"),
    (["train", "--out", "x", "--dataset", "voc"], "--data-root is required"),
    (["train", "--out", "x", "--dataset", "synthetic", "--task", "7-7"], "does not tile"),
    (["train", "--out", "x", "--batch-size", "6", "--micro-batch-size", "4"], "multiple of"),
    (["fly"], "invalid choice"),
    (["train", "--out", "x", "--lamda-dice", "0.2"],
     "incrementer-fast train: error: unrecognized arguments: --lamda-dice 0.2; did you mean --lambda-dice? "
     "(see incrementer-fast train --help)"),
    (["summary", "x", "--outt", "y"], "incrementer-fast summary: error: unrecognized arguments: --outt y; did you "
                                      "mean --out? (see incrementer-fast summary --help)"),
])
def test_argument_errors_are_reported(argv, message, capsys, tmp_path):
    argv = [a if a != "x" else str(tmp_path / "run") for a in argv]
    code, err = run_cli(argv, capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset, layout, missing", [
    ("voc", None, "data root not found"),
    ("voc", [], "JPEGImages"),
    ("voc", ["VOCdevkit/VOC2012/JPEGImages"], "SegmentationClassAug"),
    ("ade", [], "ADEChallengeData2016"),
])
def test_bad_data_roots_name_the_missing_path(dataset, layout, missing, capsys, tmp_path):
    root = tmp_path / "data"
    if layout is not None:
        root.mkdir()
        for folder in layout:
            (root / folder).mkdir(parents=True)
    code, err = run_cli(["train", "--out", str(tmp_path / "run"), "--dataset", dataset, "--data-root", str(root),
                         "--task", "15-1" if dataset == "voc" else "100-50"], capsys)
    assert code == 2 and missing in err and "Traceback" not in err


def _copy_dataset(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_corrupt_image_and_label_out_of_range_are_named(tiny_data, capsys, tmp_path):
    images = "VOCdevkit/VOC2012/JPEGImages"
    labels = "VOCdevkit/VOC2012/SegmentationClassAug"
    broken = _copy_dataset(tiny_data, tmp_path / "broken_image")
    (broken / images / "syn_train_00003.png").write_bytes(b"not a png")
    code, err = run_cli(["train", "--out", str(tmp_path / "a"), "--data-root", str(broken), *TINY], capsys)
    assert code == 2 and "syn_train_00003.png" in err and "cannot read image" in err

    bad_label = _copy_dataset(tiny_data, tmp_path / "bad_label")
    label_path = bad_label / labels / "syn_train_00005.png"
    values = np.array(Image.open(label_path))
    values[0, 0] = 40
    Image.fromarray(values).save(label_path)
    code, err = run_cli(["train", "--out", str(tmp_path / "b"), "--data-root", str(bad_label), *TINY], capsys)
    assert code == 2 and "syn_train_00005.png" in err and "[40]" in err


def test_train_then_resume_then_refuse(tiny_data, capsys, tmp_path):
    out = str(tmp_path / "run")
    argv = ["train", "--out", out, "--data-root", str(tiny_data), *TINY]
    assert main(argv + ["--step", "0"]) == 0
    code, err = run_cli(argv + ["--step", "5"], capsys)
    assert code == 2 and "out of range" in err
    assert main(["train", "--out", out, "--resume", "--quiet"]) == 0  # config.json supplies the options
    assert (tmp_path / "run" / "step_2.pt").exists()
    code, err = run_cli(argv, capsys)
    assert code == 2 and "--resume" in err
    code, err = run_cli(["train", "--out", out, "--resume", "--n-layers", "3"], capsys)
    assert code == 2 and "--n-layers 3" in err


def test_options_map_onto_the_config():
    parser = build_parser()
    args = parser.parse_args(["train", "--out", "r", "--dataset", "voc", "--data-root", "d", "--no-use-fod",
                              "--lambda-dice", "0.25", "--micro-batch-size", "none", "--fused-head"])
    config = config_from_args(args)
    assert (config.dataset, config.use_fod, config.lambda_dice, config.micro_batch_size) == ("voc", False, 0.25, None)
    assert config.backbone == "vit_base_patch16_384" and config.crop_size == 512  # paper-scale defaults
    synthetic = config_from_args(parser.parse_args(["train", "--out", "r", "--dataset", "synthetic"]))
    assert synthetic.backbone == TrainConfig.demo().backbone and synthetic.device == "cpu"  # the demo preset
    assert "OUR choice" in parser._subparsers._group_actions[0].choices["train"].format_help()


def test_module_entry_point_prints_help():
    result = subprocess.run([sys.executable, "-m", "incrementer_fast", "train", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--lambda-visual" in result.stdout and "--resume" in result.stdout


def test_demo_table_lists_both_methods_per_step():
    def record(step, classes, old, new, all_, chance):
        return {"step": step, "classes": classes, "miou_old": old, "miou_new": new, "miou_all": all_,
                "chance_miou_new": chance}

    table = demo_table({"incrementer": [record(0, [0, 1, 2], 0.5, None, 0.5, None),
                                        record(1, [3], 0.4, 0.3, 0.375, 0.02)],
                        "finetune": [record(0, [0, 1, 2], 0.5, None, 0.5, None),
                                     record(1, [3], 0.1, 0.35, 0.1625, 0.02)]})
    lines = table.splitlines()
    assert "incrementer" in lines[0] and "finetune" in lines[0]
    assert lines[3].split() == ["0", "0-2", "|", "50.0", "-", "50.0", "|", "50.0", "-", "50.0", "|", "-"]
    assert lines[4].split() == ["1", "3", "|", "40.0", "30.0", "37.5", "|", "10.0", "35.0", "16.2", "|", "2.0"]
    with_joint = demo_table({"incrementer": [record(0, [0, 1, 2], 0.5, None, 0.5, None)]},
                            {"miou_old": 0.7, "miou_new": 0.6, "miou_all": 0.65}).splitlines()
    assert with_joint[-1] == "joint (every class in one step, the upper bound): old 70.0, new 60.0, all 65.0"


def test_demo_methods_option(capsys):
    """``demo --methods``: names among the demo's choices, in the order given (the first trains step 0); an
    unknown or repeated name is refused naming the option, before anything runs."""
    from incrementer_fast.continual.demo import DEMO_CHOICES, DEMO_METHODS

    parser = build_parser()
    assert parser.parse_args(["demo"]).methods is None  # run_demo's DEMO_METHODS
    assert DEMO_METHODS == ("incrementer", "finetune")
    assert parser.parse_args(["demo", "--methods", "plop,incrementer"]).methods == ("plop", "incrementer")
    assert parser.parse_args(["demo", "--methods", ",".join(DEMO_CHOICES)]).methods == DEMO_CHOICES
    for bad in ("mib,foo", "mib,mib", "joint", ""):
        assert main(["demo", "--methods", bad, "--out", "unused"]) == 2
        assert "--methods" in capsys.readouterr().err


def test_a_presets_weights_belong_to_its_backbone():
    demo = TrainConfig.demo()
    assert demo.weights is not None and demo.backbone == "vit_demo_patch8"
    assert TrainConfig.demo(backbone="test_vit").weights is None  # the demo's encoder does not fit test_vit
    assert TrainConfig.demo(backbone="test_vit", weights="w.pt").weights == "w.pt"
    config = config_from_args(build_parser().parse_args(["train", "--out", "r", "--dataset", "synthetic",
                                                         "--backbone", "test_vit"]))
    assert config.weights is None and config.pretrained is False


def test_eval_rescores_a_saved_step(tiny_data, capsys, tmp_path):
    """``eval --run DIR --step N`` and ``eval --checkpoint PATH ...`` give the step's metrics.json record;
    ``--eval-mode slide`` scores with sliding windows."""
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data-root", str(tiny_data), *TINY, "--step", "0"]) == 0
    stored = json.loads((out / "metrics.json").read_text())[0]
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--step", "0", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    shared = set(stored) - {"seconds", "train_images"}
    assert shared <= set(printed) and {k: printed[k] for k in shared} == {k: stored[k] for k in shared}
    assert printed["eval_mode"] == "resize" and json.loads((out / "eval_step0_resize.json").read_text()) == printed

    assert main(["eval", "--checkpoint", str(out / "step_0.pt"), "--data-root", str(tiny_data), *TINY,
                 "--step", "0", "--output", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert {k: again[k] for k in shared} == {k: stored[k] for k in shared}

    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--step", "0", "--quiet", "--eval-mode", "slide", "--window-size", "16",
                 "--window-stride", "8"]) == 0
    slide = json.loads(capsys.readouterr().out)
    assert slide["eval_mode"] == "slide" and slide["val_images"] == stored["val_images"]
    assert all(v is None or 0.0 <= v <= 1.0 for v in slide["per_class_iou"])

    code, err = run_cli(["eval", "--run", str(out), "--step", "1"], capsys)
    assert code == 2 and "step_1.pt" in err  # a checkpoint that is not there: input that cannot be used
    code, err = run_cli(["eval", "--run", str(tmp_path), "--step", "0"], capsys)
    assert code == 2 and "config.json" in err
