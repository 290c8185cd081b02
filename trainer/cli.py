"""`python -m trainer`: train, list methods, demo, eval, pairs, iterate.

Exit codes: 0 done; 1 the demo's intervals overlap or its prompt fidelity fell more than 5 points, or
training stopped on a non-finite loss or a full disk; 2 a bad option, path or data row (one line on stderr
naming it; nothing written); 130 stopped by Ctrl-C (the first Ctrl-C during training saves a checkpoint and the LoRA at the next step boundary).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import signal
import sys
import threading
from typing import Any, Sequence

from .config import ConfigError, config_fields, field_default, load_toml, make_config

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C


def _option(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """`--name-with-dashes`, shown in the help; `--name_with_underscores` is accepted too, not shown."""
    parser.add_argument(f"--{name.replace('_', '-')}", dest=name, **kwargs)
    if "_" in name:
        parser.add_argument(f"--{name}", dest=name, **{**kwargs, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS})


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; unset flags keep the config file's."""
    parser.add_argument("--config", help="TOML file with any of the options below; flags override it")
    for name, (f, annotation) in config_fields().items():
        text = str(annotation)
        default = field_default(f)
        shown = "required" if default is dataclasses.MISSING else f"default: {default}"
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, help=f"{f.metadata.get('help', '')} ({shown})")
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif text.startswith("list"):
            kwargs["nargs"] = "+"
        elif text.startswith("dict"):
            kwargs.update(nargs="+", metavar="KEY=VALUE")
        else:
            kwargs["type"] = next((t for t in (int, float) if annotation is t or text.startswith(t.__name__)), str)
        _option(parser, name, **kwargs)


def config_from_args(args: argparse.Namespace):
    from .methods.args import read_method_args

    values = load_toml(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k in config_fields()}
    if "method_args" in given:
        given["method_args"] = {**values.get("method_args", {}), **read_method_args(given["method_args"])}
    return make_config({**values, **given})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=(
        "PrefAlign: align a text-to-image diffusion model with human preferences by training a LoRA."))
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a preference LoRA", description=(
        "Train a LoRA with a preference method. Options come from --config (TOML) and flags; flags win. "
        "--model and --data are required (the toy world: --model toy, or `python -m trainer demo`). Ctrl-C "
        "stops at the end of the step, saves a checkpoint and the LoRA, and exits with code 130."))
    add_train_arguments(train)
    sub.add_parser("methods", help="list the alignment methods and their defaults")
    demo = sub.add_parser("demo", help="align the built-in toy model toward an attribute and show before/after",
                          description="Build a toy preference dataset, train a LoRA, and report the chosen-attribute "
                                      "rate before and after (with 95% intervals) plus a before/after grid PNG.")
    demo.add_argument("--method", default="dpo", help="alignment method (default: dpo)")
    _option(demo, "method_args", nargs="+", default=[], metavar="KEY=VALUE", help="method hyper-parameters")
    demo.add_argument("--attribute", default="shaded", help="the attribute to prefer: shaded/flat, a colour or a shape")
    demo.add_argument("--pairs", type=int, default=256, help="preference pairs to generate (default: 256)")
    demo.add_argument("--steps", type=int, default=150, help="training steps (default: 150)")
    demo.add_argument("--samples", type=int, default=192, help="samples per model for the rates (default: 192)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    _option(demo, "output_dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    from .sampling_commands import add_sampling_parsers

    add_sampling_parsers(sub)
    return parser


class CtrlC:
    """Once training runs, the first Ctrl-C asks the loop to stop at the next step boundary (it then saves
    a checkpoint and the LoRA); a second one aborts at once. Before training starts, Ctrl-C aborts."""

    def __init__(self) -> None:
        self.started = self.requested = False
        self._previous: Any = None

    def start(self, step: int) -> None:
        self.started = True
        if threading.current_thread() is threading.main_thread():  # where Python delivers signals
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping at the end of this step and saving a checkpoint and the LoRA "
              "(Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this run: the same options, with `--resume latest`."""
    kept, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0].replace("_", "-")
        if skip or name in ("--overwrite", "--no-overwrite"):
            skip = False
        elif name == "--resume":
            skip = "=" not in arg  # its value follows
        else:
            kept.append(arg)
    return shlex.join(["python", "-m", "trainer", *kept, "--resume", "latest"])


def _train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .loop import TrainHooks
    from .run import run

    config = config_from_args(args)
    again = resume_command(argv)
    ctrl_c = CtrlC()
    try:
        result = run(config, TrainHooks(should_stop=lambda: ctrl_c.requested, on_start=ctrl_c.start), resume_hint=again)
    except KeyboardInterrupt:
        if not ctrl_c.started:
            print("error: interrupted before training started; nothing was written to the output folder", file=sys.stderr)
        else:
            print(f"aborted; continue from the last checkpoint with: {again}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        ctrl_c.restore()
    return EXIT_INTERRUPTED if result.stopped else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from .atomic import DiskFullError
    from .loop import NonFiniteLossError

    try:
        if args.command == "methods":
            from .methods.table import methods_table_text

            print(methods_table_text())
            return 0
        if args.command == "demo":
            from pathlib import Path

            from .demo import run_demo
            from .methods.args import read_method_args

            report = run_demo(Path(args.output_dir), args.method, args.attribute, args.pairs, args.steps,
                              args.samples, args.seed, read_method_args(args.method_args))
            print((Path(args.output_dir) / "report.md").read_text())
            return 0 if report["passed"] else 1
        if hasattr(args, "handler"):  # eval, pairs, iterate
            return args.handler(args)
        if args.command == "train":
            return _train(args, argv)
    except (ConfigError, ValueError) as e:
        print(f"error: {as_typed(str(e), argv)}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, DiskFullError) as e:  # the message says what was kept and what to do
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # demo, eval: nothing to continue; pairs, iterate: --resume; all write atomically
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 1


CONFIG_KEY = re.compile(r"config key '([a-z0-9_]+)'")


def as_typed(message: str, argv: Sequence[str]) -> str:
    """Messages name config keys (as a TOML config spells them); a value typed on this command line is named
    by its flag instead (`config key 'learning_rate'` -> `--learning-rate`)."""
    def name(key: re.Match) -> str:
        flag = "--" + key[1].replace("_", "-")
        typed = any(a in (flag, "--no-" + flag[2:]) or a.startswith(flag + "=") for a in argv)
        return flag if typed else key[0]

    return CONFIG_KEY.sub(name, message)


def _quiet_libraries() -> None:
    """Our own progress bar and summary are what a person reads; silence the libraries' loading chatter."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
