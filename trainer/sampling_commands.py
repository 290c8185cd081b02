"""The subcommands that sample a model: `eval`, `pairs` and `iterate`. Each parser names its handler
(`args.handler(args) -> exit code`), so `cli.main` dispatches them with one line."""
from __future__ import annotations


def add_sampling_parsers(sub) -> None:
    from .evaluate import add_eval_parser
    from .iterate import add_iterate_parser
    from .pairs import add_pairs_parser

    add_eval_parser(sub)
    add_pairs_parser(sub)
    add_iterate_parser(sub)
