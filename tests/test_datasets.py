"""Datasets: the synthetic generator, the VOC / ADE20K loaders on small fake layouts, transforms, errors."""
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from incrementer_fast.continual import datasets as ds_module
from incrementer_fast.continual import synthetic
from incrementer_fast.continual.datasets import (
    ADE20KSegmentation,
    VOCSegmentation,
    build_dataset,
    train_transform,
    val_transform,
)
from incrementer_fast.continual.scenarios import get_task, remap_train_labels, select_images
from incrementer_fast.continual.synthetic import SyntheticSegmentation, generate_synthetic

SMALL = dict(num_train=24, num_val=6, image_size=48)


def _tree_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".generate.lock"}


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn"), seed=0, **SMALL)


def test_generation_is_deterministic(syn_root, tmp_path):
    again = generate_synthetic(tmp_path / "again", seed=0, **SMALL)
    other = generate_synthetic(tmp_path / "other", seed=1, **SMALL)
    reference = _tree_bytes(syn_root)
    assert len(reference) == 2 * (24 + 6) + 2 + 1  # images, labels, two split lists, manifest
    assert _tree_bytes(again) == reference
    other_bytes = _tree_bytes(other)
    assert other_bytes.keys() == reference.keys()
    differing = [k for k in reference if k.endswith(".png") and other_bytes[k] != reference[k]]
    assert len(differing) == 2 * (24 + 6)


def test_image_does_not_depend_on_dataset_size(syn_root, tmp_path):
    bigger = generate_synthetic(tmp_path / "bigger", seed=0, num_train=30, num_val=6, image_size=48)
    name = "VOCdevkit/VOC2012/JPEGImages/syn_train_00005.png"
    assert (bigger / name).read_bytes() == (syn_root / name).read_bytes()


def test_generation_skips_when_manifest_matches_and_regenerates_otherwise(tmp_path):
    root = generate_synthetic(tmp_path / "d", seed=3, num_train=3, num_val=2, image_size=32)
    label = root / "VOCdevkit/VOC2012/SegmentationClassAug/syn_train_00000.png"
    stamp = label.stat().st_mtime_ns
    generate_synthetic(root, seed=3, num_train=3, num_val=2, image_size=32)
    assert label.stat().st_mtime_ns == stamp  # reused as is
    generate_synthetic(root, seed=3, num_train=4, num_val=2, image_size=32)
    assert len(SyntheticSegmentation(root, "train", cache_dir=tmp_path / "c")) == 4
    assert not [p for p in root.iterdir() if p.name.startswith(".generate-")]  # staging removed


def test_generation_refuses_to_overwrite_foreign_data(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_synthetic(tmp_path, num_train=2, num_val=1, image_size=32)
    assert (tmp_path / "VOCdevkit" / "VOC2012").is_dir()


def test_synthetic_content_and_class_structure():
    labels = [synthetic._render(0, "train", i, 64)[1] for i in range(60)]
    present = [set(np.unique(lab).tolist()) for lab in labels]
    seen = set().union(*present)
    assert seen == set(range(13)) | {255}  # every class, background and the void band
    several = sum(len(p - {0, 255}) >= 2 for p in present)
    assert several >= 20  # several objects per image: old and new classes co-occur
    task = get_task("synthetic", "8-4")
    index = {str(i): p for i, p in enumerate(present)}
    step1 = select_images(index, "synthetic", task, 1, overlap=True)
    assert any(index[i] & set(range(1, 9)) for i in step1)  # new-step images showing old classes
    assert len(select_images(index, "synthetic", task, 1, overlap=False)) >= 1


def test_loader_shapes_dtypes_and_lossless_labels(syn_root, tmp_path):
    train = SyntheticSegmentation(syn_root, "train", cache_dir=tmp_path)
    val = build_dataset("synthetic", syn_root, "val", cache_dir=tmp_path)
    assert len(train) == 24 and len(val) == 6
    assert train.ids == sorted(train.ids) and train.ids[0] == "syn_train_00000"
    image, label = train[3]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert label.shape == (48, 48) and label.dtype == torch.int64
    expected_image, expected_label = synthetic._render(0, "train", 3, 48)
    assert torch.equal(label, torch.from_numpy(expected_label).long())
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(expected_image).permute(2, 0, 1))


