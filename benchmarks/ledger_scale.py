"""Exact per-dimension scaling of the fused counts: how ``--size paper`` fits in minutes on two CPU cores.

Triton's interpreter costs tens of microseconds per builder call, so interpreting the paper shapes (up to
8·151·512² class-pixels) would take hours. Two observations make that unnecessary:

1. **The launch plan is cheap at any size.** Running the fused op on *fake* tensors with the kernels not
   executed (``KernelCounter(dry=True)``) runs every launcher's host code — its tile and grid choices, its
   torch ops, its allocations — in well under a second at the paper shapes. That gives, exactly: the
   launches in order, each Triton launch's constexprs (tiles) and grid, every launcher aten op with its
   bytes, and the peak live bytes (``launch_plan``).
2. **What a kernel issues is a sum over its programs**, laid out along independent axes — images (B), rows
   of pixels or patches — so, at sizes where the launchers keep the same tiles and the same grid shape, each
   count of each Triton launch is *multilinear* in those axes: c₀ + c₁·B + c₂·t + c₃·B·t for two axes. Two
   interpreted samples per axis (2ᵏ runs at small sizes) then give the coefficients exactly.

The samples are chosen automatically (``choose_axes``): for each axis the workload lists candidate pairs
of values (or keeps the axis at its target); the cheapest choice is accepted when the launch plans of its samples issue the same
launches with the same tiles as the target's plan and their grids extrapolate *exactly* to the target's
grids. A launcher whose tiles or grid regime change with the size (grid-filling tiles of cosine_mask, the
capped grid of fod_loss, programs per SM of the dice) thus either gets samples in the target's regime or
is counted directly at the paper shape — never extrapolated across a regime change. Then:

* Triton launches: counts extrapolated from the samples (rational weights; a non-integer result is
  reported in ``scaling.non_integral``), grids from the plan (they agree by construction);
* aten launches (the launchers' torch ops) and peak live bytes: exact, from the target's plan;
* ``tests/test_ledger_counts.py`` extrapolates small samples to a larger size and compares with a direct
  count of that size, field by field, and compares a plan with a real run.

This module knows the workloads (which dims are batch-like, which move together), not the kernels. Counts
that depend on the data rather than the shapes (atomic lanes of the PLOP histogram, useful FLOPs where an
operand is zero for ignored pixels) are extrapolated from random samples: estimates, not exact counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from itertools import product
from typing import Callable

import workloads as W

ADDITIVE_FIELDS = ("grid", "bytes_read", "bytes_written", "distinct_bytes_read", "distinct_bytes_written",
                   "atomic_lanes", "atomic_max_per_address", "useful_dot_flops", "transcendental_ops", "load_calls",
                   "reduce_calls")
COUNTER_FIELDS = ("dot_flops", "dot_shapes", "lane_ops", "load_sites")


@dataclass(frozen=True)
class Axis:
    """One scaled axis: candidate pairs of its parameter (smallest first), the target value, and the dims a
    parameter value sets."""

    name: str
    candidates: tuple[tuple[int, int], ...]
    target: int
    dims: Callable[[int], dict]


@dataclass(frozen=True)
class Choice:
    """Axes with one pair of sampled values each, or None for an axis kept at its target."""

    axes: tuple[Axis, ...]
    samples: tuple[tuple[int, int] | None, ...]


def _pairs(target: int, candidates) -> tuple[tuple[int, int], ...]:
    return tuple((a, b) for a, b in candidates if a < b < target)


def axes_of(case: W.Case) -> list[Axis]:
    """The workload's scalable axes of ``case`` (empty: count directly)."""
    d = case.d
    axes = []
    if d.get("B", 1) > 2:
        axes.append(Axis("B", _pairs(d["B"], ((1, 2), (2, 3), (2, 4), (4, 6))), d["B"], lambda b: {"B": b}))
    # The seg-head ops and cds_dice_loss are not extrapolated: their paper cases interpret a sample of programs
    # instead (workloads.PROGRAM_SAMPLED_OPS).
    if case.op == "cosine_mask":
        axes.append(Axis("N", _pairs(d["N"], ((128, 256), (256, 384), (256, 512), (512, 768))), d["N"],
                         lambda n: {"N": n}))
    # fod_loss: its rows are B·N; the same as the B axis above
    return [axis for axis in axes if axis.candidates]


def sample_case(case: W.Case, axes, corner) -> W.Case:
    dims = dict(case.dims)
    for axis, value in zip(axes, corner):
        dims.update(axis.dims(value))
    title = ", ".join(f"{k}={v}" for k, v in dims.items())
    return W.Case(case.op, case.size, f"sample {title}", tuple(dims.items()))


def corners(choice: Choice):
    return list(product(*(pair if pair else (axis.target,) for axis, pair in zip(choice.axes, choice.samples))))


