"""A small dataset in the ``--dataset folder`` layout, written with PIL (real JPEG and PNG files)."""
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("background", "red box", "green box", "blue box")
COLOURS = ((220, 40, 40), (40, 200, 60), (40, 60, 220))


def write_folder_dataset(root, num_train: int = 8, num_val: int = 4, size: int = 32, seed: int = 0) -> Path:
    """``root`` with classes.txt, images/ (JPEG for even ids, PNG for odd ones), labels/ (mode L PNGs, a
    void border of 255) and splits/{train,val}.txt; every image holds one or two coloured boxes."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for folder in ("images", "labels", "splits"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    splits = {"train": [], "val": []}
    for index in range(num_train + num_val):
        image = np.full((size, size, 3), 128, dtype=np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
        label = np.zeros((size, size), dtype=np.uint8)
        for c in {index % 3 + 1, int(rng.integers(1, 4))}:
            y, x = rng.integers(0, size // 2, 2)
            h, w = rng.integers(size // 4, size // 2, 2)
            image[y:y + h, x:x + w] = COLOURS[c - 1]
            label[y:y + h, x:x + w] = c
        label[0, :] = 255
        image_id = f"img{index:03d}"
        suffix = ".jpg" if index % 2 == 0 else ".png"
        Image.fromarray(image).save(root / "images" / f"{image_id}{suffix}", quality=95)
        Image.fromarray(label).save(root / "labels" / f"{image_id}.png")
        splits["train" if index < num_train else "val"].append(image_id)
    for split, ids in splits.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
