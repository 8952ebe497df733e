"""A whole class-incremental run in one call, with a run directory that survives crashes.

``run_scenario(config, out_dir)`` trains every step of ``config.task`` (or one, ``step=k``) and writes::

    out_dir/config.json            the TrainConfig (plus the launch: world size, accumulation, device)
    out_dir/metrics.json           [{step, classes, miou_old, miou_new, miou_all, miou_prev, miou_step,
                                     per_class_iou, new_fp_rate, ...}, ...] one record per finished step
                                   (metrics.summarize: old = step-0 classes, new = classes added since)
    out_dir/metrics.csv            the same, one row per step, one column per class IoU
    out_dir/per_class_iou.csv      one row per class (index, name), its IoU after each step
    out_dir/step_<k>.pt            the model after step k (Incrementer.save: temporary file, then rename)
    out_dir/miou.png               old / new / all mIoU per step
    out_dir/predictions_step<k>.png  image | ground truth | prediction for validation images spread over
                                   the set, with a legend of the classes' names
    out_dir/step_<k>.epoch.pt      while step k trains: its state after the last finished epoch
                                   (epoch_state.py), removed when the step is finished
    out_dir/cache/                 the per-step image selections (see scenarios.cached_select_images)

A step is *finished* when its checkpoint and its metrics record both exist; the checkpoint is written first,
so a crash between the two only repeats that step. ``resume=True`` skips the finished steps and continues
from the last one's checkpoint, and a step interrupted after an epoch from its epoch checkpoint ("step 1:
resuming after epoch 2 of 4"). Each step's randomness is seeded by (seed, step) alone, so on the CPU a
resumed run gives the metrics of an uninterrupted one exactly.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised here (NCCL on CUDA, gloo on the
CPU) unless the caller already did; every process trains and evaluates its share, rank 0 alone writes.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .._files import atomic_write, atomic_write_json
from ..errors import CheckpointError, InputError, interruption_message
from ..model import Incrementer
from .baselines import DISTILLING_METHODS, EVERY_TOKEN_TRAINED_METHODS, train_every_class_token
from .config import RESUMABLE_FIELDS, TrainConfig, upgrade_config_values
from .consistency import check_finished_steps
from .dataset_names import build_dataset
from .datasets import VOC_CLASSES
from .epoch_state import epoch_checkpoint_path, load_epoch_state, save_epoch_state
from .evaluation_set import check_fingerprint, open_validation_set, split_fingerprint
from .folder import folder_options, read_class_names
from .lock import RunFolderLock, orphaned_temporary
from .logs import RunReports, run_log_file, tensorboard_available
from .metrics import summarize
from .orders import ClassOrder, resolve_class_order
from .report import class_palette, save_comparison_grid, spread_indices
from .scenarios import (cached_select_images, classes_up_to, get_task, num_classes, remap_eval_labels,
                        select_eval_images)
from .transforms import train_transform, val_transform
from .train import (DistEnv, current_dist_env, derive_seed, evaluate, predict, resolve_device,
                    seed_everything, step_epochs, step_learning_rate, train_step)
from .validation import check_split_overlap, check_step_selections

logger = logging.getLogger(__name__)

METRIC_KEYS = ("step", "classes", "miou_old", "miou_new", "miou_all", "miou_prev", "miou_step", "per_class_iou",
               "new_fp_rate")
MIOU_KEYS = ("miou_old", "miou_new", "miou_all", "miou_prev", "miou_step")


class RunError(InputError):
    """A run directory that cannot be used as asked (already finished, config mismatch, missing step)."""


# ------------------------------------------------------------------------------------ run directory
def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step}.pt"


def _read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise InputError(f"{path} cannot be read as the run's {what} ({error}); restore it, or start the "
                         "run in another --out") from error


def read_records(out_dir: Path) -> list[dict]:
    """The metrics records of a run directory (``[]`` when it has none); InputError naming metrics.json
    when it cannot be read."""
    path = Path(out_dir) / "metrics.json"
    if not path.exists():
        return []
    records = _read_json(path, "metrics")
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("step"), int)
                                                for r in records):
        raise InputError(f"{path} is not a list of step records; restore it, or start the run in another --out")
    return records


def read_run_file(out_dir: Path) -> dict | None:
    """A run directory's whole config.json (``config``, ``launch``, ``changes``, ``evaluation``; None when
    there is none); InputError naming the file when it cannot be read."""
    path = Path(out_dir) / "config.json"
    if not path.exists():
        return None
    stored = _read_json(path, "configuration")
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
        raise InputError(f"{path} has no \"config\" object; restore it, or start the run in another --out")
    return stored


def read_run_config(out_dir: Path) -> dict | None:
    """The ``config`` of a run directory's config.json (None when there is none); InputError naming the
    file when it cannot be read."""
    stored = read_run_file(out_dir)
    return None if stored is None else stored["config"]


def finished_steps(out_dir: Path) -> list[int]:
    """Steps with both a metrics record and a checkpoint."""
    return sorted(r["step"] for r in read_records(out_dir) if checkpoint_path(out_dir, r["step"]).exists())


def _check_resumable(stored: dict, config: TrainConfig, out_dir: Path) -> None:
    stored = upgrade_config_values(stored)
    current = config.to_dict()
    differing = [f"{k}: run has {stored.get(k)!r}, asked {current[k]!r}" for k in current
                 if k not in RESUMABLE_FIELDS and stored.get(k) != current[k]]
    if differing:
        raise RunError(f"{out_dir} was started with another configuration; "
                       f"resume with the same options or use another --out ({'; '.join(differing)})")


def write_metrics(out_dir: Path, records: list[dict], num_classes_total: int) -> None:
    """metrics.json (atomic) and metrics.csv (atomic), sorted by step."""
    records = sorted(records, key=lambda r: r["step"])
    atomic_write_json(Path(out_dir) / "metrics.json", records)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", "classes", *MIOU_KEYS, "new_fp_rate"] + [f"iou_{c}" for c in range(num_classes_total)])
    for r in records:
        ious = list(r["per_class_iou"]) + [None] * (num_classes_total - len(r["per_class_iou"]))
        writer.writerow([r["step"], " ".join(map(str, r["classes"]))]
                        + ["" if v is None else f"{v:.6f}" for v in
                           [*(r.get(k) for k in MIOU_KEYS), r["new_fp_rate"], *ious]])
    with atomic_write(Path(out_dir) / "metrics.csv") as handle:
        handle.write(buffer.getvalue().encode())


def write_class_table(out_dir: Path, records: list[dict], class_names) -> None:
    """per_class_iou.csv (atomic): one row per class of the dataset — ``class`` (its index), ``name``
    (``class_names``), then its IoU after each finished step (``step_<k>``; empty before the class is seen
    or without ground truth)."""
    records = sorted(records, key=lambda r: r["step"])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["class", "name", *(f"step_{r['step']}" for r in records)])
    for c, name in enumerate(class_names):
        ious = [r["per_class_iou"][c] if c < len(r["per_class_iou"]) else None for r in records]
        writer.writerow([c, name, *("" if v is None else f"{v:.6f}" for v in ious)])
    with atomic_write(Path(out_dir) / "per_class_iou.csv") as handle:
        handle.write(buffer.getvalue().encode("utf-8"))


def run_title(config: TrainConfig) -> str:
    """What a run's figures are of: its method, dataset and task (and class order, when one is set)."""
    order = f", class order {config.class_order}" if config.class_order is not None else ""
    return f"{config.method} on {config.dataset} {config.task}{order}"


