"""`python -m trainer`: train, list methods."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

from .config import ConfigError, config_fields, load_toml, make_config


def _parse_value(text: str) -> Any:
    """A flag value as TOML would read it (numbers, booleans, strings)."""
    from .config import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _key_values(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("method_args", f"expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (`--max_steps` and `--max-steps` both work); unset flags keep the config file's."""
    parser.add_argument("--config", help="TOML file with any of the options below; flags override it")
    for name, (f, annotation) in config_fields().items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        text = str(annotation)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif text.startswith("list"):
            kwargs["nargs"] = "+"
        elif text.startswith("dict"):
            kwargs.update(nargs="+", metavar="KEY=VALUE")
        else:
            kwargs["type"] = next((t for t in (int, float) if annotation is t or text.startswith(t.__name__)), str)
        parser.add_argument(*flags, **kwargs)


def config_from_args(args: argparse.Namespace):
    values = load_toml(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k in config_fields()}
    if "method_args" in given:
        given["method_args"] = {**values.get("method_args", {}), **_key_values(given["method_args"])}
    return make_config({**values, **given})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=(
        "PrefAlign: align a text-to-image diffusion model with human preferences by training a LoRA."))
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a preference LoRA", description=(
        "Train a LoRA with a preference method. Options come from --config (TOML) and flags; flags win."))
    add_train_arguments(train)
    sub.add_parser("methods", help="list the alignment methods and their defaults")
    demo = sub.add_parser("demo", help="align the built-in toy model toward an attribute and show before/after",
                          description="Build a toy preference dataset, train a LoRA, and report the chosen-attribute "
                                      "rate before and after (with 95%% intervals) plus a before/after grid PNG.")
    demo.add_argument("--method", default="dpo", help="alignment method (default: dpo)")
    demo.add_argument("--method-args", "--method_args", nargs="+", default=[], metavar="KEY=VALUE",
                      help="method hyper-parameters")
    demo.add_argument("--attribute", default="shaded", help="the attribute to prefer: shaded/flat, a colour or a shape")
    demo.add_argument("--pairs", type=int, default=256, help="preference pairs to generate (default: 256)")
    demo.add_argument("--steps", type=int, default=150, help="training steps (default: 150)")
    demo.add_argument("--samples", type=int, default=192, help="samples per model for the rates (default: 192)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    demo.add_argument("--output-dir", "--output_dir", default="runs/demo", help="where everything goes")
    from .sampling_commands import add_sampling_parsers

    add_sampling_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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

            report = run_demo(Path(args.output_dir), args.method, args.attribute, args.pairs, args.steps,
                              args.samples, args.seed, _key_values(args.method_args))
            print((Path(args.output_dir) / "report.md").read_text())
            return 0 if report["moved"] else 1
        if hasattr(args, "handler"):
            return args.handler(args)
        if args.command == "train":
            from .run import run

            run(config_from_args(args))
            return 0
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, DiskFullError) as e:  # the message says what was kept and what to do
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 1


def _quiet_libraries() -> None:
    """Our own progress bar and summary are what a person reads; silence the libraries' loading chatter."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
