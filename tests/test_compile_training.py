"""``--compile``: ``auto`` compiles on CUDA only."""
import torch

from incrementer_fast.continual.config import TrainConfig
from incrementer_fast.continual.train import compile_enabled


def test_compile_auto_is_on_for_cuda_and_off_for_the_cpu():
    config = TrainConfig.demo()
    assert config.compile == "auto"
    assert compile_enabled(config, torch.device("cuda", 0)) and not compile_enabled(config, torch.device("cpu"))
    assert compile_enabled(TrainConfig.demo(compile="on"), torch.device("cpu"))
    assert not compile_enabled(TrainConfig.demo(compile="off"), torch.device("cuda", 0))
    assert TrainConfig.from_dict({**TrainConfig.demo().to_dict(), "compile": True}).compile == "on"  # old runs
