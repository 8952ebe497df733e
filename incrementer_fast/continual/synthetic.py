"""A built-in synthetic segmentation dataset, written to disk in the Pascal VOC layout.

Twelve foreground classes, each a (shape, texture, colour family) triple chosen so that no single cue
identifies a class: every colour family is shared by two classes that differ in shape and texture, and
every shape by two classes that differ in colour and texture::

    1 red disc, solid            7 yellow star, solid
    2 red square, stripes        8 yellow hexagon, stripes
    3 green triangle, solid      9 purple disc, checker
    4 green ring, checker       10 cyan triangle, dots
    5 blue cross, solid         11 purple square, gradient
    6 blue diamond, dots        12 cyan ring, stripes

Hues are jittered per object so that neighbouring families (red/yellow through orange, blue/purple)
overlap a little. Objects are rotated, scaled and slightly stretched, one to four per image, drawn in
random order so that later ones occlude earlier ones, over a cluttered background of procedural colour
noise, irregular blobs and lines in any colour (background-only distractors: a red blob is not a red
disc, so the shape must be learned). Classes are drawn independently per image, so every incremental
step has images where old and new classes appear together, and images with old classes only.

Label maps follow VOC: 0 background, 1..12 the classes, 255 on a thin band along every object boundary
(VOC's void border), so the ignore path of the pipeline is exercised. Labels are lossless PNG; images are
PNG too (in ``JPEGImages``, as the VOC loader accepts ``.jpg`` or ``.png``).

Everything is a deterministic function of (seed, split, image index, image size): image i of a split does
not depend on how many images are generated, and the files are bit-identical for a seed on a given
numpy/Pillow/zlib stack. Generation is vectorised numpy (a few hundred 96x96 images in about a second or
two) and atomic: files are written to a temporary folder, moved into place, and ``manifest.json`` (the
parameters) is written last; an existing dataset with the same manifest is reused as is. It is read back
by ``incrementer_fast.continual.datasets.SyntheticSegmentation`` (the VOC loader with these 13 classes).
"""
from __future__ import annotations

import colorsys
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .._files import atomic_write_json
from ..constants import IGNORE_INDEX

GENERATOR_VERSION = 1

# (name, shape, texture, hue in [0, 1))
CLASS_SPECS = (
    ("red_disc", "disc", "solid", 0.00),
    ("red_square", "square", "stripes", 0.02),
    ("green_triangle", "triangle", "solid", 0.33),
    ("green_ring", "ring", "checker", 0.30),
    ("blue_cross", "cross", "solid", 0.62),
    ("blue_diamond", "diamond", "dots", 0.65),
    ("yellow_star", "star", "solid", 0.15),
    ("yellow_hexagon", "hexagon", "stripes", 0.13),
    ("purple_disc", "disc", "checker", 0.78),
    ("cyan_triangle", "triangle", "dots", 0.50),
    ("purple_square", "square", "gradient", 0.80),
    ("cyan_ring", "ring", "stripes", 0.48),
)
NUM_FOREGROUND_CLASSES = len(CLASS_SPECS)
CLASS_NAMES = ("background",) + tuple(spec[0] for spec in CLASS_SPECS)

_SPLITS = {"train": 0, "val": 1}
_SPLIT_FILES = {"train": "train_aug.txt", "val": "val.txt"}


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape of circumradius about 1 in object coordinates (u, v)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.8
    if shape == "triangle":
        return (v >= -0.5) & (v <= 1.0 - np.sqrt(3.0) * au)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "cross":
        return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "star":
        phi = np.arctan2(v, u)
        return np.sqrt(u * u + v * v) <= 0.42 + 0.58 * np.abs(np.cos(2.5 * phi)) ** 2
    if shape == "hexagon":
        s = np.sqrt(3.0) / 2.0
        return np.maximum(au, np.maximum(np.abs(0.5 * u + s * v), np.abs(0.5 * u - s * v))) <= 0.9
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, up: np.ndarray, vp: np.ndarray, u: np.ndarray, rng) -> np.ndarray:
    """Mixing weight in [0, 1] between an object's dark and bright colour; (up, vp) in pixels."""
    if texture == "solid":
        return 0.85 + 0.15 * np.clip(0.5 + 0.5 * u, 0.0, 1.0)  # soft shading only
    if texture == "stripes":
        period = rng.uniform(5.0, 7.0)
        return (np.sin(2 * np.pi * up / period) > 0).astype(np.float64)
    if texture == "checker":
        cell = rng.uniform(4.5, 6.5)
        return ((np.floor(up / cell) + np.floor(vp / cell)) % 2).astype(np.float64)
    if texture == "dots":
        spacing = rng.uniform(6.5, 8.0)
        du = np.mod(up, spacing) - spacing / 2
        dv = np.mod(vp, spacing) - spacing / 2
        return 1.0 - (du * du + dv * dv <= (0.3 * spacing) ** 2).astype(np.float64)
    if texture == "gradient":
        return np.clip(0.5 + 0.5 * u, 0.0, 1.0)
    raise ValueError(f"unknown texture {texture!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _smooth_noise(rng, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random (cells+1)^2 grid upsampled bilinearly to height x width."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1, channels))

    def axis(n):
        t = np.linspace(0.0, cells, n)
        i0 = np.minimum(t.astype(int), cells - 1)
        return i0, (t - i0)

    r0, fr = axis(height)
    c0, fc = axis(width)
    rows = grid[r0] * (1 - fr)[:, None, None] + grid[r0 + 1] * fr[:, None, None]  # (H, cells+1, C)
    return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c0 + 1] * fc[None, :, None]


