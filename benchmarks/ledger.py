"""The performance ledger: what every fused kernel and its eager reference move and compute, counted on
the CPU, and their GPU time *modelled* from those counts. Nothing here is measured on a GPU.

    python benchmarks/ledger.py --size tiny|small|paper [--ops a,b] [--dtype fp32,bf16] --out DIR
    python benchmarks/ledger.py --case cosine_mask:B=1,N=64,K=64,D=64 --dtype fp32 --out DIR
    python benchmarks/ledger.py --from-json DIR/ledger.json --update-results benchmarks/RESULTS.md
    python benchmarks/ledger.py --compare BEFORE/ledger.json AFTER/ledger.json      # a kernel change

writes ``DIR/ledger.json`` and ``DIR/ledger.md``: one row per op × case × dtype × mode × provider.

Providers
---------
* ``fused`` — the public op (``inc.<op>``): its Triton kernels run through Triton's interpreter on CPU
  tensors, with the interpreter's builder instrumented (``ledger_count.KernelCounter``): bytes of active
  lanes, tl.dot FLOPs issued and useful, lane and transcendental operations, grids and tile sizes, all as
  the kernels issue them. The torch ops of the launchers (partial-sum reductions, fills) count as eager
  launches. This script sets ``TRITON_INTERPRET=1`` itself, before triton is imported.
* ``eager`` — the plain-PyTorch reference (``inc.reference.<op>``) on fake CPU tensors (``FakeTensorMode``:
  shapes without data, so paper shapes cost nothing) under ``ledger_count.AtenCounter``: every aten op is a launch that
  reads its inputs and writes its outputs; FLOPs from ``torch.utils.flop_counter``'s formulas.

Modes: ``forward``, ``backward`` (one ``torch.autograd.grad`` of the forward's output) and
``forward+backward`` (their sum) come from one run per op × case × dtype × provider, split at the
forward/backward boundary. ``min_bytes`` is ``workloads.py``'s byte model (every input read once, every
output written once). ``peak_bytes``: the largest sum of live tensor bytes allocated during the mode,
above what was live when it began (inputs; for ``backward`` also the forward's saved tensors) — the same
definition as run.py's "peak MB" on CUDA, modelled here by tracking storages on the CPU.
``predicted_ms``: ``ledger_model`` (a roofline per launch plus a launch overhead) for H100 SXM, H200 and
H200 with the figures measured by this workplace. The training step's modelled peak memory (ViT-B/16 512²
batch 8, K = 151, fused vs reference) comes from ``ledger_step``.

Launch plans: ``--plan h100`` (the default; also ``h200``, ``interpreter``) sets ``INCREMENTER_FAST_PLAN``,
the switch the launchers read when they plan, so the interpreter runs exactly the tiles, bands, class blocks
and grids of that GPU's launch. The ledger also counts bf16 tl.dot operands as a GPU issues them
(``kernels.utils.UPCAST_BF16_DOTS`` off: the values are then not checked, bf16 tl.dot being unreliable in
the interpreter, only counted). Every launch records the constexprs it ran with (its ``config``).

Paper size: the fused counts are extrapolated exactly from small samples along the independent axes of
each workload (images, pixel or patch rows) — ``ledger_scale`` (``--scale auto|on|off``; auto = on for
``--size paper``). The eager provider and the training step run at the paper shapes (fake tensors).

The run's wall time per fused case is reported; ``--overhead`` also runs one run per fused case (the case,
or its smallest sample) without the instrumentation, to state the harness's own cost.
"""
from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("benchmarks/ledger.py must import triton itself (it sets TRITON_INTERPRET=1 first)")
os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger_report as report  # noqa: E402

SIZES = ("tiny", "small", "paper")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--ops", default="", help="comma-separated ops (default: all)")
    parser.add_argument("--case", action="append", default=[],
                        help="a custom case op:K=v,... (repeatable); replaces --size's cases")
    parser.add_argument("--dtype", default="fp32,bf16")
    parser.add_argument("--providers", default="fused,eager")
    parser.add_argument("--plan", choices=("h100", "h200", "interpreter"), default="h100",
                        help="the launch plan the kernels follow (INCREMENTER_FAST_PLAN)")
    parser.add_argument("--scale", choices=("auto", "on", "off"), default="auto",
                        help="extrapolate fused counts from small samples (ledger_scale); auto: for --size paper")
    parser.add_argument("--no-step", action="store_true", help="skip the training step's peak memory")
    parser.add_argument("--overhead", action="store_true",
                        help="also time each fused case without instrumentation (the harness's overhead)")
    parser.add_argument("--out", default="runs/ledger")
    parser.add_argument("--from-json", help="render an existing ledger.json instead of counting")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE_JSON", "AFTER_JSON"),
                        help="print a before/after table of two ledger.json files and exit")
    parser.add_argument("--update-results", metavar="RESULTS_MD",
                        help="rewrite the 'Modelled (not measured)' section of this file from the ledger")
    args = parser.parse_args(argv[1:])
    # Read by the launchers whenever they plan a launch: the interpreter runs that GPU's tiles and grids.
    os.environ["INCREMENTER_FAST_PLAN"] = args.plan

    if args.compare:
        before, after = (json.loads(Path(path).read_text(encoding="utf-8")) for path in args.compare)
        print(report.compare_markdown(before, after))
        return 0
    if args.from_json:
        ledger = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
    else:
        import ledger_run  # torch, triton and the package: only when counting

        ledger = ledger_run.run(args, argv)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ledger.json").write_text(json.dumps(ledger, indent=1) + "\n", encoding="utf-8")
        (out / "ledger.md").write_text(report.ledger_markdown(ledger), encoding="utf-8")
        print(f"[ledger] wrote {out / 'ledger.json'} and {out / 'ledger.md'}")
    if args.update_results:
        report.update_results(Path(args.update_results), ledger)
        print(f"[ledger] rewrote the modelled section of {args.update_results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
