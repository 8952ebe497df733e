"""The demo's pretrained encoder: scripts/pretrain_demo_encoder.py pretrains on classes disjoint from the
demo's, deterministically; the shipped file matches its provenance and is the demo's default."""
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from incrementer_fast import Incrementer
from incrementer_fast.continual import synthetic
from incrementer_fast.continual.config import DEMO_ENCODER_WEIGHTS, TrainConfig

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pretrain_demo_encoder.py"


@pytest.fixture(scope="module")
def pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_demo_encoder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rotations(mask_fn, grid):
    u, v = grid
    for angle in np.linspace(0, 2 * np.pi, 24, endpoint=False):
        c, s = np.cos(angle), np.sin(angle)
        yield mask_fn(c * u + s * v, -s * u + c * v)


def test_pretraining_shapes_and_textures_are_not_the_demos(pretrain):
    demo_shapes = {spec[1] for spec in synthetic.CLASS_SPECS}
    demo_textures = {spec[2] for spec in synthetic.CLASS_SPECS}
    assert not demo_shapes & set(pretrain.PRETRAIN_SHAPES)
    assert not demo_textures & set(pretrain.PRETRAIN_TEXTURES)
    # Not the demo's shapes under another name either: no rotation of a pretraining shape overlaps a demo
    # shape (scaled to the same area) with IoU ≥ 0.8.
    v, u = np.mgrid[-1.3:1.3:161j, -1.3:1.3:161j]
    for name in pretrain.PRETRAIN_SHAPES:
        for demo in demo_shapes:
            target = synthetic._shape_mask(demo, u, v)
            for mask in _rotations(lambda a, b: pretrain._inside(name, a, b), (u, v)):
                scale = np.sqrt(mask.sum() / target.sum())
                scaled = synthetic._shape_mask(demo, u / scale, v / scale)
                iou = (mask & scaled).sum() / (mask | scaled).sum()
                assert iou < 0.8, (name, demo, iou)


def test_pretraining_images_are_deterministic_and_their_labels_agree(pretrain):
    first = pretrain.render(0, 5, 64)
    again = pretrain.render(0, 5, 64)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    image, shape, texture, hue = first
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    objects = (shape != 0) & (shape != 255)
    assert objects.any()
    assert ((texture != 255) == objects).all() and ((hue != 255) == objects).all()
    assert texture[objects].max() < len(pretrain.PRETRAIN_TEXTURES) and hue[objects].max() < pretrain.HUE_BINS
    assert not np.array_equal(pretrain.render(1, 5, 64)[0], image)


def test_a_tiny_pretraining_is_reproducible_and_loads_into_the_demo_model(pretrain, tmp_path):
    digests = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt / "encoder.safetensors"
        assert pretrain.main(["--out", str(out), "--images", "8", "--batch-size", "4", "--eval-images", "4",
                              "--log-every", "1"]) == 0
        provenance = json.loads((out.parent / "encoder.safetensors.json").read_text())
        assert provenance["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
        assert provenance["settings"]["seed"] == 0 and provenance["script"] == "scripts/pretrain_demo_encoder.py"
        digests.append(provenance["sha256"])
    assert digests[0] == digests[1]
    Incrementer(TrainConfig.demo().backbone, 3, img_size=64, weights=out)


def test_the_shipped_encoder_matches_its_provenance_and_is_the_demos_default():
    path = Path(DEMO_ENCODER_WEIGHTS)
    demo = TrainConfig.demo()
    assert demo.weights == str(path)
    provenance = json.loads(path.with_name(path.name + ".json").read_text())
    data = path.read_bytes()
    assert len(data) < 5_000_000 and provenance["bytes"] == len(data)
    assert provenance["sha256"] == hashlib.sha256(data).hexdigest()
    assert provenance["settings"]["seed"] == 0 and provenance["settings"]["size"] == demo.img_size
    assert len(provenance["git_commit"]) == 40  # a clean checkout: no "-dirty"
    model = Incrementer(demo.backbone, 9, img_size=demo.img_size, weights=path)
    assert torch.isfinite(model.encoder.pos_embed).all()
