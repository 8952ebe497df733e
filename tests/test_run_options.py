"""Run options: --config FILE (JSON / YAML / a run's config.json, flags on top), --amp, rank-aware logging."""
import io
import json
import logging

import pytest

from incrementer_fast.cli import CommandError, build_parser, config_from_args
from incrementer_fast.continual.config import TrainConfig
from incrementer_fast.continual.logs import configure_logging


def _config(argv):
    return config_from_args(build_parser().parse_args(["train", "--out", "unused", *argv]))


def test_config_file_json_and_yaml_with_flags_on_top(tmp_path):
    (tmp_path / "run.yaml").write_text("dataset: synthetic\ntask: 8-4\nlr: 0.05\nuse_cds: false\namp: fp16\n")
    config = _config(["--config", str(tmp_path / "run.yaml"), "--lr", "0.01"])
    assert (config.dataset, config.task, config.use_cds, config.amp) == ("synthetic", "8-4", False, "fp16")
    assert config.lr == 0.01  # the flag beats the file
    assert config.epochs == TrainConfig.preset("demo").epochs  # what neither gives: the preset of the dataset
    (tmp_path / "run.json").write_text(json.dumps({"dataset": "synthetic", "epochs": 2}))
    assert _config(["--config", str(tmp_path / "run.json")]).epochs == 2


def test_a_runs_config_json_is_a_valid_config_file(tmp_path):
    original = TrainConfig.preset("demo", task="6-2", seed=7, lambda_dice=0.3)
    (tmp_path / "config.json").write_text(json.dumps({"config": original.to_dict(), "launch": {"world_size": 1}}))
    assert _config(["--config", str(tmp_path / "config.json")]) == original
    legacy = {**original.to_dict(), "amp": False}  # written before --amp took bf16|fp16|off
    (tmp_path / "old.json").write_text(json.dumps({"config": legacy, "launch": {}}))
    assert _config(["--config", str(tmp_path / "old.json")]).amp == "off"


@pytest.mark.parametrize("name, content, words", [
    ("bad.json", "{", ["bad.json"]),
    ("unknown.yaml", "dataset: synthetic\nlearning_rate: 0.1\n", ["unknown.yaml", "learning_rate"]),
    ("list.yaml", "- 1\n- 2\n", ["list.yaml", "mapping"]),
    ("config.toml", "lr = 1", ["config.toml", ".json, .yaml or .yml"]),
    ("amp.json", '{"dataset": "synthetic", "amp": "fp32"}', ["amp", "bf16, fp16, off"]),
])
def test_bad_config_files_are_errors_naming_them(tmp_path, name, content, words):
    (tmp_path / name).write_text(content)
    with pytest.raises(CommandError) as info:
        _config(["--config", str(tmp_path / name)])
    assert all(word in str(info.value) for word in words), str(info.value)
    with pytest.raises(CommandError, match="missing.json"):
        _config(["--config", str(tmp_path / "missing.json")])


def test_logging_is_rank_aware(monkeypatch):
    stream = io.StringIO()
    handler = configure_logging(logging.INFO, stream)
    logger = logging.getLogger("incrementer_fast.continual.train")
    try:
        logger.info("rank 0 progress")
        monkeypatch.setenv("RANK", "3")  # another process of a torchrun launch
        logger.info("rank 3 progress")
        logger.warning("rank 3 trouble")
    finally:
        logging.getLogger("incrementer_fast").removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith(" rank 0 progress")
    assert lines[1].endswith(" [rank 3] rank 3 trouble")
