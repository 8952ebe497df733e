"""Ablation of Incrementer's loss terms and of OUR hyperparameter choices on the built-in synthetic scenario.

The published description gives no values for w_new, β, λ_v, λ_c, λ_d (nor γ); TrainConfig's demo preset
holds ours. This script shows what each choice does: it trains step 0 once per seed (plain CE, the same for
every variant), copies it into one run directory per variant, runs the incremental steps of each variant,
and prints the final step's old / new / all mIoU (%), averaged over the seeds, with finetune (the lower
bound) and joint (the upper bound) for reference. Old = the step-0 classes (background included), new =
every class added after step 0, as in the papers' tables (``metrics.summarize``).

    python scripts/ablate.py --out runs/ablate [--seeds 0 1] [--variants full no_fod ...]

Each variant is a set of TrainConfig overrides on the demo preset (see VARIANTS). Results are also written
to OUT/ablation.json. Runs are resumable: finished steps in OUT are reused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from incrementer_fast.continual.config import TrainConfig
from incrementer_fast.continual.metrics import mean_iou
from incrementer_fast.continual.run import copy_finished_step, finished_steps, run_scenario
from incrementer_fast.continual.scenarios import get_task

VARIANTS: dict[str, dict] = {
    "full": {},
    "finetune": {"method": "finetune"},
    "no_fod": {"use_fod": False},
    "no_cds": {"use_cds": False},
    "no_fod_no_cds": {"use_fod": False, "use_cds": False},
    "fod_visual_only": {"lambda_class": 0.0},
    "fod_class_only": {"lambda_visual": 0.0},
    "beta_1": {"fod_bg_weight": 1.0},
    "beta_0": {"fod_bg_weight": 0.0},
    "w_new_1": {"new_class_weight": 1.0},
    "w_new_0.25": {"new_class_weight": 0.25},
    "w_new_4": {"new_class_weight": 4.0},
    "lambda_v_x4": "lambda_visual*4",
    "lambda_v_div4": "lambda_visual/4",
    "lambda_d_x4": "lambda_dice*4",
    "lambda_d_1": {"lambda_dice": 1.0},
    "lambda_d_0.3": {"lambda_dice": 0.3},
    "no_image_factor": {"plop_image_factor": False},
    "joint": {"method": "joint"},
}


def overrides_for(name: str, base: TrainConfig) -> dict:
    """A variant's overrides; ``"field*k"`` / ``"field/k"`` scale the preset's value."""
    spec = VARIANTS[name]
    if isinstance(spec, dict):
        return spec
    for op in ("*", "/"):
        if op in spec:
            field, factor = spec.split(op)
            value = getattr(base, field)
            return {field: value * float(factor) if op == "*" else value / float(factor)}
    raise ValueError(f"bad variant spec {spec!r}")


def final_split(record: dict, base: TrainConfig) -> dict:
    """old / new / all mIoU of the task's last step, as the papers split it (old = step-0 classes, background
    included; new = every class added after step 0), from the final record's per-class IoUs. For the
    incremental methods this equals the record's own split; joint trains one step, so its record has none."""
    task = get_task(base.dataset, base.task)
    ious = record["per_class_iou"]
    added = [c for classes in task[1:] for c in classes]
    return {"miou_old": mean_iou(ious, task[0]), "miou_new": mean_iou(ious, added),
            "miou_all": mean_iou(ious, task[0] + added)}


def run_variant(out: Path, name: str, seed: int, base: TrainConfig) -> dict:
    config = dataclasses.replace(base, seed=seed, **overrides_for(name, base))
    run_dir = out / f"seed{seed}" / name
    if config.method != "joint" and 0 not in finished_steps(run_dir):
        shared = out / f"seed{seed}" / "step0"
        if 0 not in finished_steps(shared):
            run_scenario(dataclasses.replace(base, seed=seed), shared, step=0, progress=False)
        copy_finished_step(shared, run_dir, 0)
    records = run_scenario(config, run_dir, resume=True, progress=False)
    return final_split(records[-1], base)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ablate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON",
                        help="overrides of the demo preset for every variant, e.g. epochs_incremental=4")
    args = parser.parse_args(argv)
    out = Path(args.out)
    base_overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    base = TrainConfig.demo(data_root=str(out / "data"), **base_overrides)
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for seed in args.seeds:
        for name in args.variants:
            record = run_variant(out, name, seed, base)
            results.setdefault(name, []).append(record)
            print(f"seed {seed} {name:<16} old {pct(record['miou_old'])} new {pct(record['miou_new'])} "
                  f"all {pct(record['miou_all'])}  ({time.perf_counter() - started:.0f} s)", flush=True)

    def mean(name, key):
        values = [r[key] for r in results[name] if r[key] is not None]
        return statistics.fmean(values) if values else None

    summary = {name: {key: mean(name, key) for key in ("miou_old", "miou_new", "miou_all")} for name in results}
    (out / "ablation.json").write_text(json.dumps({"base": base.to_dict(), "seeds": args.seeds,
                                                   "variants": {n: overrides_for(n, base) for n in results},
                                                   "final_step_mean": summary}, indent=2))
    print(f"\nfinal step, mIoU (%), mean over seeds {args.seeds}; task {base.task} on the synthetic dataset")
    print(f"{'variant':<18} {'old':>6} {'new':>6} {'all':>6}")
    for name, values in summary.items():
        print(f"{name:<18} {pct(values['miou_old'])} {pct(values['miou_new'])} {pct(values['miou_all'])}")
    return 0


def pct(value) -> str:
    return "    -" if value is None else f"{100 * value:6.1f}"


if __name__ == "__main__":
    sys.exit(main())
