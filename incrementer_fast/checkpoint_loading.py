"""What an Incrementer checkpoint may ask of the loader: bounded, before anything is allocated.

A checkpoint is data, not instructions. ``Incrementer.from_checkpoint`` therefore

1. reads it with ``weights_only=True`` and memory-mapped (``read_checkpoint``): the tensors stay on disk
   until they are copied into the model;
2. takes from its ``config`` only the architecture fields (``ARCHITECTURE_FIELDS``, each type-checked):
   an unknown key, and in particular a path (``weights``) or a download switch (``pretrained``), is refused,
   so loading never reads another file or starts a download;
3. checks the cheap counts first (``check_counts``: decoder blocks and class tokens in the state dict
   against ``n_layers`` and ``classes_per_step``), so a metadata of ``n_layers=3000`` or
   ``classes_per_step=[3000000]`` is refused before any model is built;
4. builds the model on the ``meta`` device (no memory) and checks every tensor of the state dict, name,
   shape and dtype, against it (``check_state``); only then is the real model allocated and loaded.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from .errors import CheckpointError

__all__ = ["ARCHITECTURE_FIELDS", "architecture_config", "check_counts", "check_state"]


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


ARCHITECTURE_FIELDS: dict[str, tuple[str, object]] = {
    "backbone": ("a timm model name", lambda v: isinstance(v, str)),
    "d_model": ("an int", _int),
    "n_layers": ("an int", _int),
    "n_heads": ("an int", _int),
    "mlp_ratio": ("a number", _number),
    "dropout": ("a number", _number),
    "attn_dropout": ("a number", _number),
    "drop_path_rate": ("a number", _number),
    "scale": ("a number", _number),
    "learnable_scale": ("true or false", lambda v: isinstance(v, bool)),
    "new_token_init": ("a string", lambda v: isinstance(v, str)),
    "attention": ("a string", lambda v: isinstance(v, str)),
    "img_size": ("null, an int or two ints",
                 lambda v: v is None or _int(v) or (isinstance(v, list) and len(v) == 2 and all(map(_int, v)))),
}
"""The ``config`` fields a checkpoint holds (what ``Incrementer.save`` writes): name -> (what it must be,
check). Nothing else reaches the constructor."""
REQUIRED_FIELDS = ("backbone", "n_layers")


def architecture_config(config: Mapping, path: str) -> dict:
    """The checkpoint's ``config``, checked: only ``ARCHITECTURE_FIELDS``, each of its type, the required
    ones present; CheckpointError naming the file and the fields otherwise."""
    unknown = sorted(str(k) for k in config if k not in ARCHITECTURE_FIELDS)
    if unknown:
        raise CheckpointError(
            f"checkpoint {path} has config fields a checkpoint may not hold: {', '.join(unknown)} (only the "
            f"architecture: {', '.join(ARCHITECTURE_FIELDS)}; never a file path or a download switch)")
    missing = [k for k in REQUIRED_FIELDS if k not in config]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks config field(s) {', '.join(missing)}: it was not "
                              "written by Incrementer.save")
    wrong = [f"{k} must be {ARCHITECTURE_FIELDS[k][0]}, got {v!r}" for k, v in config.items()
             if not (v is None and k in ("d_model", "n_heads")) and not ARCHITECTURE_FIELDS[k][1](v)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} has a malformed config: {'; '.join(wrong)}")
    return dict(config)


def _indices(state: Mapping, pattern: str) -> set[int]:
    expression = re.compile(pattern)
    return {int(m.group(1)) for m in map(expression.match, map(str, state)) if m}


def check_counts(config: Mapping, classes_per_step, state: Mapping, path: str) -> None:
    """CheckpointError unless the state dict holds exactly ``n_layers`` decoder blocks and one class-token
    tensor of ``n`` rows per step of ``classes_per_step`` (checked on the stored tensors' shapes: nothing is
    built or allocated)."""
    blocks = _indices(state, r"^blocks\.(\d+)\.")
    if blocks != set(range(config["n_layers"])):
        raise CheckpointError(f"checkpoint {path}: its config says n_layers={config['n_layers']!r} but its weights "
                              f"hold {len(blocks)} decoder block(s)")
    tokens = [state.get(f"class_tokens.{i}") for i in range(len(classes_per_step))]
    rows = [int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() == 2 else None for t in tokens]
    extra = _indices(state, r"^class_tokens\.(\d+)$") - set(range(len(classes_per_step)))
    if rows != list(classes_per_step) or extra:
        raise CheckpointError(f"checkpoint {path}: its classes_per_step {list(classes_per_step)!r} do not match "
                              f"its class tokens ({len(rows) + len(extra)} tensor(s), rows {rows})")


def check_state(expected: Mapping[str, torch.Tensor], state: Mapping, path: str) -> None:
    """CheckpointError naming every missing, unexpected, non-tensor, wrongly shaped or wrongly typed entry of
    ``state`` against ``expected`` (the state dict of the model built on the meta device)."""
    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    wrong = []
    for name, want in expected.items():
        have = state.get(name)
        if name not in state:
            continue
        if not isinstance(have, torch.Tensor):
            wrong.append(f"{name}: a {type(have).__name__}, not a tensor")
        elif tuple(have.shape) != tuple(want.shape) or have.dtype != want.dtype:
            wrong.append(f"{name}: file {tuple(have.shape)} {have.dtype} vs model {tuple(want.shape)} {want.dtype}")
    if missing or unexpected or wrong:
        def short(names):
            return ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")

        raise CheckpointError(
            f"checkpoint {path}: its weights do not fit its own architecture: missing keys [{short(missing)}]; "
            f"unexpected keys [{short(unexpected)}]; shapes [{short(wrong)}]")