def plot_miou(out_dir: Path, records: list[dict], title: str = "") -> None:
    """miou.png: old / new / all mIoU (%) per step, under ``title`` (``run_title``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: r["step"])
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for key, label in (("miou_old", "old"), ("miou_new", "new"), ("miou_all", "all")):
        values = [math.nan if r[key] is None else 100 * r[key] for r in records]
        ax.plot(steps, values, marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_write(Path(out_dir) / "miou.png") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------ data
def resolve_data_root(config: TrainConfig, out_dir: Path) -> Path:
    if config.data_root is not None:
        return Path(config.data_root)
    if config.dataset == "synthetic":
        return Path(out_dir) / "data"
    raise ValueError(f"--data-root is required for dataset {config.dataset!r}")


def prepare_synthetic(config: TrainConfig, root: Path) -> None:
    """Generate the synthetic dataset into ``root`` unless it is already there (deterministic from
    ``synthetic_seed``; generate_synthetic refuses a folder holding another dataset)."""
    from .synthetic import generate_synthetic

    generate_synthetic(root, seed=config.synthetic_seed, num_train=config.synthetic_train_images,
                       num_val=config.synthetic_val_images, image_size=config.synthetic_image_size)


def scenario_dataset(config: TrainConfig) -> str | int:
    """What ``scenarios`` names the dataset by: its name, or for ``folder`` its number of classes (the lines
    of ``classes.txt``)."""
    if config.dataset == "folder":
        if config.data_root is None:
            raise ValueError("--data-root is required for dataset 'folder'")
        return len(read_class_names(config.data_root))
    return config.dataset


def dataset_class_names(config: TrainConfig) -> tuple[str, ...]:
    """The names of the dataset's classes, by index (ADE20K's are its indices)."""
    if config.dataset == "folder":
        return read_class_names(config.data_root)
    if config.dataset == "voc":
        return VOC_CLASSES
    if config.dataset == "synthetic":
        from .synthetic import CLASS_NAMES

        return tuple(CLASS_NAMES)
    return tuple(str(c) for c in range(num_classes(config.dataset)))


def class_order(config: TrainConfig) -> ClassOrder | None:
    """``config.class_order`` resolved (``None``: the label order)."""
    order = resolve_class_order(config.class_order, config.dataset, num_classes(scenario_dataset(config)))
    return None if order is None else ClassOrder(order)


def scenario_task(config: TrainConfig) -> list[list[int]]:
    """The steps to train (class positions in ``config.class_order``; without one, the classes): the named
    task, or for ``joint`` all its classes in one step."""
    task = get_task(scenario_dataset(config), config.task)
    if config.method == "joint":
        return [classes_up_to(task, len(task) - 1)]
    return task


# Encoders at least this wide (ViT-B's 768) start from random weights only with --from-scratch.
FROM_SCRATCH_MIN_WIDTH = 768


def check_encoder_init(config: TrainConfig) -> None:
    """ValueError for a random initialisation of an encoder as wide as ViT-B or wider without
    ``from_scratch``: Segmenter's and Incrementer's numbers come from a pretrained ViT-B, and a silent
    random ViT-B gives numbers that cannot stand beside theirs."""
    import timm

    if config.weights is not None or config.pretrained or config.from_scratch or not timm.is_model(config.backbone):
        return  # (an unknown backbone is named when the model is built)

    with torch.device("meta"):  # the width without allocating the weights
        width = int(timm.create_model(config.backbone, pretrained=False, num_classes=0).embed_dim)
    if width >= FROM_SCRATCH_MIN_WIDTH:
        raise ValueError(
            f"backbone {config.backbone!r} (width {width}) would start from random weights. Segmenter and "
            "Incrementer fine-tune a pretrained encoder: use --pretrained (timm's weights, downloaded once into "
            "the Hugging Face cache) or --weights PATH (a local checkpoint); --from-scratch trains it from "
            "random weights on purpose")


def model_options(config: TrainConfig) -> dict:
    """The ``Incrementer`` constructor arguments that define the run's architecture (the rest of the
    constructor's are its defaults): what a step's checkpoint is checked against."""
    return dict(backbone=config.backbone, d_model=config.d_model, n_layers=config.n_layers, n_heads=None,
                mlp_ratio=4.0, attn_dropout=0.0, scale=config.scale, learnable_scale=config.learnable_scale,
                drop_path_rate=config.drop_path_rate, dropout=config.dropout, img_size=config.img_size)


def build_model(config: TrainConfig, num_classes: int) -> Incrementer:
    """Step 0's model: the encoder from ``weights`` (a local file), else timm's pretrained weights when
    ``pretrained``, else random (``check_encoder_init`` has refused a wide random encoder already)."""
    options = model_options(config)
    return Incrementer(options.pop("backbone"), num_classes, new_token_init=config.new_token_init,
                       weights=config.weights, pretrained=config.pretrained and config.weights is None,
                       attention=config.attention, **options)


def load_step(config: TrainConfig, task, out_dir: Path, step: int) -> Incrementer:
    """The model of finished step ``step`` from its checkpoint, checked against the run: the same
    architecture (``model_options``) and the task's class counts up to that step, every difference named."""
    path = checkpoint_path(out_dir, step)
    expect = dict(model_options(config), classes_per_step=[len(classes) for classes in task[:step + 1]])
    try:
        return Incrementer.from_checkpoint(path, attention=config.attention, expect=expect)
    except CheckpointError as error:
        raise CheckpointError(f"{error} — it is not this run's step {step}: restore the right file, or move it "
                              f"out of {out_dir} and rerun with --resume to train step {step} again") from error


