"""Pretrain the demo's encoder on synthetic images whose classes are NOT the demo's classes.

The demo (``incrementer-fast demo``) fine-tunes a small ViT on the built-in synthetic dataset, whose 12
classes are (shape, texture, hue) triples (incrementer_fast/continual/synthetic.py). A real Incrementer
starts from an ImageNet-pretrained ViT whose training labels are disjoint from the incremental protocol's;
this script plays ImageNet's part for the demo. Its images share the demo's image *domain* (the same
cluttered background generator, the same object placement, colour model and sensor noise) but none of the
demo's shapes and none of its textures:

* shapes (``PRETRAIN_SHAPES``): ellipse (aspect 0.45), U, semicircle, crescent, heart, arrow, L, T,
  parallelogram, bow tie, chevron, keyhole — the demo's disc, square, triangle, ring, cross, diamond, star and
  hexagon never appear, and no rotation of a pretraining shape overlaps a demo shape of the same area with
  an IoU of 0.8 or more (tests/test_demo_encoder.py; a pentagon, 0.90 against the disc, was replaced);
* textures (``PRETRAIN_TEXTURES``): waves, zigzag, crosshatch, concentric rings, spokes, speckle, bricks,
  outline, blotches — the demo's solid, stripes, checker, dots and gradient never appear;
* hues: uniform over the colour wheel, independent of shape and texture (colour is a property of every
  object, as in natural images; no (shape, texture, hue) combination of the demo is a pretraining class).

The task is dense and factorised: for every pixel, a linear head on the encoder's patch tokens (logits
upsampled bilinearly to pixels, as the Incrementer decoder's masks are) predicts the shape (13 values:
background + 12 shapes; void band ignored), and on object pixels two more heads predict the texture (9) and
the hue bin (12 bins of 30°). The sum of the three cross-entropies is minimised, so the features must keep
shape, texture and colour apart at patch level — what a segmentation of unseen (shape, texture, colour)
classes needs. Only the encoder is kept; the heads are dropped.

    python scripts/pretrain_demo_encoder.py --out incrementer_fast/assets/vit_demo_patch8_synthetic.safetensors

writes the encoder weights (safetensors, float16: half the size, and the fine-tuning starts from them in
float32 anyway) and ``<file>.json`` beside it: the script, its sha256, the git commit, every setting, the
seed, the versions, the time it took, the losses, and the sha256 of the weight file. Everything is a
function of the seed: the images (numpy generators seeded per image), the initialisation and the batch order
(torch generators seeded from ``--seed``); with one intra-op thread (``--threads 1``, the default) two runs
on the same torch build give bit-identical weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from incrementer_fast._files import atomic_write
from incrementer_fast.backbones import DEMO_BACKBONE
from incrementer_fast.constants import IGNORE_INDEX
from incrementer_fast.continual import synthetic

HUE_BINS = 12


# ------------------------------------------------------------------------------------ shapes and textures
def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a pretraining shape of circumradius about 1 in object coordinates (u, v)."""
    au, av = np.abs(u), np.abs(v)
    r = np.sqrt(u * u + v * v)
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.45) ** 2 <= 1.0
    if shape == "u_shape":
        return ((au <= 0.8) & (v >= 0.35) & (v <= 0.8)) | ((au >= 0.35) & (au <= 0.8) & (av <= 0.8))
    if shape == "semicircle":
        return (r <= 1.0) & (v >= -0.15)
    if shape == "crescent":
        return (r <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.75**2)
    if shape == "heart":
        x, y = u / 1.05, -v / 1.05 + 0.1
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    if shape == "arrow":
        shaft = (u >= -1.0) & (u <= 0.15) & (av <= 0.22)
        head = (u >= 0.15) & (u <= 1.0) & (av <= 0.65 * (1.0 - u) / 0.85)
        return shaft | head
    if shape == "ell":
        return ((u >= -0.8) & (u <= -0.3) & (av <= 0.8)) | ((au <= 0.8) & (v >= 0.3) & (v <= 0.8))
    if shape == "tee":
        return ((au <= 0.85) & (v >= -0.85) & (v <= -0.4)) | ((au <= 0.22) & (v >= -0.85) & (v <= 0.85))
    if shape == "parallelogram":
        return (av <= 0.5) & (np.abs(u - 0.6 * v) <= 0.6)
    if shape == "bowtie":
        return (au <= 0.9) & (av <= 0.8 * au + 0.08)
    if shape == "chevron":
        outer = v <= 0.9 - 1.1 * au
        inner = v <= 0.2 - 1.1 * au
        return outer & ~inner & (v >= -0.9)
    if shape == "keyhole":
        head = u * u + (v + 0.35) ** 2 <= 0.45**2
        foot = (v >= -0.35) & (v <= 0.9) & (au <= 0.15 + 0.3 * (v + 0.35) / 1.25)
        return head | foot
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, shape: str, up: np.ndarray, vp: np.ndarray, u: np.ndarray, v: np.ndarray,
             rng) -> np.ndarray:
    """Mixing weight in [0, 1] between an object's dark and bright colour; (up, vp) in pixels, (u, v) in
    object coordinates (``outline`` needs the shape)."""
    if texture == "outline":  # bright rim, dark interior: the shape shrunk to 68 % is the interior
        return 1.0 - _inside(shape, u / 0.68, v / 0.68).astype(np.float64)
    if texture == "waves":  # smooth (not binary) bands that undulate
        period, swing = rng.uniform(6.0, 9.0), rng.uniform(1.5, 3.0)
        return 0.5 + 0.5 * np.sin(2 * np.pi * (up + swing * np.sin(2 * np.pi * vp / 12.0)) / period)
    if texture == "zigzag":
        period = rng.uniform(6.0, 8.0)
        shift = np.abs(np.mod(vp, 6.0) - 3.0)
        return (np.mod(up + shift, period) < period / 2).astype(np.float64)
    if texture == "crosshatch":  # thin dark diagonal lines on a bright fill
        spacing = rng.uniform(5.0, 7.0)
        a = np.abs(np.mod(up + vp, spacing) - spacing / 2) < 0.75
        b = np.abs(np.mod(up - vp, spacing) - spacing / 2) < 0.75
        return 1.0 - (a | b).astype(np.float64)
    if texture == "concentric":
        period = rng.uniform(4.5, 6.5)
        return (np.mod(np.hypot(up, vp), period) < period / 2).astype(np.float64)
    if texture == "spokes":
        sectors = int(rng.integers(5, 9))
        return (np.mod(np.arctan2(vp, up) * sectors / np.pi, 2.0) < 1.0).astype(np.float64)
    if texture == "speckle":  # per-pixel random mix: high-frequency noise
        return (rng.uniform(size=up.shape) < 0.5).astype(np.float64)
    if texture == "bricks":  # dark mortar lines, joints offset every other row
        height, length = rng.uniform(4.5, 6.0), rng.uniform(8.0, 11.0)
        row = np.floor(vp / height)
        horizontal = np.mod(vp, height) < 1.0
        vertical = np.mod(up + 0.5 * length * np.mod(row, 2), length) < 1.0
        return 1.0 - (horizontal | vertical).astype(np.float64)
    if texture == "blotches":  # high-contrast smooth noise at a few-pixel scale
        field = synthetic._smooth_noise(rng, up.shape[0], up.shape[1], max(2, up.shape[0] // 4), 1)[..., 0]
        return (field > 0).astype(np.float64)
    raise ValueError(f"unknown texture {texture!r}")


PRETRAIN_SHAPES = ("ellipse", "u_shape", "semicircle", "crescent", "heart", "arrow", "ell", "tee", "parallelogram",
                   "bowtie", "chevron", "keyhole")
PRETRAIN_TEXTURES = ("waves", "zigzag", "crosshatch", "concentric", "spokes", "speckle", "bricks", "outline",
                     "blotches")
_STREAM = 7  # keeps these images' random streams apart from the demo dataset's ([seed, split 0/1, ...])


def render(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pretraining image ``index``: (image uint8 (S, S, 3), shape, texture, hue-bin labels uint8 (S, S)).

    Shape labels: 0 background, 1..12 ``PRETRAIN_SHAPES``; texture labels 0..8 and hue bins 0..11 on object
    pixels, 255 elsewhere; all three are 255 on the one-pixel void band along every object's boundary (as
    the demo's labels). One to four objects over the demo's background, later ones occluding earlier ones.
    """
    rng = np.random.default_rng([_STREAM, seed, index, size])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    image = synthetic.render_background(rng, xs, ys)
    instance = np.zeros((size, size), dtype=np.uint8)
    shape_label = np.zeros((size, size), dtype=np.uint8)
    texture_label = np.full((size, size), IGNORE_INDEX, dtype=np.uint8)
    hue_label = np.full((size, size), IGNORE_INDEX, dtype=np.uint8)
    count = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.35, 0.3, 0.15]))
    for number in range(1, count + 1):
        shape = PRETRAIN_SHAPES[int(rng.integers(len(PRETRAIN_SHAPES)))]
        texture_id = int(rng.integers(len(PRETRAIN_TEXTURES)))
        hue = float(rng.uniform())
        win, mask = synthetic.draw_object(
            image, rng, xs, ys, lambda u, v: _inside(shape, u, v),
            lambda up, vp, u, v, r: _texture(PRETRAIN_TEXTURES[texture_id], shape, up, vp, u, v, r), hue)
        instance[win][mask] = number
        shape_label[win][mask] = PRETRAIN_SHAPES.index(shape) + 1
        texture_label[win][mask] = texture_id
        hue_label[win][mask] = int(hue * HUE_BINS) % HUE_BINS
    void = synthetic.void_band(instance) == IGNORE_INDEX
    for label in (shape_label, texture_label, hue_label):
        label[void] = IGNORE_INDEX
    return synthetic.finish_image(image, rng), shape_label, texture_label, hue_label


def render_batch(seed: int, indices, size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (B, 3, S, S) float32 and labels (B, 3, S, S) int64 (shape, texture, hue)."""
    items = [render(seed, int(i), size) for i in indices]
    images = torch.from_numpy(np.stack([item[0] for item in items])).permute(0, 3, 1, 2).float().div_(255.0)
    images = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    labels = torch.from_numpy(np.stack([np.stack(item[1:]) for item in items])).long()
    return images, labels


# ------------------------------------------------------------------------------------ model and training
HEAD_SIZES = (len(PRETRAIN_SHAPES) + 1, len(PRETRAIN_TEXTURES), HUE_BINS)


class PretrainingNet(torch.nn.Module):
    """The demo's encoder (built exactly as ``inc.Incrementer`` builds it) and one linear layer over its
    patch tokens giving the shape, texture and hue-bin logits at patch resolution."""

    def __init__(self, size: int, drop_path_rate: float):
        super().__init__()
        from incrementer_fast import Incrementer

        model = Incrementer(DEMO_BACKBONE, 2, img_size=size, drop_path_rate=drop_path_rate)
        self.encoder = model.encoder
        self.normalization = model.normalization
        self.patch_size = int(self.encoder.patch_embed.patch_size[0])
        self.head = torch.nn.Linear(self.encoder.embed_dim, sum(HEAD_SIZES))
        torch.nn.init.trunc_normal_(self.head.weight, std=0.02)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        batch, _, height, width = images.shape
        tokens = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]
        grid = (height // self.patch_size, width // self.patch_size)
        logits = self.head(tokens).transpose(1, 2).reshape(batch, -1, *grid)
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return list(logits.split(HEAD_SIZES, dim=1))


def losses(net: PretrainingNet, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The three per-pixel cross-entropies (shape, texture, hue), each averaged over its labelled pixels."""
    return torch.stack([F.cross_entropy(logits, labels[:, k], ignore_index=IGNORE_INDEX)
                        for k, logits in enumerate(net(images))])


@torch.no_grad()
def evaluate(net: PretrainingNet, seed: int, first: int, count: int, size: int, mean, std) -> dict:
    """Pixel accuracy of each head and the shape head's mIoU (background included) on ``count`` held-out
    images (indices ``first ..``, never used for training)."""
    net.eval()
    correct = torch.zeros(3)
    total = torch.zeros(3)
    confusion = torch.zeros(HEAD_SIZES[0], HEAD_SIZES[0], dtype=torch.int64)
    for start in range(first, first + count, 64):
        images, labels = render_batch(seed, range(start, min(start + 64, first + count)), size, mean, std)
        for k, logits in enumerate(net(images)):
            valid = labels[:, k] != IGNORE_INDEX
            prediction = logits.argmax(1)
            correct[k] += (prediction[valid] == labels[:, k][valid]).sum()
            total[k] += valid.sum()
            if k == 0:
                confusion += torch.bincount(labels[:, 0][valid] * HEAD_SIZES[0] + prediction[valid],
                                            minlength=HEAD_SIZES[0] ** 2).view(HEAD_SIZES[0], HEAD_SIZES[0])
    net.train()
    tp = confusion.diagonal().double()
    iou = tp / (confusion.sum(0) + confusion.sum(1) - tp).double().clamp_min(1)
    accuracy = (correct / total.clamp_min(1)).tolist()
    return {"shape_miou": float(iou.mean()), "shape_pixel_acc": accuracy[0], "texture_pixel_acc": accuracy[1],
            "hue_pixel_acc": accuracy[2]}


def train(args) -> tuple[PretrainingNet, dict]:
    torch.manual_seed(args.seed)
    net = PretrainingNet(args.size, args.drop_path_rate)
    mean, std = net.normalization
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr)
    updates = args.images // args.batch_size
    warmup = max(1, int(args.warmup * updates))
    order = torch.Generator().manual_seed(args.seed)
    history = []
    started = time.perf_counter()
    running = torch.zeros(3)
    for update in range(updates):
        lr = args.lr * min((update + 1) / warmup,
                           0.5 * (1 + math.cos(math.pi * max(0, update - warmup) / max(1, updates - warmup))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = render_batch(args.seed, range(update * args.batch_size, (update + 1) * args.batch_size),
                                      args.size, mean, std)
        flip = torch.rand(images.shape[0], generator=order) < 0.5
        images[flip] = images[flip].flip(-1)
        labels[flip] = labels[flip].flip(-1)
        terms = losses(net, images, labels)
        optimizer.zero_grad(set_to_none=True)
        terms.sum().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip)
        optimizer.step()
        running += terms.detach()
        if (update + 1) % args.log_every == 0 or update + 1 == updates:
            seen = (update % args.log_every) + 1
            mean_terms = (running / seen).tolist()
            running.zero_()
            record = {"update": update + 1, "lr": lr, "loss_shape": mean_terms[0], "loss_texture": mean_terms[1],
                      "loss_hue": mean_terms[2], "seconds": round(time.perf_counter() - started, 1)}
            if args.eval_every and (update + 1) % args.eval_every == 0:
                record["held_out"] = evaluate(net, args.seed, args.images, 256, args.size, mean, std)
                # A snapshot to try the encoder on the demo before the run ends (not the shipped file).
                save_encoder(net, Path(args.out).with_suffix(f".update{update + 1}.safetensors"), args.size)
            history.append(record)
            print(json.dumps(record), flush=True)
    return net, {"history": history, "train_seconds": round(time.perf_counter() - started, 1)}


def save_encoder(net: PretrainingNet, out: Path, size: int) -> None:
    """The encoder's weights as float16 safetensors at ``out`` (atomically)."""
    from safetensors.torch import save

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in net.encoder.state_dict().items()}
    # One metadata key: safetensors writes a metadata dict in no fixed order, which would change the bytes.
    data = save(state, metadata={"description": f"{DEMO_BACKBONE} encoder pretrained on {size}x{size} synthetic "
                                                f"images by scripts/pretrain_demo_encoder.py (provenance: "
                                                f"{out.name}.json)"})
    with atomic_write(out) as handle:
        handle.write(data)


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the .safetensors file to write (provenance: <out>.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=80, help="image side in pixels (the demo's)")
    parser.add_argument("--images", type=int, default=64000, help="training images, each rendered once")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of updates of linear warm-up")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    parser.add_argument("--drop-path-rate", type=float, default=0.0)
    parser.add_argument("--eval-images", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed: reproducibility)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="updates between held-out checks and encoder snapshots <out>.update<N>.safetensors "
                             "(0: only at the end)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # What produced the file, read before training: the script may be edited while a long run goes on.
    script = Path(__file__).resolve()
    script_sha256, commit = sha256_of(script), _git_commit()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cpu_started = time.process_time()
    net, log = train(args)
    mean, std = net.normalization
    held_out = evaluate(net, args.seed, args.images, args.eval_images, args.size, mean, std)
    print(json.dumps({"held_out": held_out}), flush=True)

    save_encoder(net, out, args.size)
    provenance = {
        "file": out.name,
        "sha256": sha256_of(out),
        "bytes": out.stat().st_size,
        "dtype": "float16",
        "backbone": DEMO_BACKBONE,
        "script": "scripts/pretrain_demo_encoder.py",
        "script_sha256": script_sha256,
        "command": "python scripts/pretrain_demo_encoder.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": commit,
        "settings": vars(args),
        "pretraining_classes": {"shapes": list(PRETRAIN_SHAPES), "textures": list(PRETRAIN_TEXTURES),
                                "hue_bins": HUE_BINS},
        "demo_classes_excluded": [spec[0] for spec in synthetic.CLASS_SPECS],
        "held_out": held_out,
        "history": log["history"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "timm": __import__("timm").__version__},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {args.threads} torch thread(s)",
    }
    with atomic_write(out.parent / f"{out.name}.json") as handle:
        handle.write((json.dumps(provenance, indent=2) + "\n").encode())
    print(f"wrote {out} ({provenance['bytes']} bytes, sha256 {provenance['sha256']}) and {out.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
