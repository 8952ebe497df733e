"""Exact per-dimension scaling of the fused counts: how ``--size paper`` fits in minutes on two CPU cores.

Triton's interpreter costs tens of microseconds per builder call, so the paper shapes (up to 8·151·512²
class-pixels) would take hours. But what a kernel issues is a count over its programs, and the programs
of these ops are laid out along independent axes — images (B), and rows of pixels or patches — so each
counted quantity of each launch is, at the sizes the paper uses, *multilinear* in those axes: of the form
c₀ + c₁·B + c₂·t + c₃·B·t for two axes B and t. Two samples per axis (2ᵏ runs at small sizes) then give the
coefficients exactly, and the value at the paper's size follows. This module knows the workloads (which
dims are batch-like, which move together), not the kernels; it checks what it can:

* every sample must issue the same launches in the same order with the same constexprs (tile sizes) — a
  launcher that changes strategy with the size (a different kernel, other tiles) makes the scaling refuse;
* every extrapolated count must come out an integer (rational weights): a non-integer is reported as
  inexact (``scaling.non_integral``) rather than rounded silently;
* ``tests/test_ledger_counts.py`` extrapolates small samples to a larger size and compares with a direct
  run of that size, field by field.

Where multilinearity does not hold by design, the plan avoids scaling that axis: ``fod_loss``'s forward
caps its grid at 1024 programs (paper shapes exceed the cap), so it runs at the paper size; the dice's
programs per image depend on the batch (a CPU target of 4 programs), so it runs at B = 8 and scales rows
only. Counts that depend on the data rather than the shapes (atomic lanes of the PLOP histogram, useful
FLOPs where an operand is zero for ignored pixels) are extrapolated the same way from random samples: they
are estimates, not exact counts. Peak live bytes are extrapolated like the counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from itertools import product
from typing import Callable

import workloads as W

ADDITIVE_FIELDS = ("grid", "bytes_read", "bytes_written", "distinct_bytes_read", "distinct_bytes_written",
                   "atomic_lanes", "atomic_max_per_address",
                   "useful_dot_flops", "transcendental_ops")
COUNTER_FIELDS = ("dot_flops", "dot_shapes", "lane_ops")


@dataclass(frozen=True)
class Axis:
    """One scaled axis: its parameter's two sampled values and the dims a parameter value sets."""

    name: str
    samples: tuple[int, int]
    target: int
    dims: Callable[[int], dict]


def plan(case: W.Case) -> list[Axis] | None:
    """The axes along which the counts of ``case`` are extrapolated; None: count the case directly."""
    d = case.d
    batch = Axis("B", (1, 2), d["B"], lambda b: {"B": b}) if d.get("B", 1) > 2 else None
    if case.op in ("seg_head_loss", "loss_stage", "pseudo_label"):
        ratio = d["H"] // d["h"]
        if d["H"] != ratio * d["h"] or d["h"] <= 3:
            return None
        # Low-res rows h with H = ratio·h: each interior low-res row has the same high-res window, the first
        # and the last are clamped (the same two at every h ≥ 2); pixel tiles grow with H.
        rows = Axis("rows", (2, 3), d["h"], lambda t: {"h": t, "H": ratio * t})
        return [a for a in (batch, rows) if a is not None]
    if case.op == "cosine_mask":
        if d["N"] <= 256 or d["N"] % 128:
            return None
        # Patches: N tiles of every tile size used (≤ 128) fit 128 and 256 exactly.
        return [a for a in (batch, Axis("N", (128, 256), d["N"], lambda n: {"N": n})) if a is not None]
    if case.op == "cds_dice_loss":
        if d["H"] <= 16:
            return None
        # Rows of pixels at the paper's batch (its programs per image depend on B, so B is not scaled).
        return [Axis("H", (8, 16), d["H"], lambda t: {"H": t})]
    return None  # fod_loss: its grid is capped at the paper size; counted directly


