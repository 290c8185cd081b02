"""The methods table: `python -m trainer methods` and the README."""
from __future__ import annotations

import dataclasses

from .base import default_note
from .guardrails import GUARDRAIL_FIELDS, GuardrailConfig
from .registry import method_class, method_names

COLUMNS = ("method", "paper", "reference", "hyper-parameters (defaults)")
LEGEND = ("reference: yes = the loss compares the LoRA with the frozen base model (one more UNet forward per "
          "step, no extra memory for weights); no = reference-free. (auto) = chosen from the other options. "
          "space=ncp measures the errors in the frozen U-Net encoder's features (NCP) instead of the latent. "
          "Set options with --method-args KEY=VALUE.")


def _format(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # as written in --method-args and TOML
    return f"{value:g}" if isinstance(value, float) else str(value)


def methods_table_rows() -> list[tuple[str, str, str, str]]:
    """(name, paper, needs a reference "yes"/"no", "key=default, ...") for every registered method."""
    rows = []
    for name in method_names():
        cls = method_class(name)
        config = cls.Config()
        options = ", ".join(
            f"{f.name}={_format(getattr(config, f.name))}" + default_note(f)
            for f in dataclasses.fields(config) if f.name not in GUARDRAIL_FIELDS
        )
        if isinstance(config, GuardrailConfig):
            options += " + guardrails"
        if "flow" not in cls.prediction_types:
            options += "; not on flow models (SD3, Flux)"
        rows.append((name, cls.paper, "yes" if cls.needs_reference else "no", options or "-"))
    return rows


def guardrails_line() -> str:
    """The options every method marked "+ guardrails" takes (docs/methods.md, "Guardrails")."""
    config = GuardrailConfig()
    return "guardrails: " + ", ".join(f"{name}={_format(getattr(config, name))}" for name in GUARDRAIL_FIELDS)


def methods_table_markdown() -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row[:3]) + f" | `{row[3]}` |" for row in methods_table_rows()]
    return "\n".join(lines) + f"\n\n`{guardrails_line()}`"


def methods_table_text() -> str:
    rows = [COLUMNS, *methods_table_rows()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    table = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows)
    return f"{table}\n{guardrails_line()}\n\n{LEGEND}"