def test_image_labels_cached_and_invalidated(tmp_path, monkeypatch):
    root = generate_synthetic(tmp_path / "d", seed=0, num_train=5, num_val=2, image_size=32)
    cache = tmp_path / "cache"
    dset = SyntheticSegmentation(root, "train", cache_dir=cache)
    index = dset.image_labels()
    assert list(index) == dset.ids
    for image_id in dset.ids:
        values = sorted(np.unique(np.asarray(Image.open(dset.label_path(image_id)))).tolist())
        assert index[image_id] == values
    assert len(list(cache.glob("labels-*.json"))) == 1

    def no_reading(*args):
        raise AssertionError("label files read although the cache is valid")

    monkeypatch.setattr(ds_module, "_label_values", no_reading)
    assert SyntheticSegmentation(root, "train", cache_dir=cache).image_labels() == index
    monkeypatch.undo()

    # Rewrite one label map (different content, size and modification time): the cache must miss.
    path = dset.label_path(dset.ids[0])
    new = np.zeros((32, 32), dtype=np.uint8)
    new[4:9, 4:9] = 7
    Image.fromarray(new).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    fresh = SyntheticSegmentation(root, "train", cache_dir=cache).image_labels()
    assert fresh[dset.ids[0]] == [0, 7]
    assert {k: v for k, v in fresh.items() if k != dset.ids[0]} == {
        k: v for k, v in index.items() if k != dset.ids[0]}


def test_subset_and_label_transform(syn_root, tmp_path):
    dset = SyntheticSegmentation(syn_root, "train", cache_dir=tmp_path)
    sub = dset.subset(["syn_train_00004", "syn_train_00001"])
    assert sub.ids == ["syn_train_00004", "syn_train_00001"] and len(dset) == 24
    task = get_task("synthetic", "8-4")
    sub.label_transform = partial(remap_train_labels, task=task, step=1)
    assert dset.label_transform is None  # the subset is independent
    _, raw = dset[4]
    _, remapped = sub[0]
    assert torch.equal(remapped, remap_train_labels(raw, task, 1))
    assert set(remapped.unique().tolist()) <= {0, 9, 10, 11, 12, 255}
    assert list(sub.image_labels()) == sub.ids
    with pytest.raises(KeyError, match="not in this dataset"):
        dset.subset(["nope"])


def test_train_transform(syn_root, tmp_path):
    dset = SyntheticSegmentation(syn_root, "train", cache_dir=tmp_path)
    raw_values = set(dset[2][1].unique().tolist())
    dset.transform = train_transform(40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), scale=(0.5, 2.0))
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append([dset[2] for _ in range(6)])
    for image, label in outputs[0]:
        assert image.shape == (3, 40, 40) and image.dtype == torch.float32
        assert label.shape == (40, 40) and label.dtype == torch.int64
        assert set(label.unique().tolist()) <= raw_values | {255}  # nearest: no new label value
    for (i0, l0), (i1, l1) in zip(outputs[0], outputs[1]):
        assert torch.equal(i0, i1) and torch.equal(l0, l1)  # same seed, same crops
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(outputs[0], outputs[2]))
    # A small scale pads: padded pixels are ignored (255) and the image is the mean colour there (0).
    dset.transform = train_transform(96, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), scale=(0.5, 0.5))
    torch.manual_seed(0)
    image, label = dset[2]
    inside = torch.zeros(96, 96, dtype=torch.bool)
    inside[:24, :24] = True  # the 48 px image scaled by 0.5, at the top left (top right if flipped)
    if not torch.all(image[:, ~inside] == 0):
        inside = inside.flip(-1)
    assert torch.all(image[:, ~inside] == 0) and torch.all(label[~inside] == 255)
    assert torch.any(label[inside] != 255)


