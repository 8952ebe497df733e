"""Datasets: the synthetic generator, the VOC / ADE20K loaders on small fake layouts, transforms, errors."""
import math
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from incrementer_fast.continual import datasets as ds_module
from incrementer_fast.continual import synthetic
from incrementer_fast.continual.dataset_names import build_dataset
from incrementer_fast.continual.datasets import ADE20KSegmentation, VOCSegmentation
from incrementer_fast.continual.scenarios import get_task, remap_train_labels, select_images
from incrementer_fast.continual.datasets import SyntheticSegmentation
from incrementer_fast.continual.synthetic import generate_synthetic
from incrementer_fast.continual.transforms import train_transform, val_transform

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
    assert len(list(cache.glob("scan-*.json"))) == 1

    def no_reading(*args):
        raise AssertionError("label files read although the cache is valid")

    monkeypatch.setattr(ds_module, "_scan_pair", no_reading)
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
    """MiB/PLOP's augmentation by default: crops of the crop size, labels only resampled (no new value, no
    padding), the same crops for the same seed, flips."""
    dset = SyntheticSegmentation(syn_root, "train", cache_dir=tmp_path)
    raw_values = set(dset[2][1].unique().tolist())
    dset.transform = train_transform(40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), scale=(0.5, 2.0))
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append([dset[2] for _ in range(6)])
    for image, label in outputs[0]:
        assert image.shape == (3, 40, 40) and image.dtype == torch.float32
        assert label.shape == (40, 40) and label.dtype == torch.int64 and type(label) is torch.Tensor
        assert set(label.unique().tolist()) <= raw_values  # nearest: no new label value, no padding
    for (i0, l0), (i1, l1) in zip(outputs[0], outputs[1]):
        assert torch.equal(i0, i1) and torch.equal(l0, l1)  # same seed, same crops
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(outputs[0], outputs[2]))


def test_rescale_pad_crop_option_pads_with_ignored_pixels():
    """The named option (the previous default): a small scale pads; padded pixels are ignored (255) and the
    image is the mean colour there (0 after normalisation)."""
    transform = train_transform(96, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), scale=(0.5, 0.5),
                                augmentation="rescale_pad_crop")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    torch.manual_seed(0)
    out_image, out_label = transform(image, Image.new("L", (48, 48), 3))
    assert out_image.shape == (3, 96, 96) and out_label.shape == (96, 96)
    padded = out_label == 255
    assert set(out_label.unique().tolist()) == {3, 255}
    assert int((~padded).sum()) == 24 * 24  # the 48 px image scaled by 0.5, somewhere in the crop
    assert torch.all(out_image[:, padded] == 0) and not torch.all(out_image[:, ~padded] == 0)
    with pytest.raises(ValueError, match="augmentation must be one of"):
        train_transform(32, augmentation="mosaic")


def _mib_get_params(width, height, scale, ratio):
    """MiB's RandomResizedCrop.get_params (fcdl94/MiB dataset/transform.py, MIT licence, Copyright (c) 2020
    Fabio Cermelli), transcribed with its draws taken from torch's generator (random.uniform(a, b) →
    uniform_(a, b) on a float32 tensor, random.randint(a, b) → torch.randint(a, b + 1)), in its order."""
    area = width * height
    for _attempt in range(10):
        target_area = torch.empty(1).uniform_(*scale).item() * area
        log_ratio = torch.log(torch.tensor(ratio))
        aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= width and h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_random_resized_crop_is_mibs():
    """The crop parameters follow MiB's get_params draw for draw, and for given parameters the image is
    PIL's bilinear resized crop and the label PIL's nearest one, bit for bit (MiB's transform.py:
    F.resized_crop(img, ..., Image.BILINEAR), F.resized_crop(lbl, ..., Image.NEAREST)). Stock v2 would
    resize the mask with torch's nearest, half a pixel off."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from incrementer_fast.continual.transforms import MIB_CROP_RATIO, RandomResizedCrop

    crop = RandomResizedCrop((37, 37), scale=(0.5, 2.0), ratio=MIB_CROP_RATIO)
    rng = np.random.default_rng(0)
    fallbacks = 0
    for seed in range(40):
        width, height = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        torch.manual_seed(seed)
        ours = crop.make_params([tv_tensors.Mask(torch.zeros(height, width, dtype=torch.uint8))])
        torch.manual_seed(seed)
        top, left, h, w = _mib_get_params(width, height, (0.5, 2.0), MIB_CROP_RATIO)
        assert (ours["top"], ours["left"], ours["height"], ours["width"]) == (top, left, h, w), seed
        fallbacks += (h, w) == (height, width)

        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        label = rng.integers(0, 21, (height, width), dtype=np.uint8)
        label[rng.random((height, width)) < 0.1] = 255
        params = dict(top=top, left=left, height=h, width=w)
        box = (left, top, left + w, top + h)
        mib_image = np.asarray(image.crop(box).resize((37, 37), Image.BILINEAR))
        mib_label = np.asarray(Image.fromarray(label).crop(box).resize((37, 37), Image.NEAREST))
        assert np.array_equal(np.asarray(crop.transform(image, params)), mib_image)
        mask = crop.transform(tv_tensors.Mask(torch.from_numpy(label)), params)
        assert isinstance(mask, tv_tensors.Mask) and np.array_equal(mask.numpy(), mib_label)
    assert fallbacks >= 1  # the whole-image fallback of 10 misfit draws was exercised
    stock = v2.RandomResizedCrop((37, 37)).transform(tv_tensors.Mask(torch.from_numpy(label)), params)
    assert not np.array_equal(stock.numpy(), mib_label)


def test_val_transform_is_mibs_resize_and_centre_crop():
    """MiB/PLOP's validation (crop_val): Resize(s) sets the short side to s and the long side to
    int(s · long / short), image bilinear and label nearest (PIL); CenterCrop(s) starts at
    int(round((long' − s) / 2))."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    label = Image.fromarray(rng.integers(0, 21, (37, 53), dtype=np.uint8))
    out_image, out_label = val_transform(24, mean=(0, 0, 0), std=(1, 1, 1))(image, label)
    long_side = int(24 * 53 / 37)
    left = int(round((long_side - 24) / 2))
    box = (left, 0, left + 24, 24)
    expected_image = np.array(image.resize((long_side, 24), Image.BILINEAR).crop(box))
    expected_label = np.array(label.resize((long_side, 24), Image.NEAREST).crop(box))
    assert torch.equal(out_label, torch.from_numpy(expected_label.astype(np.int64)))
    assert torch.equal((out_image * 255).round().byte().permute(1, 2, 0), torch.from_numpy(expected_image))
    full_image, full_label = val_transform(None)(image, label)
    assert full_image.shape == (3, 37, 53) and full_label.shape == (37, 53)


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
    with pytest.raises(ValueError, match=f"cannot read image {bad_image}.*and 1 more bad file"):
        dset.image_labels()  # the scan names the first bad file and counts the others
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
