"""Pretrained encoders through timm's own mechanism, the refusals, and the paper-scale presets. No test
touches the network: the Hugging Face hub is forced offline and pointed at a temporary cache that holds a
small checkpoint in the hub's layout."""
import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

import incrementer_fast as inc
from incrementer_fast.cli import build_parser, config_from_args, main
from incrementer_fast.continual.config import PRESETS, TrainConfig
from incrementer_fast.continual.run import check_encoder_init

BACKBONE = "test_vit"  # timm's 6-block, width-64 ViT; its pretrained tag lives at timm/test_vit.r160_in1k


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline hub whose cache is ``tmp_path / "hub"`` (empty until a test fills it)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_checkpoint(cache, backbone: str) -> dict:
    """Write a random checkpoint of ``backbone`` where the hub client looks for its default pretrained tag
    (models--ORG--NAME/refs/main → snapshots/COMMIT/model.safetensors); returns its state dict."""
    torch.manual_seed(1)
    state = timm.create_model(backbone, pretrained=False).state_dict()
    org, name = timm.models.get_pretrained_cfg(backbone).hf_hub_id.split("/")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{org}--{name}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))
    return state


def test_pretrained_loads_timms_weights_from_the_hub_cache(offline_hub):
    state = cache_checkpoint(offline_hub, BACKBONE)
    model = inc.Incrementer(BACKBONE, 3, pretrained=True)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert "pretrained" not in model.config  # a checkpoint rebuilds without downloading anything
    resized = inc.Incrementer(BACKBONE, 3, pretrained=True, img_size=64)  # timm resamples the 10×10 grid once
    assert resized.encoder.pos_embed.shape == (1, 1 + 16, 64)
    assert torch.equal(resized.encoder.blocks[5].mlp.fc2.weight, state["blocks.5.mlp.fc2.weight"])
    with pytest.raises(ValueError, match="not both"):
        inc.Incrementer(BACKBONE, 3, pretrained=True, weights="vit.pth")


def test_no_network_and_no_file_names_both_ways(offline_hub):
    with pytest.raises(FileNotFoundError) as error:
        inc.Incrementer(BACKBONE, 3, pretrained=True)
    message = str(error.value)
    assert "timm/test_vit.r160_in1k" in message and "network access" in message and "--weights PATH" in message


def test_a_random_vit_b_needs_from_scratch():
    with pytest.raises(ValueError, match=r"width 768.*--pretrained.*--weights PATH.*--from-scratch"):
        check_encoder_init(TrainConfig(pretrained=False))
    check_encoder_init(TrainConfig(pretrained=False, from_scratch=True))
    check_encoder_init(TrainConfig(pretrained=False, weights="vit_b.pth"))
    check_encoder_init(TrainConfig(pretrained=False, backbone="vit_small_patch16_224"))  # width 384
    check_encoder_init(TrainConfig.demo())


def test_cli_refuses_a_random_vit_b_before_creating_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--dataset", "synthetic", "--backbone", "vit_base_patch16_384",
                 "--no-pretrained", "--quiet"])
    assert code == 2 and "--from-scratch" in capsys.readouterr().err and not out.exists()  # refused input: 2


def test_presets_and_their_selection():
    assert TrainConfig() == TrainConfig.preset("voc")  # the dataclass defaults are the VOC preset
    voc, ade = TrainConfig.preset("voc"), TrainConfig.preset("ade")
    for config in (voc, ade):
        assert (config.backbone, config.pretrained, config.crop_size, config.val_size, config.img_size) == (
            "vit_base_patch16_384", True, 512, 512, 512)
        assert (config.batch_size, config.lr, config.lr_incremental, config.weight_decay, config.poly_power) == (
            8, 1e-3, 1e-4, 0.0, 0.9)
        assert (config.train_augmentation, config.train_scale_min, config.train_scale_max) == (
            "random_resized_crop", 0.5, 2.0)
    assert (voc.task, voc.epochs, voc.epochs_incremental) == ("15-1", 30, 30)
    assert (ade.dataset, ade.task, ade.epochs, ade.epochs_incremental) == ("ade", "100-50", 60, 60)
    assert set(PRESETS) == {"voc", "ade", "demo"} and not TrainConfig.demo().pretrained
    with pytest.raises(ValueError, match="preset must be one of"):
        TrainConfig.preset("cityscapes")

    parser = build_parser()
    by_dataset = config_from_args(parser.parse_args(["train", "--out", "r", "--dataset", "ade", "--data-root", "d"]))
    assert by_dataset == TrainConfig.preset("ade", data_root="d")
    chosen = config_from_args(parser.parse_args(["train", "--out", "r", "--preset", "ade", "--data-root", "d",
                                                 "--epochs", "2"]))
    assert (chosen.dataset, chosen.epochs, chosen.epochs_incremental) == ("ade", 2, 60)