def test_val_transform_and_normalisation(syn_root, tmp_path):
    dset = SyntheticSegmentation(syn_root, "val", cache_dir=tmp_path)
    raw_image, raw_label = dset[1]
    dset.transform = val_transform(48, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    image, label = dset[1]
    assert image.shape == (3, 48, 48) and torch.equal(label, raw_label)  # same size: unchanged pixels
    expected = (raw_image - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / 0.2
    assert torch.allclose(image, expected, atol=1e-6)
    dset.transform = val_transform(24)
    image, label = dset[1]
    assert image.shape == (3, 24, 24) and label.shape == (24, 24)
    assert set(label.unique().tolist()) <= set(raw_label.unique().tolist())


def _write_rect(path: Path, width: int, height: int, value=None, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        arr = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    else:
        arr = np.zeros((height, width), dtype=np.uint8)
        arr[2:6, 3:9] = value
        arr[0, :] = 255
    Image.fromarray(arr).save(path)


def _fake_voc(root: Path, layout: str, ids=("2007_000032", "2008_000001")):
    if layout == "standard":
        voc = root / "VOCdevkit" / "VOC2012"
        labels, lists = voc / "SegmentationClassAug", voc / "ImageSets" / "Segmentation"
    else:  # PLOP: root/list, root/SegmentationClassAug, root/VOCdevkit/VOC2012/JPEGImages
        voc = root / "VOCdevkit" / "VOC2012"
        labels, lists = root / "SegmentationClassAug", root / "list"
    for k, image_id in enumerate(ids):
        _write_rect(voc / "JPEGImages" / f"{image_id}.jpg", 20, 14, mode="RGB")
        _write_rect(labels / f"{image_id}.png", 20, 14, value=15 + k)
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in ids[:1]))
    return voc, labels, lists


@pytest.mark.parametrize("layout", ["standard", "plop"])
def test_voc_layouts(tmp_path, layout):
    _fake_voc(tmp_path, layout)
    train = VOCSegmentation(tmp_path, "train", cache_dir=tmp_path / "cache")
    assert train.ids == ["2007_000032", "2008_000001"]
    image, label = train[1]
    assert image.shape == (3, 14, 20) and label.shape == (14, 20)
    assert train.image_labels() == {"2007_000032": [0, 15, 255], "2008_000001": [0, 16, 255]}
    assert len(build_dataset("voc", tmp_path, "val", cache_dir=tmp_path / "cache")) == 1


def test_voc_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        VOCSegmentation(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages")):
        VOCSegmentation(tmp_path)
    voc, labels, lists = _fake_voc(tmp_path, "standard")
    (labels / "2008_000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"label not found: {labels / '2008_000001.png'}"):
        VOCSegmentation(tmp_path, "train")
    (voc / "JPEGImages" / "2007_000032.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"image not found: {voc / 'JPEGImages' / '2007_000032.jpg'}"):
        VOCSegmentation(tmp_path, "val")
    (lists / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=f"split list not found: {lists / 'val.txt'}"):
        VOCSegmentation(tmp_path, "val")
    with pytest.raises(ValueError, match="split must be"):
        VOCSegmentation(tmp_path, "test")


def test_corrupt_image_and_bad_labels_are_named(tmp_path):
    voc, labels, _ = _fake_voc(tmp_path, "standard")
    dset = VOCSegmentation(tmp_path, "train", cache_dir=tmp_path / "cache")
    bad_image = voc / "JPEGImages" / "2007_000032.jpg"
    bad_image.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match=f"cannot read image {bad_image}"):
        dset[0]
    bad_label = labels / "2008_000001.png"
    _write_rect(bad_label, 20, 14, value=21)  # VOC classes are 0..20
    with pytest.raises(ValueError, match=f"label {bad_label} holds values \\[21\\] outside the classes 0..20"):
        dset[1]
    with pytest.raises(ValueError, match=f"label {bad_label} holds values \\[21\\]"):
        dset.image_labels()
    _write_rect(bad_label, 20, 14, mode="RGB")
    with pytest.raises(ValueError, match=f"label {bad_label} has mode RGB"):
        dset[1]
    bad_label.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"cannot read label {bad_label}"):
        dset[1]
    _write_rect(bad_label, 10, 14, value=3)
    with pytest.raises(ValueError, match="is 20x14 but its label .* is 10x14"):
        dset[1]


def test_ade20k_loader(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    with pytest.raises(FileNotFoundError, match=str(ade / "images" / "training")):
        ADE20KSegmentation(tmp_path, "train")
    for image_id, value in (("ADE_train_00000002", 150), ("ADE_train_00000001", 12)):
        _write_rect(ade / "images" / "training" / f"{image_id}.jpg", 16, 12, mode="RGB")
        _write_rect(ade / "annotations" / "training" / f"{image_id}.png", 16, 12, value=value)
    dset = build_dataset("ade", tmp_path, "train", cache_dir=tmp_path / "cache")
    assert dset.ids == ["ADE_train_00000001", "ADE_train_00000002"]
    assert dset.image_labels()["ADE_train_00000002"] == [0, 150, 255]
    assert dset[1][1].max() == 255
    _write_rect(ade / "images" / "validation" / "ADE_val_00000001.jpg", 16, 12, mode="RGB")
    with pytest.raises(FileNotFoundError, match=str(ade / "annotations" / "validation")):
        ADE20KSegmentation(tmp_path, "val")
    (ade / "annotations" / "validation").mkdir()
    with pytest.raises(FileNotFoundError,
                       match=f"label not found: {ade / 'annotations' / 'validation' / 'ADE_val_00000001.png'}"):
        ADE20KSegmentation(tmp_path, "val")


def test_synthetic_missing_dataset_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "manifest.json")):
        SyntheticSegmentation(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        build_dataset("coco", tmp_path, "train")