def sample_cases(case: W.Case, axes: list[Axis]) -> list[tuple[tuple[int, ...], W.Case]]:
    """The 2ᵏ sample cases (corner parameters, case), dims in the case's order."""
    out = []
    for corner in product(*(axis.samples for axis in axes)):
        dims = dict(case.dims)
        for axis, value in zip(axes, corner):
            dims.update(axis.dims(value))
        title = ", ".join(f"{k}={v}" for k, v in dims.items())
        out.append((corner, W.Case(case.op, case.size, f"sample {title}", tuple(dims.items()))))
    return out


def _weights(axes: list[Axis], corner: tuple[int, ...]) -> Fraction:
    weight = Fraction(1)
    for axis, value in zip(axes, corner):
        x0, x1 = axis.samples
        weight *= Fraction(axis.target - x0 if value == x1 else x1 - axis.target, x1 - x0)
    return weight


class ScalingError(RuntimeError):
    """The samples do not issue the same launches: their counts cannot be extrapolated."""


def _signature(launch: dict) -> tuple:
    return launch["kind"], launch["name"], launch["phase"], tuple(sorted(launch["config"].items()))


def extrapolate(axes: list[Axis], samples: list[tuple[tuple[int, ...], dict]]) -> dict:
    """Combine the counted samples (``ledger_run.count_case`` results) into the counts at the target."""
    signatures = [[_signature(launch) for launch in counted["launches"]] for _, counted in samples]
    for (corner, _), signature in zip(samples[1:], signatures[1:]):
        if signature != signatures[0]:
            first = next((i for i, (a, b) in enumerate(zip(signature, signatures[0])) if a != b),
                         min(len(signature), len(signatures[0])))
            raise ScalingError(
                f"the sample at {dict(zip((a.name for a in axes), corner))} issues other launches than the first "
                f"sample (launch #{first}: {signature[first] if first < len(signature) else 'none'} vs "
                f"{signatures[0][first] if first < len(signatures[0]) else 'none'}): count this case directly")
    weights = [_weights(axes, corner) for corner, _ in samples]
    non_integral: list[str] = []

    def combine(values, where: str) -> int:
        total = sum((w * v for w, v in zip(weights, values)), Fraction(0))
        if total.denominator != 1:
            non_integral.append(where)
        return round(total)

    launches = []
    for i, template in enumerate(samples[0][1]["launches"]):
        group = [counted["launches"][i] for _, counted in samples]
        launch = {key: template[key] for key in ("kind", "name", "phase", "config", "uncounted")}
        where = f"{template['name']}#{i}"
        for field in ADDITIVE_FIELDS:
            launch[field] = combine([g[field] for g in group], f"{where}.{field}")
        for field in COUNTER_FIELDS:
            keys = sorted({k for g in group for k in g[field]})
            launch[field] = {k: combine([g[field].get(k, 0) for g in group], f"{where}.{field}.{k}") for k in keys}
            launch[field] = {k: v for k, v in launch[field].items() if v}
        launch["interpreter_s"] = sum(g["interpreter_s"] for g in group)  # spent on the samples
        launches.append(launch)
    peaks = {mode: max(0, combine([counted["peaks"][mode] for _, counted in samples], f"peak.{mode}"))
             for mode in samples[0][1]["peaks"]}
    return {
        "launches": launches, "peaks": peaks,
        "interpreter_s": sum(counted["interpreter_s"] for _, counted in samples),
        "wall_s": sum(counted["wall_s"] for _, counted in samples),
        "syncs": samples[0][1]["syncs"], "custom_ops": samples[0][1]["custom_ops"],
        "scaling": {"axes": {axis.name: {"samples": list(axis.samples), "target": axis.target} for axis in axes},
                    "samples": [dict(zip((a.name for a in axes), corner)) for corner, _ in samples],
                    "exact": not non_integral, "non_integral": non_integral[:20]},
    }