# ------------------------------------------------------------------------------------ the run
def _init_distributed(config: TrainConfig) -> bool:
    """Initialise the process group of a torchrun launch; True when this call did it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    use_cuda = config.device != "cpu" and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def run_scenario(config: TrainConfig, out_dir, *, step: int | None = None, resume: bool = False,
                 retrain_from: int | None = None, progress: bool = True) -> list[dict]:
    """Train and evaluate the steps of ``config`` into ``out_dir``; returns the metrics records of the run
    directory (every finished step). ``step=k`` trains step k only (step k − 1 must be finished there);
    ``resume=True`` continues a run directory, skipping its finished steps; a finished step is trained
    again only from ``retrain_from=k`` on, which removes step k and every later finished step first
    (``plan_steps``). Progress is logged through
    ``logging`` and tqdm bars (``progress=False``: none); ``epochs.csv``, ``run.log`` and, with
    ``config.tensorboard``, TensorBoard scalars go to ``out_dir`` (see ``incrementer_fast.continual.logs``)."""
    out_dir = Path(out_dir)
    owns_group = _init_distributed(config)
    try:
        is_main = current_dist_env().is_main
        with (RunFolderLock(out_dir, enabled=is_main) as lock, run_log_file(out_dir, enabled=is_main),
              RunReports(out_dir, config, enabled=is_main) as reports):
            try:
                return _run(config, out_dir, step=step, resume=resume, retrain_from=retrain_from,
                            progress=progress, reports=reports, lock=lock)
            except BaseException as error:
                lock.undo()  # a refused request leaves nothing it created (nothing, once the run started)
                if isinstance(error, KeyboardInterrupt):  # into run.log too (when the run started), not only stderr
                    logger.warning(interruption_message(error))
                raise
    finally:
        if owns_group:
            dist.destroy_process_group()


def evaluate_checkpoint(config: TrainConfig, checkpoint, step: int, *, run_dir=None,
                        progress: bool = True) -> dict:
    """Re-score ``checkpoint`` — the model after step ``step`` of ``config.task`` — on that step's
    validation set, as the run scored it (``select_eval_images``, ``remap_eval_labels``, ``config.eval_mode``).

    Returns the step's record with the keys of metrics.json (``train_images`` aside), plus ``eval_mode`` and
    ``val_size`` (how it scored), ``checkpoint`` and ``class_names`` (the names of ``per_class_iou``'s classes,
    by index). ``run_dir`` locates a synthetic run's generated data and selection cache. Under torchrun every
    process scores its share; the matrix is summed over them.
    """
    owns_group = _init_distributed(config)
    try:
        started = time.perf_counter()
        env = current_dist_env()
        device = resolve_device(config, env)
        task = scenario_task(config)
        if not 0 <= step < len(task):
            raise ValueError(f"--step {step} is out of range: task {config.task!r} ({config.method}) has "
                             f"{len(task)} steps, 0..{len(task) - 1}")
        model = Incrementer.from_checkpoint(checkpoint, attention=config.attention).to(device)
        expected = len(classes_up_to(task, step))
        if model.num_classes != expected:
            raise ValueError(f"checkpoint {checkpoint} holds {model.num_classes} classes, but step {step} of task "
                             f"{config.task!r} has seen {expected}")
        data_root = resolve_data_root(config, run_dir if run_dir is not None else Path("."))
        cache_dir = Path(run_dir) / "cache" if run_dir is not None else None
        val_set = open_validation_set(config, data_root, cache_dir)
        order = class_order(config)
        val_labels = val_set.image_labels()  # the dataset's own indices, as the fingerprint was taken
        task_labels = val_labels
        if order is not None:
            val_set.label_transform, task_labels = order, order.positions_of(val_labels)
        eval_ids = select_eval_images(task_labels, scenario_dataset(config), task, step)
        if run_dir is not None:
            _check_run_evaluation_set(Path(run_dir), val_labels, eval_ids, step, data_root)
        val_set = val_set.subset(eval_ids)
        val_set.transform = eval_transform(config, *model.normalization)
        matrix = evaluate(model, val_set, config=config, task=task, step=step, device=device, env=env,
                          progress=progress)
        record = {"step": step, "classes": list(task[step]), **summarize(matrix, task, step),
                  "val_images": len(val_set), "seconds": round(time.perf_counter() - started, 2),
                  "eval_mode": config.eval_mode, "val_size": config.val_size, "checkpoint": str(checkpoint)}
        record = record if order is None else order.record_to_dataset(record)
        record["class_names"] = list(dataset_class_names(config))[:len(record["per_class_iou"])]  # by index
        return record
    finally:
        if owns_group:
            dist.destroy_process_group()


def _check_run_evaluation_set(run_dir: Path, val_labels, eval_ids, step: int, data_root) -> None:
    """InputError unless the validation split eval rebuilt is the one ``run_dir`` was scored on: its
    fingerprint in config.json, or (a run written before fingerprints) the step's image count in
    metrics.json."""
    stored = (read_run_file(run_dir) or {}).get("evaluation")
    check_fingerprint(split_fingerprint(val_labels), stored, data_root, run_dir)
    record = next((r for r in read_records(run_dir) if r["step"] == step), None)
    if stored is None and record is not None and record.get("val_images") != len(eval_ids):
        raise InputError(f"step {step} of {run_dir} was scored on {record.get('val_images')} validation images, "
                         f"but {data_root} gives {len(eval_ids)}: pass --data-root where the run's data is")


def _run(config: TrainConfig, out_dir: Path, *, step, resume, retrain_from, progress, reports: RunReports,
         lock: RunFolderLock) -> list[dict]:
    env = current_dist_env()
    log = logger.info if env.is_main else _silent

    # Everything that can be wrong with the request is found before anything is written: the device, the
    # task and step, the output folder, the run directory, the data's layout (cheap: before the model, which
    # may download weights), the model (options, or the checkpoint it continues), then every image and label
    # of both splits. The synthetic set is generated only after the model checks, as it is written.
    try:
        device = resolve_device(config, env)
        task = scenario_task(config)
        accumulation = config.accumulation_steps(env.world_size)
        data_root = resolve_data_root(config, out_dir)
        order = class_order(config)
        names = dataset_class_names(config)
        check_encoder_init(config)
    except ValueError as error:
        raise InputError(str(error)) from error
    except FileNotFoundError as error:
        raise InputError(f"{error}{_data_root_hint(error)}") from error
    if step is not None and not 0 <= step < len(task):
        raise InputError(f"--step {step} is out of range: task {config.task!r} ({config.method}) has "
                         f"{len(task)} steps, 0..{len(task) - 1}")
    if config.tensorboard and not tensorboard_available():
        raise InputError("--tensorboard needs the tensorboard package: pip install 'incrementer_fast[tensorboard]'")
    check_writable_folder(out_dir)
    if env.is_main and not lock.held:
        # A new folder is created and locked before anything is written there (caches, generated data); a
        # refused request removes it again (run_scenario: lock.undo).
        lock.create_and_acquire()
    records = read_records(out_dir)
    done = set(finished_steps(out_dir))
    if records and not resume and step is None and retrain_from is None:
        raise RunError(f"{out_dir} already holds a run (steps {sorted(done)} finished): "
                       "pass --resume to continue it or choose another --out")
    stored = read_run_config(out_dir)
    if stored is not None:
        _check_resumable(stored, config, out_dir)
    check_finished_steps(out_dir, records, {s: checkpoint_path(out_dir, s) for s in done},
                         task if order is None else order.task_to_dataset(task), model_options(config),
                         config.task, config.method)
    steps_to_run = plan_steps(out_dir, len(task), done, step=step, resume=resume, retrain_from=retrain_from)
    if not steps_to_run:
        log(f"every step of {out_dir} is already finished")
        return sorted(records, key=lambda r: r["step"])
    stale = sorted(s for s in done if s >= steps_to_run[0])  # only with retrain_from (plan_steps refuses else)
    cache_dir = out_dir / "cache"
    if config.dataset != "synthetic":
        train_set, val_set = _open_datasets(config, data_root, cache_dir)
    first = steps_to_run[0]
    if first == 0:
        seed_everything(derive_seed(config.seed, "init"))
        try:
            model = build_model(config, len(task[0]))
        except (TypeError, ValueError, FileNotFoundError) as error:
            raise InputError(f"cannot build the model: {error}") from error
    else:
        model = load_step(config, task, out_dir, first - 1)
    if config.crop_size % model.patch_size:
        raise InputError(f"--crop-size {config.crop_size} is not a multiple of the patch size "
                         f"{model.patch_size} of {config.backbone} (FOD weighs whole patches): use e.g. "
                         f"{max(1, round(config.crop_size / model.patch_size)) * model.patch_size}")

    if config.dataset == "synthetic":
        if env.is_main:
            from .synthetic import remove_staging_folders

            _report_removed(log, remove_staging_folders(data_root), "unfinished dataset staging folder")
            prepare_synthetic(config, data_root)
        _barrier(env)
        train_set, val_set = _open_datasets(config, data_root, cache_dir)
    scans = {}
    if env.is_main:  # rank 0 decodes both splits, then caches them (nothing written before both are valid)
        scans = _scan_both_splits(train_set, val_set, progress)
        for split, dataset in (("train", train_set), ("val", val_set)):
            dataset.write_scan_cache(scans[split])
    _barrier(env)  # the others then read rank 0's cache
    for split, dataset in (("train", train_set), ("val", val_set)):
        scans[split] = scans.get(split) or dataset.scan()
        if scans[split].converted:
            converted = sorted(scans[split].converted)  # (not `names`: those are the class names)
            log(f"{split}: {len(converted)} grayscale/CMYK image(s) converted to RGB when loaded: "
                f"{', '.join(converted[:5])}{', …' if len(converted) > 5 else ''}")
    train_labels, val_labels = scans["train"].labels, scans["val"].labels
    evaluation = split_fingerprint(val_labels)  # before the class order: the dataset's own indices
    check_fingerprint(evaluation, (read_run_file(out_dir) or {}).get("evaluation"), data_root, out_dir)
    if order is not None:  # training works on positions in the order (orders.py)
        train_set.label_transform = val_set.label_transform = order
        train_labels, val_labels = order.positions_of(train_labels), order.positions_of(val_labels)
    dataset_key = scenario_dataset(config)
    in_dataset = order.task_to_dataset if order is not None else (lambda steps: steps)
    check_step_selections(train_labels, dataset_key, task, steps_to_run, overlap=config.setting == "overlapped",
                          dataset_classes=in_dataset(task), class_names=names, task_name=config.task,
                          data_root=data_root)

    # The run starts: config.json (with the history of resumed changes), leftovers of a crash removed.
    launch = dict(world_size=env.world_size, micro_batch_size=config.micro_batch(env.world_size),
                  accumulation_steps=accumulation, effective_batch_size=config.batch_size,
                  device=str(device), task_steps=in_dataset(task), class_names=list(names),
                  class_order=None if order is None else order.order)
    if env.is_main:
        lock.keep()
        _report_removed(log, remove_orphaned_temporaries(out_dir), "unfinished temporary file")
        changes = _config_changes(out_dir, stored, config, first)
        if stale:
            log(f"--retrain-from {first}: step(s) {', '.join(map(str, stale))} trained from the old step "
                f"{first} or later: removing their checkpoints, records and figures")
            records = remove_steps(out_dir, records, stale, len(classes_up_to(task, len(task) - 1)),
                                   run_title(config))
            write_class_table(out_dir, records, names)
        atomic_write_json(out_dir / "config.json", {"config": config.to_dict(), "launch": launch,
                                                    "changes": changes, "evaluation": evaluation})
        log(f"run {out_dir}: {config.method} on {config.dataset} {config.task} ({config.setting}), "
            f"{len(task)} steps; effective batch {config.batch_size} = {env.world_size} process(es) × "
            f"{launch['micro_batch_size']} images × {accumulation} accumulation step(s); device {device}")
        _unlabelled_classes_warning(config, names, scans["train"].labels, scans["val"].labels)
    mean, std = model.normalization
    train_set.transform = train_transform(config.crop_size, mean, std,
                                          scale=(config.train_scale_min, config.train_scale_max),
                                          augmentation=config.train_augmentation)
    val_set.transform = eval_transform(config, mean, std)

    for current in steps_to_run:
        started = time.perf_counter()
        if current > 0 and model.num_classes != len(classes_up_to(task, current - 1)):
            model = load_step(config, task, out_dir, current - 1)
        model.to(device)
        # A checkpoint carries its own new-token rule; the run's config decides (they differ only when a
        # finished step 0 was copied from another run, as the demo and scripts/ablate.py do).
        model.new_token_init = model.config["new_token_init"] = config.new_token_init
        teacher = None
        if current > 0:
            if config.method in DISTILLING_METHODS:
                teacher = model.frozen_copy()
            seed_everything(derive_seed(config.seed, "add_classes", current))
            model.add_classes(len(task[current]))
            if config.method in EVERY_TOKEN_TRAINED_METHODS:
                train_every_class_token(model)
        ids = cached_select_images(cache_dir, train_labels, dataset_key, task, current,
                                   config.setting == "overlapped")
        step_train = train_set.subset(ids)
        step_classes = in_dataset([task[current]])[0]
        log(f"step {current}: classes {step_classes} ({', '.join(names[c] for c in step_classes)}), "
            f"{len(step_train)} training images, {model.num_classes} classes in the model")
        epoch_path = epoch_checkpoint_path(out_dir, current)
        resume_state = _epoch_state_to_resume(config, epoch_path, current, len(step_train), model.num_classes,
                                              log) if resume else None
        reports.start_step(current, epochs_before=sum(step_epochs(config, s) for s in range(current)),
                           after_epoch=0 if resume_state is None else resume_state["epoch"])

        def save_state(state, path=epoch_path):
            if env.is_main:
                save_epoch_state(path, state)

        train_step(model, teacher, step_train, config=config, task=task, step=current, device=device, env=env,
                   progress=progress, on_epoch=reports.epoch, on_epoch_state=save_state,
                   resume_state=resume_state)
        del teacher, resume_state
        eval_ids = select_eval_images(val_labels, dataset_key, task, current)
        step_val = val_set.subset(eval_ids)
        matrix = evaluate(model, step_val, config=config, task=task, step=current, device=device, env=env,
                          progress=progress)
        summary = summarize(matrix, task, current)
        record = {"step": current, "classes": list(task[current]), **summary,
                  "val_images": len(step_val), "train_images": len(step_train),
                  "seconds": round(time.perf_counter() - started, 2)}
        if order is not None:
            record = order.record_to_dataset(record)
        if env.is_main:
            # The checkpoint, the figures, then the record, which makes the step finished: an interruption
            # before it repeats the step (figures included), never leaves a finished step without its figures.
            model.save(checkpoint_path(out_dir, current))
            records = [r for r in records if r["step"] != current] + [record]
            plot_miou(out_dir, records, run_title(config))
            _visualise(model, step_val, config, task, current, device, out_dir, mean, std, order, names)
            write_metrics(out_dir, records, len(names) if order is not None else
                          len(classes_up_to(task, len(task) - 1)))
            write_class_table(out_dir, records, names)
            epoch_path.unlink(missing_ok=True)  # the step is finished: its checkpoint and record are written
            reports.step(record)
            log(f"step {current} done in {record['seconds']:.1f} s: " + format_record(record))
        _barrier(env)
    return sorted(records, key=lambda r: r["step"])


def _scan_both_splits(train_set, val_set, progress: bool) -> dict:
    """Both splits' scans (``scan(write_cache=False)``), each split scanned even when the other fails, so that
    the error (the first bad split's) also counts the val split's bad files."""
    scans, failures = {}, {}
    for split, dataset in (("train", train_set), ("val", val_set)):
        try:
            scans[split] = dataset.scan(progress=progress, write_cache=False)
        except InputError as error:
            failures[split] = error
    if "train" in failures and "val" in failures:
        count = getattr(failures["val"], "bad_files", 1)
        raise InputError(f"{failures['train']}; the val split also has {count} bad file{'s' if count > 1 else ''}"
                         ) from failures["train"]
    if failures:
        raise next(iter(failures.values()))
    return scans


def _unlabelled_classes_warning(config, names, train_labels, val_labels) -> None:
    """Warn about a class of a folder dataset's classes.txt that no training or no validation label holds
    (e.g. a label map that maps nothing to it): it cannot be learned, or is not scored."""
    if config.dataset != "folder":
        return
    for split, labels in (("training", train_labels), ("validation", val_labels)):
        present = set().union(*map(set, labels.values())) if labels else set()
        missing = [f"{c} {names[c]!r}" for c in range(len(names)) if c not in present]
        if missing:
            logger.warning(f"no {split} label holds the class(es) {', '.join(missing)} of "
                           f"{Path(config.data_root) / 'classes.txt'}"
                           + (f" (after --label-map {config.label_map})" if config.label_map else "")
                           + ("; it cannot be learned" if split == "training" else "; its IoU is not scored"))


def _data_root_hint(error: Exception) -> str:
    """The hint ``" (check --data-root)"`` for a file or folder missing under the data root, where a wrong
    --data-root is the likely cause; ``""`` for a malformed file or option (its message says what to fix) or
    a missing --label-map (a path relative to the working directory)."""
    if not isinstance(error, (FileNotFoundError, NotADirectoryError)) or "--label-map" in str(error):
        return ""
    return " (check --data-root)"


def _open_datasets(config: TrainConfig, data_root: Path, cache_dir: Path):
    """The train and val datasets (their file lists; nothing decoded yet); InputError naming what is
    missing or malformed."""
    try:
        train_set, val_set = (build_dataset(config.dataset, data_root, split, cache_dir=cache_dir,
                                            **folder_options(config)) for split in ("train", "val"))
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise InputError(f"{error}{_data_root_hint(error)}") from error
    check_split_overlap(train_set, val_set)
    return train_set, val_set


def _epoch_state_to_resume(config: TrainConfig, path: Path, step: int, train_images: int, model_classes: int,
                           log) -> dict | None:
    """The epoch state step ``step`` continues from (``None``: it starts from its beginning): the epoch
    checkpoint at ``path`` when there is one and the step's learning rate is the one it was trained with
    (a retuned ``--lr``/``--lr-incremental`` restarts the step, as it applies to steps still to train)."""
    if not path.exists():
        return None
    epochs = step_epochs(config, step)
    expect = dict(step=step, epochs=epochs, updates_per_epoch=math.ceil(train_images / config.batch_size),
                  num_classes=model_classes, train_images=train_images)
    try:
        state = load_epoch_state(path, expect)
    except CheckpointError as error:
        raise CheckpointError(f"{error} (or resume without it)") from error
    trained_lr = state["optimizer"]["param_groups"][0]["initial_lr"]
    if trained_lr != step_learning_rate(config, step):
        log(f"step {step}: the learning rate changed ({trained_lr:g} → {step_learning_rate(config, step):g}); "
            f"the step starts again instead of resuming after epoch {state['epoch']}")
        return None
    log(f"step {step}: resuming after epoch {state['epoch']} of {epochs}")
    return state


def check_writable_folder(folder: Path) -> None:
    """InputError naming ``folder`` (the --out) unless it is, or can be created as, a folder this process
    can write in; probed with a temporary file that is removed at once, so nothing is left behind."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"is under {existing}, which is a file"
        raise InputError(f"--out {folder} {where}: choose a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InputError(f"--out {folder}: cannot write in {existing} ({error.strerror or error}); choose a "
                         "writable folder") from error


def remove_orphaned_temporaries(out_dir: Path) -> list[Path]:
    """Delete the temporary files an interrupted run left in ``out_dir`` (and its cache): checkpoints
    being written (``step_N.pt.*.tmp``) and atomic writes (``.NAME.<pid>.*.tmp``) whose writer is gone
    (``lock.orphaned_temporary``: a live writer's are kept). Returns what was removed."""
    out_dir = Path(out_dir)
    leftovers = sorted(path for path in {*out_dir.glob("step_*.pt.*.tmp"), *out_dir.glob(".*.tmp"),
                                         *out_dir.glob("cache/.*.tmp")} if orphaned_temporary(path))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def _report_removed(log, paths: list[Path], what: str) -> None:
    if paths:
        names = ", ".join(p.name for p in paths[:5]) + (", …" if len(paths) > 5 else "")
        log(f"removed {len(paths)} {what}(s) left by an interrupted run: {names}")


def _config_changes(out_dir: Path, stored: dict | None, config: TrainConfig, first: int) -> list[dict]:
    """config.json's "changes": the earlier entries that still describe a kept step (``from_step`` before
    ``first``: the others described steps retrained now), plus one for what this command changes (only
    RESUMABLE_FIELDS can differ) relative to the configuration step ``first - 1`` was trained with, applying
    from ``first``. So every step's options are config.json's ``config`` with the entries up to it undone."""
    if stored is None:
        return []
    previous = (read_run_file(out_dir) or {}).get("changes", [])
    kept = [entry for entry in previous if entry["from_step"] < first]
    trained_with = dict(stored)
    for entry in reversed([entry for entry in previous if entry["from_step"] >= first]):
        trained_with.update({k: values[0] for k, values in entry.items() if k != "from_step"})
    current = config.to_dict()
    changed = {k: [trained_with.get(k), v] for k, v in current.items() if trained_with.get(k) != v}
    return kept + ([{"from_step": first, **changed}] if changed else [])


def plan_steps(out_dir: Path, num_steps: int, done: set[int], *, step: int | None, resume: bool,
               retrain_from: int | None) -> list[int]:
    """The steps a command trains, in order; RunError when it would overwrite a finished step without
    ``retrain_from`` (a finished step is never retrained silently: the later steps were trained from it).

    Args:
        out_dir: the run directory (for messages).
        num_steps: the steps of the task.
        done: its finished steps.
        step: train this step only (``--step``).
        resume: skip the finished steps (``--resume``).
        retrain_from: retrain from this step on (``--retrain-from``): it and every later finished step are
            removed by the caller before training (``remove_steps``).

    Returns:
        The steps to train (empty when every step is finished).
    """
    if retrain_from is not None:
        if not 0 <= retrain_from < num_steps:
            raise RunError(f"--retrain-from {retrain_from} is out of range: the task has {num_steps} steps, "
                           f"0..{num_steps - 1}")
        if step is not None and step != retrain_from:
            raise RunError(f"--step {step} with --retrain-from {retrain_from}: give the same step, or drop --step")
        first = retrain_from
    elif step is not None:
        first = step
    else:
        first = next((s for s in range(num_steps) if not (resume and s in done)), num_steps)
    if first > 0 and first < num_steps and (first - 1) not in done:
        option = "--retrain-from" if retrain_from is not None else "--step"
        raise RunError(f"{option} {first} needs step {first - 1} finished in {out_dir} "
                       f"(finished: {sorted(done) or 'none'})")
    later = sorted(s for s in done if s >= first)
    if later and retrain_from is None:
        what = f"step {first} is finished" if first in done else f"step {later[0]} is finished after step {first}"
        raise RunError(f"{out_dir}: {what} (steps {sorted(done)} finished); training step {first} again would "
                       f"leave steps {', '.join(map(str, later))} trained from the old one. Pass --retrain-from "
                       f"{first} to retrain from step {first} (steps {', '.join(map(str, later))} are removed "
                       "and trained again), or choose another --out")
    if step is not None:
        return [step]
    return list(range(first, num_steps))


def remove_steps(out_dir: Path, records: list[dict], steps: list[int], num_classes_total: int,
                 title: str = "") -> list[dict]:
    """Remove finished ``steps`` from a run directory: their records first (metrics.json, metrics.csv,
    miou.png rewritten), then their checkpoints, prediction grids and eval results, so that a crash half-way
    leaves steps that are simply unfinished. ``title``: miou.png's (``run_title``). Returns the records kept."""
    kept = [r for r in records if r["step"] not in steps]
    write_metrics(out_dir, kept, num_classes_total)
    if kept:
        plot_miou(out_dir, kept, title)
    else:
        (Path(out_dir) / "miou.png").unlink(missing_ok=True)
    for step in steps:
        for path in (checkpoint_path(out_dir, step), Path(out_dir) / f"predictions_step{step}.png",
                     *Path(out_dir).glob(f"eval_step{step}_*.json")):
            path.unlink(missing_ok=True)
    return kept


def _silent(*_args, **_kwargs) -> None:
    """The log of a quiet run, and of every rank but 0."""


def eval_transform(config: TrainConfig, mean, std):
    """The validation transform of ``config.eval_mode``: resize + centre crop to ``val_size`` (``resize``)
    or the full image (``slide``)."""
    return val_transform(None if config.eval_mode == "slide" else config.val_size, mean, std)


def _visualise(model, val_set, config, task, step, device, out_dir, mean, std, order, names) -> None:
    """The prediction grid: ``num_visualised`` images spread evenly over the step's validation set (a set cut
    from videos holds runs of near-identical frames), on ``val_size`` crops whatever the evaluation mode (a
    grid needs one size); columns image / ground truth / prediction, classes named in a legend, in the
    dataset's own indices."""
    picks = spread_indices(len(val_set), config.num_visualised)
    if not picks:
        return
    count = len(picks)
    val_set = val_set.subset([val_set.ids[i] for i in picks])
    val_set.transform = val_transform(config.val_size, mean, std)
    items = [val_set[i] for i in range(count)]
    images = torch.stack([image for image, _ in items])
    labels = torch.stack([torch.as_tensor(label) for _, label in items])
    predictions = predict(model, images, dataclasses.replace(config, eval_mode="resize"), device).cpu()
    model.train()
    labels = remap_eval_labels(labels.long(), task, step)
    if order is not None:
        labels, predictions = order.to_dataset(labels), order.to_dataset(predictions)
    save_comparison_grid(out_dir / f"predictions_step{step}.png", images, labels, {"prediction": predictions},
                         names, class_palette(config.dataset, len(names)), mean, std,
                         title=f"{run_title(config)}, after step {step}: "
                               f"{len(classes_up_to(task, step))} classes seen")


def _percent(value) -> str:
    return "  -  " if value is None else f"{100 * value:5.1f}"


def format_record(record: dict) -> str:
    return (f"mIoU old {_percent(record['miou_old'])}, new {_percent(record['miou_new'])}, "
            f"all {_percent(record['miou_all'])}")


def copy_finished_step(source: Path, target: Path, step: int) -> None:
    """Copy step ``step``'s checkpoint and record from one run directory to another (the demo trains step 0
    once: it is the same plain-CE training for every method)."""
    target.mkdir(parents=True, exist_ok=True)
    with open(checkpoint_path(source, step), "rb") as checkpoint, atomic_write(checkpoint_path(target, step)) as copy:
        shutil.copyfileobj(checkpoint, copy)
    record = next(r for r in read_records(source) if r["step"] == step)
    records = [r for r in read_records(target) if r["step"] != step] + [record]
    atomic_write_json(target / "metrics.json", sorted(records, key=lambda r: r["step"]))
