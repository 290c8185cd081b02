"""Method hyper-parameters as people write them: one place for the command line, the config file, the
ComfyUI node and its `/prefalign/methods` route.

- `read_method_args(text)`: `name = value` lines (TOML values; a bare word is a string, so `space=ncp`
  works on a command line) or a JSON object -> a dict, syntax only.
- `check_method_args(method, args)`: unknown names and wrong types are refused, naming `method_args.KEY`.
- `resolve_method_args(method, args)`: every hyper-parameter with the value this run uses, defaults
  and automatic choices included (what config.toml and the LoRA metadata record).
- `method_table()` / `format_args()`: each method's defaults, as the node's widget shows them.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

from ..config import tomllib
from .registry import method_class, method_names

#: A value that is not TOML but reads as a string: `space=ncp`, `loss_type=hinge`.
_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
SYNTAX = "write one `name = value` per line (TOML values) or a JSON object"


def _value(text: str, line: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        if _BARE_WORD.fullmatch(text):
            return text
        raise ValueError(f"method_args: {line!r}: {SYNTAX}: {e}") from None


def read_method_args(text: str | Sequence[str] | None) -> dict[str, Any]:
    """A JSON object, or `name = value` lines (a string, or one line per item as the command line gives
    them); blank lines and `#` comments are skipped. Values are not checked against a method here."""
    if isinstance(text, str):
        text = text.strip()
        if text.startswith("{"):
            try:
                args = json.loads(text)
            except ValueError as e:
                raise ValueError(f"method_args: {SYNTAX}: {e}") from None
            if not isinstance(args, dict):
                raise ValueError(f"method_args: {SYNTAX}")
            return args
        text = text.splitlines()
    args: dict[str, Any] = {}
    for line in (item.strip() for item in text or ()):
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"method_args: {line!r}: expected name = value; {SYNTAX}")
        args[key.strip()] = _value(value.strip(), line)
    return args


def check_method_args(method: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """`args` with ints widened to floats where the default is a float; an unknown method, an unknown
    name or a value of the wrong type raises ValueError naming it. A field whose default is None
    ("chosen from the other options") is checked by the method's config itself."""
    fields = {f.name: f for f in dataclasses.fields(method_class(method).Config)}
    checked = dict(args or {})
    for key, value in checked.items():
        if key not in fields:
            raise ValueError(f"method_args.{key}: {method} has no hyper-parameter {key}; "
                             f"it takes: {', '.join(fields) or 'none'}")
        per_model = fields[key].metadata.get("by_prediction")
        if per_model is not None and value is None:  # left to the model (resolve_method_args records it so)
            continue
        default = per_model["ddpm"] if per_model is not None else fields[key].default
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            checked[key] = float(value)
        elif default not in (dataclasses.MISSING, None) and not isinstance(value, type(default)):
            raise ValueError(f"method_args.{key}: expected {type(default).__name__}, got {value!r}")
    return checked


def resolve_method_args(method: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """Every hyper-parameter of `method` with the value a run with `args` uses (defaults filled in); one
    whose default depends on the model (`by_prediction`) and was not given stays None until the method
    meets its model (the LoRA metadata records the value used)."""
    return method_class(method).Config(**check_method_args(method, args)).recorded()


def parse_method_args(method: str, text: str | Sequence[str] | None) -> dict[str, Any]:
    """`read_method_args` then `check_method_args`: empty text means the method's defaults."""
    return check_method_args(method, read_method_args(text))


def method_table() -> dict[str, dict]:
    """Every method's defaults, paper, the prediction types it trains (`flow`: SD3, Flux and the other
    rectified-flow models) and its defaults that depend on the model (`per_model`: name -> {ddpm, flow})."""
    table = {}
    for n in method_names():
        cls = method_class(n)
        per_model = {f.name: f.metadata["by_prediction"] for f in dataclasses.fields(cls.Config)
                     if "by_prediction" in f.metadata}
        table[n] = {"defaults": cls.defaults(), "paper": cls.paper, "prediction_types": sorted(cls.prediction_types),
                    "per_model": per_model}
    return table


def format_args(defaults: dict, per_model: dict | None = None) -> str:
    """A method's defaults as `name = value` lines. An automatic value, and one that depends on the model
    (`per_model`), is a comment: left unset, the run picks it (a flow model gets its own beta)."""
    def line(k, v):
        if k in (per_model or {}):
            values = per_model[k]
            return f"# {k} = {json.dumps(v)} (flow models: {json.dumps(values['flow'])}): set by the model unless you uncomment it"
        return f"# {k} = (automatic)" if v is None else f"{k} = {json.dumps(v)}"

    return "\n".join(line(k, v) for k, v in defaults.items())
