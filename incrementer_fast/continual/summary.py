"""Seeds and class orders, summarised: old / new / all mIoU per step as mean ± std over runs of one task.

``summarize_runs(run_dirs)`` reads each run directory's ``config.json`` and ``metrics.json``, checks that the
runs are the same task — every ``TrainConfig`` field agrees except the ``seed``, the ``class_order`` and the
fields that change only where or how fast a run goes (``config.RUNTIME_FIELDS``) — that they finished the
same steps and that no two have the same seed and class order, then gives per step the mean and the sample
standard deviation (n − 1; ``None`` for one run) of ``miou_old``, ``miou_new`` and ``miou_all`` (the papers'
columns: old = the step-0 classes, new = the classes added after step 0). ``write_summary`` writes it as
``summary.json`` and ``summary.csv`` and draws ``summary.png``: one panel per column, the mean with a ±1 std
band and each run as a thin line.
The command is ``incrementer-fast summary RUN_DIR... [--out DIR]``.
"""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from .._files import atomic_write, atomic_write_json
from ..errors import InputError
from .config import RUNTIME_FIELDS, upgrade_config_values
from .report import METRICS, _percent, plot_miou_panels

# Fields that may differ between the runs of one summary: what is averaged over, and where or how fast a
# run went.
VARYING_FIELDS = frozenset({"seed", "class_order"}) | RUNTIME_FIELDS
COLUMNS = tuple(key for key, _ in METRICS)


def _stats(values: list) -> dict:
    present = [v for v in values if v is not None]
    if len(present) != len(values) or not present:
        return {"mean": None, "std": None, "values": values}
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else None,
            "values": values}


def summarize_runs(run_dirs) -> dict:
    """The summary of ``run_dirs`` (see the module docstring): ``{"runs", "dataset", "task", "setting",
    "method", "seeds", "class_orders", "steps": [{"step", "runs", "miou_old": {"mean", "std", "values"},
    ...}]}``. ``InputError`` naming the run for a folder without a finished run, and naming the fields for
    runs of different tasks or different finished steps, and naming both runs of the same seed and class
    order."""
    from .run import read_records, read_run_file

    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise InputError("summary needs at least one run directory")
    configs, records, evaluations = [], [], []
    for run_dir in run_dirs:
        stored = read_run_file(run_dir)
        if stored is None:
            raise InputError(f"{run_dir} is not a run directory: {run_dir / 'config.json'} not found")
        configs.append(upgrade_config_values(stored["config"]))
        evaluations.append(stored.get("evaluation"))
        run_records = {r["step"]: r for r in read_records(run_dir)}
        if not run_records:
            raise InputError(f"{run_dir} has no finished step (its metrics.json is missing or empty)")
        records.append(run_records)
    first = configs[0]
    for run_dir, config in zip(run_dirs[1:], configs[1:]):
        differing = [f"{k}: {first.get(k)!r} in {run_dirs[0]}, {config.get(k)!r} here"
                     for k in sorted(set(first) | set(config)) if k not in VARYING_FIELDS and first.get(k) != config.get(k)]
        if differing:
            raise InputError(f"{run_dir} is not the same task as {run_dirs[0]} ({'; '.join(differing)}); summarise "
                             "runs that differ only in seed or class order")
    seen = {}
    for run_dir, config in zip(run_dirs, configs):
        # Same task, seed and order: the same run configuration (a copy, or one folder given twice), whose
        # duplicate would shrink the spread (std 0 for two copies) of what reads as independent runs.
        key = (config.get("seed"), config.get("class_order"))
        if key in seen:
            raise InputError(f"{seen[key]} and {run_dir} are the same run configuration (seed {key[0]}, class "
                             f"order {key[1]}): a summary needs runs of different seeds or class orders; leave "
                             "one out")
        seen[key] = run_dir
    for run_dir, evaluation in zip(run_dirs[1:], evaluations[1:]):
        # The validation split's fingerprint (evaluation_set.split_fingerprint; absent in older runs): the same
        # options on another folder of data are another task.
        if None not in (evaluation, evaluations[0]) and evaluation != evaluations[0]:
            raise InputError(f"{run_dir} was scored on another validation set than {run_dirs[0]} "
                             f"({evaluation.get('val_images')} images, sha256 {str(evaluation.get('val_sha256'))[:12]}"
                             f" vs {evaluations[0].get('val_images')}, {str(evaluations[0].get('val_sha256'))[:12]}); "
                             "summarise runs on the same data")
    steps = sorted(records[0])
    for run_dir, run_records in zip(run_dirs[1:], records[1:]):
        if sorted(run_records) != steps:
            raise InputError(f"{run_dir} finished steps {sorted(run_records)} but {run_dirs[0]} finished {steps}; "
                             "resume the unfinished run (train --resume) or leave it out")
    return {
        "runs": [str(d) for d in run_dirs],
        **{k: first.get(k) for k in ("dataset", "task", "setting", "method")},
        "seeds": [c.get("seed") for c in configs],
        "class_orders": [c.get("class_order") for c in configs],
        "steps": [{"step": step, "runs": len(run_dirs),
                   **{key: _stats([r[step].get(key) for r in records]) for key in COLUMNS}} for step in steps],
    }


