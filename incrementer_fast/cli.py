"""The ``incrementer-fast`` command (also ``python -m incrementer_fast``).

    incrementer-fast train --dataset voc --data-root DATA --task 15-1 --setting overlapped \\
        --method incrementer --out runs/voc-15-1 [--step K] [--resume] [--epochs N] [...]
    incrementer-fast eval --run runs/voc-15-1 --step 5 [--eval-mode slide]
    incrementer-fast eval --checkpoint step_5.pt --dataset voc --data-root DATA --task 15-1 --step 5
    incrementer-fast summary runs/voc-15-1-seed0 runs/voc-15-1-seed1 ... [--out DIR]
    incrementer-fast demo [--out DIR] [--seed N] [--no-joint] [--workers 1|2] [--methods incrementer,mib,...]
    incrementer-fast check [--device cuda|cpu] [--quick | --thorough]

``train`` has one option per field of ``TrainConfig`` (``--lambda-visual 1.0``, ``--no-use-fod``, ...; the
help text is the field's documentation), and ``--config FILE`` reads any of them from a JSON or YAML file
(a run's ``config.json`` included), the command line's options taking precedence. Its defaults are the preset's (``--preset voc|ade|demo``, by default
the one of ``--dataset``: voc, ade, or demo for synthetic; see ``config.PRESETS`` for every value's source);
with ``--resume`` they are the run directory's ``config.json`` and any option given must agree with it. Under ``torchrun`` every process runs this same command.

``demo`` is the main job on the embedded default: the synthetic dataset generated into ``DIR/data``, a small
ViT with the encoder pretrained for the demo (``incrementer_fast/assets``), on the CPU: every step of the demo
task for ``incrementer`` and ``finetune`` (``DIR/incrementer``, ``DIR/finetune``; ``--methods`` picks among
incrementer, mib, plop and finetune) and the joint upper bound
(``DIR/joint``), then the old / new / all mIoU table, ``DIR/comparison.png`` and ``DIR/predictions.png``
(``incrementer_fast.continual.demo``).

Errors. ``main`` is the one place where an exception becomes what the user sees: one line on stderr,
``incrementer-fast COMMAND: error: MESSAGE``, and the exit status — 2 for input that cannot be used as given
(``InputError``, ``CommandError``, ``CheckpointError``, an option argparse refuses, and the library's
ValueError / FileNotFoundError, which name what they refuse), 1 for a failure during the work
(``WorkError``, a write the OS refuses, out of memory, anything unexpected), 130 for Ctrl-C, 143 for SIGTERM
(handled as Ctrl-C: ``errors.Terminated``). The traceback is shown only with ``--debug`` (on stderr, before
the same one-line message and exit status). A new subcommand gets all of this by ``add_common_options(sub)``
and ``sub.set_defaults(handler=fn)``, where ``fn(args) -> int`` raises those types.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import typing
from pathlib import Path

from ._files import atomic_write
from .continual.config import (PRESETS, RESUMABLE_FIELDS, TrainConfig, preset_values, read_config_file,
                               upgrade_config_values)
from .errors import InputError, Terminated, WorkError, interruption_message

DATASET_PRESETS = {"voc": "voc", "ade": "ade", "synthetic": "demo"}  # the preset of each --dataset
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a process SIGTERM ended


class CommandError(InputError):
    """A command-line option that cannot be used as given (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a refused option is a ``CommandError`` (reported in one line by ``main``) instead of
    the usage text and an exit from inside ``parse_args``."""

    def error(self, message: str):
        raise CommandError(f"{self.prog}: error: {message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        """argparse's, but an unknown option is reported by the subcommand it was given to, with the closest
        option it has (argparse's own message names the top-level parser, whose --help lists no options)."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = getattr(parsed, "command", None)
            parser = next((a.choices[command] for a in self._actions
                           if isinstance(a, argparse._SubParsersAction) and command in a.choices), self)
            options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
            guesses = [difflib.get_close_matches(u.split("=", 1)[0], options, n=1) for u in unknown
                       if u.startswith("--")]
            hints = "".join(f"; did you mean {g[0]}?" for g in guesses if g)
            parser.error(f"unrecognized arguments: {' '.join(unknown)}{hints}")
        return parsed


# ------------------------------------------------------------------------------------ config options
def _field_docs() -> dict[str, str]:
    """Field name → the docstring written under it in TrainConfig's source."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _option_parser(hint):
    """(value type, whether None is allowed) of an annotation such as ``int | None``."""
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    docs = _field_docs()
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig.preset("voc")
    others = {name: TrainConfig.preset(name) for name in PRESETS if name != "voc"}
    group = parser.add_argument_group("training configuration (TrainConfig; defaults: the preset's)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        base, optional = _option_parser(hints[f.name])
        default_text = f"default {getattr(defaults, f.name)!r}"
        for name, preset in others.items():
            if getattr(preset, f.name) != getattr(defaults, f.name):
                default_text += f"; {name} {getattr(preset, f.name)!r}"
        help_text = f"{docs.get(f.name, '')} ({default_text})".replace("%", "%%")
        if base is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
            continue

        def convert(text: str, base=base, optional=optional):
            if optional and text.lower() == "none":
                return None
            try:
                return base(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expects {base.__name__}, got {text!r}") from None

        convert.__name__ = base.__name__
        group.add_argument(flag, dest=f.name, type=convert, default=argparse.SUPPRESS,
                           metavar=base.__name__.upper(), help=help_text)


def _field_source(field: str, flags: dict, files: list[tuple[str, str, dict]]) -> str:
    """How a refused value was given, for the message: ``--lr`` on the command line, else ``FILE: key "lr"``
    of the first of ``files`` (path, key prefix, values) that gave it, else the field's name (a preset's)."""
    if field in flags:
        return "--" + field.replace("_", "-")
    for file, prefix, values in files:
        if field in values:
            return f'{file}: key "{prefix}{field}"'
    return field


def name_refused_field(error: Exception, flags: dict, files: list[tuple[str, str, dict]]) -> CommandError:
    """TrainConfig's "FIELD must be ..." as the user gave the field (``_field_source``)."""
    message = str(error)
    field = message.split(" ", 1)[0]
    if field in {f.name for f in dataclasses.fields(TrainConfig)}:
        message = _field_source(field, flags, files) + message[len(field):]
    return CommandError(message)


def config_from_args(args: argparse.Namespace, stored: dict | None = None, stored_file=None) -> TrainConfig:
    """TrainConfig from the options given — the ``--config`` file's fields, then the command line's over them —
    over the base (stored config.json when resuming, else the preset's defaults); ``CommandError`` for
    invalid values (named as given: the option, or the key of the file that holds it — ``stored_file``
    names the stored config's), an unreadable config file or stored-config clashes."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = flags = {k: v for k, v in vars(args).items() if k in names}
    files = []
    if getattr(args, "config", None):
        try:
            from_file = read_config_file(args.config)
        except (OSError, ValueError) as error:
            raise CommandError(str(error)) from None
        files.append((args.config, "", from_file))
        given = {**from_file, **flags}
    if stored is not None and stored_file is not None:
        files.append((str(stored_file), "config.", stored))
    if stored is not None:
        stored = upgrade_config_values(stored)
        clashes = [f"--{k.replace('_', '-')} {v!r} (the run has {stored.get(k)!r})" for k, v in given.items()
                   if stored.get(k) != v and k not in RESUMABLE_FIELDS]
        if clashes:
            raise CommandError("--resume continues a run with its own configuration; these options differ: "
                               + ", ".join(clashes))
        values = {**stored, **given}
    else:
        preset = getattr(args, "preset", None) or DATASET_PRESETS.get(given.get("dataset"), "voc")
        try:
            values = preset_values(preset, given)
        except ValueError as error:
            raise CommandError(str(error)) from None
    try:
        config = TrainConfig.from_dict(values)
        config.accumulation_steps(int(os.environ.get("WORLD_SIZE", "1")))
    except (TypeError, ValueError) as error:
        # TrainConfig names the field ("lr must be ..."): say it as it was given (--lr, or a file's key).
        raise name_refused_field(error, flags, files) from None
    if config.dataset != "synthetic" and config.data_root is None:
        raise CommandError(f"--data-root is required for --dataset {config.dataset}")
    return config


def _check_step(config: TrainConfig, step: int | None) -> None:
    from .continual.run import scenario_task

    try:
        steps = len(scenario_task(config))
    except ValueError as error:
        raise CommandError(str(error)) from None
    if step is not None and not 0 <= step < steps:
        raise CommandError(f"--step {step} is out of range: task {config.task!r} ({config.method}) has {steps} "
                           f"steps, 0..{steps - 1}")


# ------------------------------------------------------------------------------------ commands
def _train(args: argparse.Namespace) -> int:
    from .continual.run import read_run_config, run_scenario

    out = Path(args.out)
    continues = args.resume or args.retrain_from is not None  # both continue the run with its config.json
    stored = read_run_config(out) if continues else None
    if continues and stored is None:
        option = "--resume" if args.resume else f"--retrain-from {args.retrain_from}"
        raise CommandError(f"{option}: {out} holds no run to continue ({out / 'config.json'} not found); "
                           f"drop {option.split()[0]} to start a new run there")
    config = config_from_args(args, stored, out / "config.json")
    _check_step(config, args.step)
    run_scenario(config, out, step=args.step, resume=args.resume, retrain_from=args.retrain_from,
                 progress=not args.quiet)
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Re-score a saved step: ``--run DIR --step N`` (the run's config.json, overridable option by option,
    and its step_N.pt) or ``--checkpoint PATH --step N`` with the dataset options; prints the record as
    JSON and writes it to ``--output`` (for ``--run``, by default ``DIR/eval_step<N>_<mode>.json``)."""
    from .continual.run import checkpoint_path, evaluate_checkpoint, read_run_config

    run_dir = None
    if args.run is not None:
        run_dir = Path(args.run)
        stored = read_run_config(run_dir)
        if stored is None:
            raise CommandError(f"{run_dir} is not a run directory: {run_dir / 'config.json'} not found")
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        given = {k: v for k, v in vars(args).items() if k in names}
        try:
            config = TrainConfig.from_dict({**stored, **given})
        except (TypeError, ValueError) as error:
            raise name_refused_field(error, given, [(str(run_dir / "config.json"), "config.", stored)]) from None
        checkpoint = checkpoint_path(run_dir, args.step)
    else:
        config = config_from_args(args)
        if config.data_root is None:
            raise CommandError("--checkpoint needs --data-root (the dataset to score it on)")
        checkpoint = Path(args.checkpoint)
    _check_step(config, args.step)
    record = evaluate_checkpoint(config, checkpoint, args.step, run_dir=run_dir, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    text = json.dumps(record, indent=2)
    print(text)
    output = args.output
    if output is None and run_dir is not None:
        output = run_dir / f"eval_step{args.step}_{config.eval_mode}.json"
    if output is not None:
        with atomic_write(output) as handle:
            handle.write((text + "\n").encode("utf-8"))
        print(f"written to {output}", file=sys.stderr)
    return 0


def _summary(args: argparse.Namespace) -> int:
    """Old / new / all mIoU per step as mean ± std over the runs given (``continual.summary``): printed, and
    written to ``--out`` as summary.json, summary.csv and summary.png."""
    from .continual.summary import format_summary, summarize_runs, write_summary

    summary = summarize_runs(args.runs)
    print(format_summary(summary))
    paths = write_summary(summary, args.out)
    print(f"written to {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import run

    return run(args)


def demo_table(results: dict[str, list[dict]], joint: dict | None = None) -> str:
    """Old / new / all mIoU (%) per step, one column group per method, and the constant-prediction
    reference of the new classes (``chance``: the mean share of their pixels, the same for every method).
    As in the papers' tables, old = the step-0 classes (background included) and new = every class added
    after step 0 so far (``metrics.summarize``). ``joint`` (old / new / all of the joint upper bound,
    ``report.first_step_split``) adds a last line."""
    methods = list(results)
    steps = sorted({r["step"] for records in results.values() for r in records})

    def cell(value):
        return "   -" if value is None else f"{100 * value:4.1f}"

    header = f"{'step':>4}  {'classes':<8}" + "".join(f" | {m:^16}" for m in methods) + " | chance"
    sub = f"{'':>4}  {'':<8}" + "".join(f" | {'old':>4} {'new':>5} {'all':>5}" for _ in methods) + " |   new"
    lines = [header, sub, "-" * len(sub)]
    for step in steps:
        row = None
        cells = []
        for m in methods:
            record = next((r for r in results[m] if r["step"] == step), None)
            row = row or record
            if record is None:
                cells.append(f" | {'':>16}")
            else:
                cells.append(f" | {cell(record['miou_old'])} {cell(record['miou_new']):>5} "
                             f"{cell(record['miou_all']):>5}")
        classes = row["classes"]
        span = f"{classes[0]}-{classes[-1]}" if len(classes) > 1 else str(classes[0])
        chance = f" | {cell(row.get('chance_miou_new')):>5}"
        lines.append(f"{step:>4}  {span:<8}" + "".join(cells) + chance)
    if joint is not None:
        lines.append(f"joint (every class in one step, the upper bound): old {cell(joint['miou_old'])}, "
                     f"new {cell(joint['miou_new'])}, all {cell(joint['miou_all'])}")
    return "\n".join(lines)


def _demo_methods(text: str) -> tuple[str, ...]:
    """``demo --methods``: the names, checked by ``continual.demo.parse_methods`` (imported here: torch)."""
    from .continual.demo import parse_methods

    try:
        return parse_methods(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _demo(args: argparse.Namespace) -> int:
    from .continual.demo import run_demo
    from .continual.report import first_step_split
    from .continual.scenarios import get_task

    started = time.perf_counter()
    results = run_demo(args.out, resume=args.resume, progress=not args.quiet, joint=not args.no_joint,
                       workers=args.workers, methods=args.methods, seed=args.seed)
    config = TrainConfig.demo(seed=args.seed)
    joint = results.pop("joint", None)
    split = None if joint is None else first_step_split(joint[-1], get_task(config.dataset, config.task))
    print()
    print(f"demo: synthetic task {config.task}, seed {config.seed}, mIoU (%) on the validation images of the classes "
          "seen so far; old = the classes of step 0 (background included), new = every class added after step 0")
    print(demo_table(results, split))
    print(f"runs in {Path(args.out).resolve()} (comparison.png, predictions.png; per run: metrics.json, "
          f"miou.png, predictions_step*.png); {time.perf_counter() - started:.0f} s")
    return 0


def add_common_options(parser: argparse.ArgumentParser, *, quiet: bool = True) -> None:
    """``--debug`` (every subcommand has it) and ``--quiet`` (those with progress bars)."""
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", "--traceback", dest="debug", action="store_true",
                        help="on an error, show its traceback too")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="incrementer-fast", description=__doc__.split("\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,summary,demo,check}")
    train = commands.add_parser("train", help="train a class-incremental scenario (every step, or one)")
    train.add_argument("--out", required=True, help="run directory (created; holds config.json, metrics, "
                                                    "checkpoints and figures)")
    train.add_argument("--step", type=int, default=None,
                       help="train this step only (the previous step must be finished in --out)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last finished step, with its config.json")
    train.add_argument("--retrain-from", type=int, default=None, metavar="N",
                       help="train the run in --out again from step N, with its config.json (as --resume: "
                            "options given may change the learning rates and runtime options): step N and every "
                            "later finished step are removed first, as they were trained from the old step N; a "
                            "finished step is never retrained without this")
    add_common_options(train)
    train.add_argument("--preset", choices=list(PRESETS), default=None,
                       help="the defaults of every option below: voc / ade (paper scale, each value's source in "
                            "config.PRESETS) or demo (the synthetic CPU demo); default: the one of --dataset")
    train.add_argument("--config", metavar="FILE",
                       help="TrainConfig fields from a JSON or YAML file (a run's config.json works): they "
                            "replace the preset's defaults, and options given here override them")
    _add_config_options(train)
    train.set_defaults(handler=_train)
    evaluation = commands.add_parser("eval", help="re-score a saved step on its validation set (the metrics.json "
                                                  "record; --eval-mode resize|slide)")
    source = evaluation.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run directory: its config.json (options below override it) and "
                                      "step_<N>.pt")
    source.add_argument("--checkpoint", help="a checkpoint written by Incrementer.save; give the dataset options "
                                             "(--dataset, --data-root, --task, ...)")
    evaluation.add_argument("--step", type=int, required=True, help="the step the checkpoint finished")
    evaluation.add_argument("--output", default=None, help="write the record (JSON) here")
    add_common_options(evaluation)
    evaluation.add_argument("--preset", choices=list(PRESETS), default=None,
                            help="with --checkpoint: the defaults of the options below (default: the one of "
                                 "--dataset)")
    _add_config_options(evaluation)
    evaluation.set_defaults(handler=_eval)
    summaries = commands.add_parser("summary", help="old / new / all mIoU per step, mean ± std over runs of one task "
                                                  "(seeds, class orders), with a figure")
    summaries.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of the same task")
    summaries.add_argument("--out", default="summary", help="where summary.json, summary.csv and summary.png go "
                                                          "(default ./summary)")
    add_common_options(summaries, quiet=False)
    summaries.set_defaults(handler=_summary)
    demo = commands.add_parser("demo", help="the synthetic scenario, small pretrained ViT, CPU: incrementer vs "
                                            "finetune vs joint")
    demo.add_argument("--out", default="runs/demo",
                      help="where the data, the runs and the figures go (default runs/demo)")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    demo.add_argument("--seed", type=int, default=0,
                      help="seeds the model initialisation, data order, augmentation and dropout (the synthetic "
                           "dataset is the same for every seed; default 0)")
    demo.add_argument("--no-joint", action="store_true", help="skip the joint upper bound (every class at once)")
    demo.add_argument("--workers", type=int, default=2, choices=(1, 2),
                      help="processes, one intra-op thread each (same numbers either way; progress bars only "
                           "with 1; default 2)")
    demo.add_argument("--methods", type=_demo_methods, default=None, metavar="M1,M2,...",
                      help="methods to compare, among incrementer,mib,plop,finetune (default incrementer,finetune; "
                           "step 0 is trained once, by the first)")
    add_common_options(demo)
    demo.set_defaults(handler=_demo)
    from .check import build_parser as add_check_options  # torch and the ops only: no timm

    summary = ("the gradient-parity suite: every op's forward and backward against the float64 reference, "
               "on this machine")
    check = commands.add_parser(
        "check", help=summary, description=f"Run {summary} (shapes, dtypes, layouts, stride-0 gradients); print "
                                           "the environment and one row per case; exit 1 if any case fails.")
    add_check_options(check)
    add_common_options(check, quiet=False)
    check.set_defaults(handler=_check)
    return parser


def describe_error(error: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an exception that ended a command."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED, interruption_message(error)
    if isinstance(error, InputError):
        return EXIT_BAD_INPUT, str(error)
    if isinstance(error, WorkError):
        return EXIT_FAILURE, str(error)
    if isinstance(error, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)):
        return EXIT_BAD_INPUT, str(error)  # the library's argument and file errors name what they refuse
    if isinstance(error, OSError) and error.filename is not None:
        return EXIT_FAILURE, (f"{error.filename}: {error.strerror or error}; fix that (free space, permissions) "
                              "and rerun with --resume: finished steps are kept")
    if type(error).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return EXIT_FAILURE, ("out of GPU memory; lower --micro-batch-size (the effective --batch-size stays) "
                              "or --crop-size, then rerun with --resume")
    return EXIT_FAILURE, (f"{type(error).__name__}: {error} (unexpected: rerun with --debug for the traceback "
                          "and report it)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run ``incrementer-fast ARGV``; returns the exit status (see the module docstring: Errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CommandError as error:
        print(_one_line(error), file=sys.stderr)
        return EXIT_BAD_INPUT
    from .continual.logs import ROOT_LOGGER, configure_logging

    # Progress messages of rank 0 (and warnings of every rank) to stdout, for this command only: stderr is
    # kept for the one-line error (and the progress bars).
    handler = configure_logging(logging.INFO, sys.stdout)
    previous_sigterm = _raise_on_sigterm()
    try:
        return args.handler(args)
    except (Exception, KeyboardInterrupt) as error:
        if args.debug:  # the traceback too; the one-line message and the exit status stay the same
            traceback.print_exception(error, file=sys.stderr)
        code, message = describe_error(error)
        print(f"incrementer-fast {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return code
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        logging.getLogger(ROOT_LOGGER).removeHandler(handler)


def _terminate(signum, frame):
    raise Terminated()


def _raise_on_sigterm():
    """SIGTERM raises ``Terminated`` for the command's duration (the default action kills the process at once,
    leaving its temporary files); returns the previous handler to restore, or None where signals cannot be
    handled (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminate)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
