"""The demo's runs: ``incrementer`` and ``finetune`` (or any of ``DEMO_CHOICES``: ``methods``) on every step of
the demo task, and the joint upper bound, on two CPU processes.

Four pieces of work, in two phases whose pieces are independent of each other:

1. step 0 (plain CE; the same training for every method, trained once into the first method's run directory,
   ``out/incrementer`` by default, and copied into the others) and ``joint`` (every class in one step,
   ``out/joint``);
2. the incremental steps of each method.

With ``workers=2`` two pieces of a phase run at once in two spawned processes; with ``workers=1`` one after
the other in this process. Every piece runs with ONE intra-op thread either way, so the numbers are the same
for any ``workers`` and on any machine with the same torch build (a multi-threaded reduction's rounding
depends on the thread count), and two processes use two cores better than one process with two threads
(the demo's matrices are small). Each run directory is resumable as ``run_scenario`` makes it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ..model import Incrementer
from .config import TrainConfig
from .dataset_names import build_dataset
from .report import class_palette, first_step_split, pick_comparison_images, plot_comparison, save_comparison_grid
from .run import (RunError, checkpoint_path, copy_finished_step, finished_steps, read_records, resolve_data_root,
                  run_scenario)
from .scenarios import get_task, remap_eval_labels
from .synthetic import CLASS_NAMES
from .train import predict
from .transforms import val_transform

DEMO_METHODS = ("incrementer", "finetune")
"""The methods of ``incrementer-fast demo`` by default (what fits its few minutes)."""
DEMO_CHOICES = ("incrementer", "mib", "plop", "finetune")
"""The methods ``--methods`` can name (``joint`` is the upper bound, run unless ``--no-joint``)."""


def parse_methods(text: str) -> tuple[str, ...]:
    """``--methods`` (``incrementer,mib,plop,finetune``) → the methods, in order; ``ValueError`` naming the
    option for an unknown, repeated or missing name."""
    methods = tuple(name.strip() for name in text.split(","))
    unknown = [m for m in methods if m not in DEMO_CHOICES]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--methods {text!r}: give distinct names among {', '.join(DEMO_CHOICES)}, separated by "
                         "commas (joint is the upper bound: --no-joint drops it)")
    return methods


def _run_piece(config: TrainConfig, out_dir: Path, step: int | None, resume: bool, progress: bool) -> list[dict]:
    """One piece of the demo with one intra-op thread (the thread count restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_scenario(config, out_dir, step=step, resume=resume, progress=progress)
    finally:
        torch.set_num_threads(previous)


def _run_in_worker(name: str, console_level: int | None, *piece) -> list[dict]:
    """``_run_piece`` in a worker process, whose log records go to stdout prefixed ``[name]`` when the parent
    prints the package's records (``console_level``: the parent's level, or None)."""
    if console_level is not None:
        from .logs import configure_logging

        handler = configure_logging(console_level, sys.stdout)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [{name}] %(message)s", datefmt="%H:%M:%S"))
    return _run_piece(*piece, False)


def _console_level() -> int | None:
    """The level at which this process prints the package's records to a console, None when it does not."""
    from .logs import ROOT_LOGGER

    logger = logging.getLogger(ROOT_LOGGER)
    return logger.getEffectiveLevel() if logger.handlers else None


def _run_phase(pieces: list[tuple], pool, progress: bool) -> list[list[dict]]:
    """Run ``pieces`` — (name, config, out_dir, step, resume) — in ``pool`` (None: here, one after the other)
    and return their records in order."""
    if pool is None:
        return [_run_piece(config, out_dir, step, resume, progress) for _name, config, out_dir, step, resume in pieces]
    level = _console_level()
    futures = [pool.submit(_run_in_worker, name, level, config, out_dir, step, resume)
               for name, config, out_dir, step, resume in pieces]
    return [future.result() for future in futures]


def _pool(workers: int):
    """Two worker processes (spawned: forking a process whose torch thread pools exist can deadlock), or a
    null context for ``workers=1``."""
    if workers <= 1:
        return contextlib.nullcontext()
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def run_demo(out, *, resume: bool = False, progress: bool = True, joint: bool = True,
             figures: bool = True, workers: int = 2, methods: tuple[str, ...] | None = None,
             **overrides) -> dict[str, list[dict]]:
    """The demo in ``out``: synthetic data in ``out/data``; each of ``methods`` (``DEMO_CHOICES``; ``None``:
    ``DEMO_METHODS``) on every step of the demo task (``out/incrementer``, ``out/finetune``, ...; the first
    trains the shared step 0) and, with ``joint``, every class in one step (``out/joint``, the upper bound);
    ``overrides`` change the demo preset (``TrainConfig.demo``). With
    ``figures``, ``out/comparison.png`` (mIoU per step, every method) and ``out/predictions.png``
    (validation images, ground truth and each method's final prediction). ``workers``: processes (see the
    module docstring; progress bars only with one). Returns method → metrics records (``joint``: its
    single record)."""
    out = Path(out)
    methods = DEMO_METHODS if methods is None else parse_methods(",".join(methods))
    base = TrainConfig.demo(data_root=str(out / "data"), **overrides)
    configs = {m: dataclasses.replace(base, method=m) for m in (*methods, "joint")}
    runs = {m: out / m for m in configs}
    progress = progress and workers <= 1
    if not resume:
        for run_dir in runs.values():
            if read_records(run_dir):
                raise RunError(f"{run_dir} already holds a run: pass --resume to continue the demo in {out} or "
                               "choose another --out")

    # Every piece skips what is finished (resume=True), so an interrupted demo continues where it stopped.
    owner = methods[0]  # trains the shared step 0
    first = []
    if 0 not in finished_steps(runs[owner]):
        first.append(("step 0", configs[owner], runs[owner], 0, True))
    if joint:
        first.append(("joint", configs["joint"], runs["joint"], None, True))
    with _pool(workers) as pool:
        _run_phase(first, pool, progress)
        for method in methods[1:]:
            if 0 not in finished_steps(runs[method]):
                copy_finished_step(runs[owner], runs[method], 0)
        second = [(m, configs[m], runs[m], None, True) for m in methods]
        results = dict(zip(methods, _run_phase(second, pool, progress)))
    if joint:
        results["joint"] = read_records(runs["joint"])
    if figures:
        demo_figures(out, base, {m: runs[m] for m in methods}, results)
    return results


def demo_figures(out, config, run_dirs: dict, results: dict[str, list[dict]], count: int = 4) -> None:
    """The demo's two figures in ``out``: ``comparison.png`` (``plot_comparison`` of the methods in
    ``run_dirs``, with ``results["joint"]`` as the upper bound when present) and ``predictions.png``
    (``save_comparison_grid`` of ``count`` validation images with every method's final-step model)."""
    out = Path(out)
    task = get_task(config.dataset, config.task)
    joint = results.get("joint")
    split = first_step_split(joint[-1], task) if joint else None
    steps = " → ".join(f"{s[0]}-{s[-1]}" if len(s) > 1 else str(s[0]) for s in task)
    plot_comparison(out / "comparison.png", {m: results[m] for m in run_dirs}, split,
                    title=f"synthetic {config.task} (classes {steps}), seed {config.seed}: mIoU after each step")

    last = len(task) - 1
    models = {m: Incrementer.from_checkpoint(checkpoint_path(d, last)) for m, d in run_dirs.items()}
    mean, std = next(iter(models.values())).normalization
    first_dir = next(iter(run_dirs.values()))
    val_set = build_dataset(config.dataset, resolve_data_root(config, first_dir), "val",
                            transform=val_transform(config.val_size, mean, std), cache_dir=Path(first_dir) / "cache")
    ids = pick_comparison_images(val_set.image_labels(), task, count)
    items = [val_set.subset(ids)[i] for i in range(len(ids))]
    images = torch.stack([image for image, _ in items])
    labels = remap_eval_labels(torch.stack([torch.as_tensor(label) for _, label in items]).long(), task, last)
    device = torch.device("cpu")
    predictions = {m: predict(model, images, config, device).cpu() for m, model in models.items()}
    names = CLASS_NAMES if config.dataset == "synthetic" else [str(c) for c in range(256)]
    save_comparison_grid(out / "predictions.png", images, labels, predictions, names,
                         class_palette(config.dataset), mean, std,
                         title=f"after the last step: step-0 classes 1-{task[0][-1]}, "
                               f"added later {task[1][0]}-{task[-1][-1]}")