def _cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "      -      "
    std = "  -  " if stats["std"] is None else f"{100 * stats['std']:4.1f}"
    return f"{100 * stats['mean']:5.1f} ± {std}"


def format_summary(summary: dict) -> str:
    """The summary as a text table: mIoU (%) mean ± std per step and column."""
    head = (f"{summary['method']} on {summary['dataset']} {summary['task']} ({summary['setting']}), "
            f"{len(summary['runs'])} runs (seeds {summary['seeds']}); mIoU (%) mean ± std")
    header = f"{'step':>4} | " + " | ".join(f"{name:^13}" for name in ("old", "new", "all"))
    rows = [f"{s['step']:>4} | " + " | ".join(_cell(s[key]) for key in COLUMNS) for s in summary["steps"]]
    return "\n".join([head, header, "-" * len(header), *rows])


def write_summary(summary: dict, out_dir) -> list[Path]:
    """``summary.json``, ``summary.csv`` and ``summary.png`` in ``out_dir`` (atomic writes); returns them."""
    out_dir = Path(out_dir)
    paths = [out_dir / "summary.json", out_dir / "summary.csv", out_dir / "summary.png"]
    atomic_write_json(paths[0], summary)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", "runs", *(f"{key}_{stat}" for key in COLUMNS for stat in ("mean", "std"))])
    for s in summary["steps"]:
        writer.writerow([s["step"], s["runs"], *("" if s[key][stat] is None else f"{s[key][stat]:.6f}"
                                                 for key in COLUMNS for stat in ("mean", "std"))])
    with atomic_write(paths[1]) as handle:
        handle.write(buffer.getvalue().encode("utf-8"))
    plot_summary(paths[2], summary)
    return paths


def plot_summary(path, summary: dict) -> None:
    """Old / new / all mIoU (%) per step: the mean over the runs with a ±1 std band, each run thin."""
    runs = len(summary["runs"])

    def draw(ax, key):
        mean = [_percent(s[key]["mean"]) for s in summary["steps"]]
        std = [0.0 if s[key]["std"] is None else 100 * s[key]["std"] for s in summary["steps"]]
        for run in range(runs):
            ax.plot(steps, [_percent(s[key]["values"][run]) for s in summary["steps"]], color="#1f77b4", lw=0.6,
                    alpha=0.4, label="each run" if run == 0 else None)
        ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color="#1f77b4", alpha=0.25, lw=0, label="± 1 std")
        ax.plot(steps, mean, color="#1f77b4", marker="o", lw=2, label="mean")

    steps = [s["step"] for s in summary["steps"]]
    plot_miou_panels(path, steps, draw,
                     f"{summary['method']} on {summary['dataset']} {summary['task']}: mean over {runs} runs")


