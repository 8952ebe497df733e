"""Split lists (``train_aug.txt``, ``val.txt``, a folder dataset's ``splits/*.txt``): one image per line.

A line is an id (``2007_000032``), a path whose stem is the id (``JPEGImages/2007_000032.jpg``), or MiB's,
PLOP's and DeepLab's pair of paths (``/JPEGImages/ID.jpg /SegmentationClassAug/ID.png``); blank lines are
skipped. What a hand-edited list can hold that silently changes the set is refused, naming the list and
the line: an id with whitespace inside (``img 01`` was read as ``img``), an id listed twice. A UTF-8 byte-order
mark (what some Windows editors write first) is dropped instead of becoming part of the first id.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["read_split_list"]


def _id_of(path: Path, number: int, line: str) -> str:
    fields = line.split()
    if len(fields) == 1:
        return Path(fields[0]).stem
    if len(fields) == 2 and all("/" in field for field in fields):  # an image path and its label's
        return Path(fields[0]).stem
    raise ValueError(f"split list {path} line {number}: {line.strip()!r} is not one id (an id cannot hold "
                     "whitespace; a two-path line is '/JPEGImages/ID.jpg /SegmentationClassAug/ID.png'): rename "
                     "the files or fix the line")


def read_split_list(path) -> list[str]:
    """The image ids of the split list at ``path``, in its order; ValueError naming the list (and the line)
    for a list that is not UTF-8, holds a malformed line or an id twice, or lists no image."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a leading byte-order mark is not part of an id
    except UnicodeDecodeError as error:
        raise ValueError(f"split list {path} is not UTF-8 text ({error})") from None
    ids, lines = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        image_id = _id_of(path, number, line)
        if image_id in lines:
            raise ValueError(f"split list {path} lists {image_id!r} twice (lines {lines[image_id]} and {number}): "
                             "remove the duplicate line")
        lines[image_id] = number
        ids.append(image_id)
    if not ids:
        raise ValueError(f"split list {path} lists no image")
    return ids