def _weights(choice: Choice, corner) -> Fraction:
    weight = Fraction(1)
    for axis, pair, value in zip(choice.axes, choice.samples, corner):
        if pair is None:
            continue
        x0, x1 = pair
        weight *= Fraction(axis.target - x0 if value == x1 else x1 - axis.target, x1 - x0)
    return weight


def signature(launch: dict) -> tuple:
    """What must agree between samples and target: kind, name, phase and (for Triton) the constexprs."""
    return launch["kind"], launch["name"], launch["phase"], tuple(sorted(launch["config"].items()))


def _triton(launches):
    return [launch for launch in launches if launch["kind"] == "triton"]


def plans_agree(choice: Choice, sample_plans: list[dict], target_plan: dict) -> bool:
    """Same launches and tiles everywhere, and the samples' Triton grids extrapolate exactly to the target's."""
    expected = [signature(launch) for launch in target_plan["launches"]]
    if any([signature(launch) for launch in plan["launches"]] != expected for plan in sample_plans):
        return False
    weights = [_weights(choice, corner) for corner in corners(choice)]
    for i, launch in enumerate(_triton(target_plan["launches"])):
        grid = sum((w * _triton(plan["launches"])[i]["grid"] for w, plan in zip(weights, sample_plans)), Fraction(0))
        if grid != launch["grid"]:
            return False
    return True


def choose_axes(case: W.Case, target_plan: dict, plan_of: Callable[[W.Case], dict]) -> Choice | None:
    """The cheapest sampling whose launch plans agree with the target's (see the module docstring), or None."""
    axes = tuple(axes_of(case))
    if not axes:
        return None
    direct = 1
    for axis in axes:
        direct *= axis.target
    options = []
    for samples in product(*((None,) + axis.candidates for axis in axes)):
        # Interpreting the corners costs about Π(low + high) (Π target for unsampled axes) against Π target.
        cost = 1
        for axis, pair in zip(axes, samples):
            cost *= sum(pair) if pair else axis.target
        if cost < direct:
            options.append((cost, samples))
    for _, samples in sorted(options, key=lambda option: option[0]):
        choice = Choice(axes, samples)
        plans = [plan_of(sample_case(case, axes, corner)) for corner in corners(choice)]
        if plans_agree(choice, plans, target_plan):
            return choice
    return None


def extrapolate(choice: Choice, samples: list[dict], target_plan: dict) -> dict:
    """The counts at the target: Triton launches extrapolated from the counted ``samples`` (in ``corners``
    order), aten launches and peaks from ``target_plan``."""
    weights = [_weights(choice, corner) for corner in corners(choice)]
    non_integral: list[str] = []

    def combine(values, where: str) -> int:
        total = sum((w * v for w, v in zip(weights, values)), Fraction(0))
        if total.denominator != 1:
            non_integral.append(where)
        return round(total)

    expected = [signature(launch) for launch in target_plan["launches"]]
    for counted in samples:
        if [signature(launch) for launch in counted["launches"]] != expected:
            raise RuntimeError("a sample's counted launches differ from its plan: ledger_scale cannot extrapolate")
    launches = []
    for i, planned in enumerate(target_plan["launches"]):
        if planned["kind"] != "triton":
            launches.append(planned)  # exact: the launcher's torch op at the target shape
            continue
        group = [counted["launches"][i] for counted in samples]
        launch = {key: group[0][key] for key in ("kind", "name", "phase", "config")}
        where = f"{planned['name']}#{i}"
        for field in ADDITIVE_FIELDS:
            launch[field] = combine([g[field] for g in group], f"{where}.{field}")
        for field in COUNTER_FIELDS:
            keys = sorted({k for g in group for k in g[field]})
            values = {k: combine([g[field].get(k, 0) for g in group], f"{where}.{field}.{k}") for k in keys}
            launch[field] = {k: v for k, v in values.items() if v}
        launch["load_rounds"] = max(launch["load_sites"].values(), default=0)
        # the target's own arguments: what the compiler is given at that shape (ledger_compile)
        launch["num_args"] = planned.get("num_args", 0)
        if planned.get("compile_request"):
            launch["compile_request"] = planned["compile_request"]
        launch["uncounted"] = dict(group[0]["uncounted"])
        launch["interpreter_s"] = sum(g["interpreter_s"] for g in group)  # spent on the samples
        launches.append(launch)
    return {
        "launches": launches, "peaks": dict(target_plan["peaks"]),
        "interpreter_s": sum(counted["interpreter_s"] for counted in samples),
        "wall_s": sum(counted["wall_s"] for counted in samples),
        "syncs": target_plan["syncs"], "custom_ops": target_plan["custom_ops"],
        "scaling": {"axes": {axis.name: {"samples": list(pair), "target": axis.target}
                             for axis, pair in zip(choice.axes, choice.samples) if pair},
                    "samples": [dict(zip((a.name for a in choice.axes), corner)) for corner in corners(choice)],
                    "exact": not non_integral, "non_integral": non_integral[:20]},
    }