def _window(cx: float, cy: float, extent: float, size: int) -> tuple[slice, slice]:
    """The rows and columns of the image within ``extent`` pixels of (cx, cy): shapes are drawn on
    their bounding window only, which keeps generation fast."""
    r0, r1 = max(int(cy - extent), 0), min(int(np.ceil(cy + extent)) + 1, size)
    c0, c1 = max(int(cx - extent), 0), min(int(np.ceil(cx + extent)) + 1, size)
    return slice(r0, max(r1, r0)), slice(c0, max(c1, c0))


def render_background(rng, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The cluttered background, float RGB (S, S, 3) around [0, 1]: a desaturated base colour with smooth
    colour noise, irregular blobs of any colour with a noise texture, and lines (all background: a red blob
    is not a red disc, so the shape must be learned). ``xs``, ``ys``: pixel-centre coordinates (S, S)."""
    size = xs.shape[0]
    base = _hsv(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.85))
    image = base + 0.18 * _smooth_noise(rng, size, size, int(rng.integers(3, 7)), 3)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, size, 2)
        radius = rng.uniform(0.06, 0.22) * size
        amplitudes = rng.uniform(0.05, 0.25, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        colour = _hsv(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0))
        win = _window(cx, cy, radius * 1.75, size)
        dx, dy = xs[win] - cx, ys[win] - cy
        phi = np.arctan2(dy, dx)
        wobble = 1.0 + sum(a * np.sin(k * phi + p) for a, k, p in zip(amplitudes, (2, 3, 5), phases))
        blob = np.hypot(dx, dy) <= radius * wobble
        shade = 1.0 + 0.25 * _smooth_noise(rng, blob.shape[0], blob.shape[1], 4, 1)
        image[win] = np.where(blob[..., None], colour * shade, image[win])
    for _ in range(int(rng.integers(0, 3))):
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.4, 0.4) * size
        width = rng.uniform(1.0, 2.5)
        colour = _hsv(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0))
        dist = (xs - size / 2) * np.sin(angle) - (ys - size / 2) * np.cos(angle) - offset
        image[np.abs(dist) <= width] = colour
    return image


def draw_object(image: np.ndarray, rng, xs: np.ndarray, ys: np.ndarray, inside, texture, hue: float):
    """Paint one object over ``image`` (in place) and return ``(window, mask)``: the object's bounding
    window (a pair of slices) and its boolean mask within that window.

    The object is placed, scaled (radius 0.14-0.28 of the image side), rotated and slightly stretched at
    random; ``inside(u, v)`` is the shape's inside-test in object coordinates (circumradius about 1),
    ``texture(up, vp, u, v, rng)`` the mixing weight in [0, 1] between the object's dark and bright colour
    ((up, vp) in pixels along the object's axes, (u, v) in object coordinates); ``hue`` is jittered per
    object."""
    size = xs.shape[0]
    cx, cy = rng.uniform(0.12, 0.88, 2) * size
    radius = rng.uniform(0.14, 0.28) * size
    theta = rng.uniform(0, 2 * np.pi)
    stretch = np.sqrt(rng.uniform(0.8, 1.25))
    bright = _hsv(hue + rng.normal(0.0, 0.025), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    dark = bright * rng.uniform(0.25, 0.45)
    win = _window(cx, cy, radius * stretch * 1.05, size)
    dx, dy = xs[win] - cx, ys[win] - cy
    up = dx * np.cos(theta) + dy * np.sin(theta)
    vp = -dx * np.sin(theta) + dy * np.cos(theta)
    u, v = up / (radius * stretch), vp * stretch / radius
    mask = inside(u, v)
    weight = texture(up, vp, u, v, rng)[..., None]
    image[win] = np.where(mask[..., None], dark + (bright - dark) * weight, image[win])
    return win, mask


def void_band(label: np.ndarray) -> np.ndarray:
    """VOC-style void band: ``label`` with 255 on every pixel whose 4-neighbourhood holds another label."""
    padded = np.pad(label, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
            | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    return np.where(edge, IGNORE_INDEX, label).astype(np.uint8)


def finish_image(image: np.ndarray, rng) -> np.ndarray:
    """Sensor noise (σ 0.03), clipping and quantisation to uint8."""
    image = image + rng.normal(0.0, 0.03, size=image.shape)
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _render(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (S, S, 3), label uint8 (S, S)) pair, a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SPLITS[split], index, size])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    image = render_background(rng, xs, ys)

    # Objects, drawn in order: later ones occlude earlier ones.
    label = np.zeros((size, size), dtype=np.uint8)
    count = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.35, 0.3, 0.15]))
    classes = rng.choice(NUM_FOREGROUND_CLASSES, size=count, replace=False) + 1
    for cls in classes:
        _, shape, texture, hue = CLASS_SPECS[cls - 1]
        win, mask = draw_object(image, rng, xs, ys, lambda u, v: _shape_mask(shape, u, v),
                                lambda up, vp, u, v, r: _texture(texture, up, vp, u, r), hue)
        label[win][mask] = cls
    return finish_image(image, rng), void_band(label)


def _image_id(split: str, index: int) -> str:
    return f"syn_{split}_{index:05d}"


def _manifest(seed: int, num_train: int, num_val: int, image_size: int) -> dict:
    return {
        "generator": "incrementer_fast.continual.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "classes": list(CLASS_NAMES),
    }


def read_manifest(root) -> dict | None:
    """The manifest of a synthetic dataset at ``root``, or None if there is none (or it is unreadable)."""
    path = Path(root) / "manifest.json"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("generator") == "incrementer_fast.continual.synthetic" else None


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """An advisory inter-process lock (several DDP ranks may generate into the same root at once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the temporary-folder-and-rename still keeps files whole
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def generate_synthetic(root, seed: int = 0, num_train: int = 480, num_val: int = 120,
                       image_size: int = 96) -> Path:
    """Write the synthetic dataset under ``root`` in the VOC layout and return ``root`` as a Path.

    Layout: ``root/VOCdevkit/VOC2012/{JPEGImages/<id>.png, SegmentationClassAug/<id>.png,
    ImageSets/Segmentation/{train_aug,val}.txt}`` and ``root/manifest.json``. If the manifest already
    records these parameters, nothing is written. A ``VOCdevkit`` folder under ``root`` that this
    generator did not write (no manifest) is never touched: FileExistsError.
    """
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("image_size", image_size, 16)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wanted = _manifest(int(seed), num_train, num_val, image_size)
    with _exclusive_lock(root / ".generate.lock"):
        if read_manifest(root) == wanted:
            return root
        target = root / "VOCdevkit"
        if target.exists() and read_manifest(root) is None:
            raise FileExistsError(
                f"{target} exists but {root / 'manifest.json'} does not: not a synthetic dataset written "
                f"by this generator; refusing to overwrite it"
            )
        staging = Path(tempfile.mkdtemp(prefix=".generate-", dir=root))
        try:
            voc = staging / "VOCdevkit" / "VOC2012"
            images, labels = voc / "JPEGImages", voc / "SegmentationClassAug"
            lists = voc / "ImageSets" / "Segmentation"
            for folder in (images, labels, lists):
                folder.mkdir(parents=True)
            for split, count in (("train", num_train), ("val", num_val)):
                ids = [_image_id(split, i) for i in range(count)]
                for i, image_id in enumerate(ids):
                    image, label = _render(int(seed), split, i, image_size)
                    Image.fromarray(image).save(images / f"{image_id}.png")
                    Image.fromarray(label).save(labels / f"{image_id}.png")
                (lists / _SPLIT_FILES[split]).write_text("".join(f"{i}\n" for i in ids))
            manifest_path = root / "manifest.json"
            if manifest_path.exists():
                manifest_path.unlink()  # invalidate first: a crash below leaves no stale manifest
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / "VOCdevkit", target)
            atomic_write_json(manifest_path, wanted)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def remove_staging_folders(root) -> list[Path]:
    """Delete the staging folders (``.generate-*``) that an interrupted ``generate_synthetic`` left under
    ``root``; returns them. Under the generator's lock, so a generation in progress is never touched."""
    root = Path(root)
    if not root.is_dir():
        return []
    with _exclusive_lock(root / ".generate.lock"):
        staging = sorted(p for p in root.glob(".generate-*") if p.is_dir())
        for folder in staging:
            shutil.rmtree(folder, ignore_errors=True)
    return staging
