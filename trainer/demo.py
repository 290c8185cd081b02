"""`python -m trainer demo`: align the toy model toward an attribute its captions leave open, and show it.

Builds a toy preference dataset (chosen = images with the attribute, rejected = the same object
without it), trains a LoRA with any method, samples the same seeds and prompts before and after,
and reports the attribute rate with 95% Wilson intervals plus a before/after grid PNG.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from .atomic import atomic_path, write_text
from .config import make_config

#: Toy-scale defaults that move the model visibly within the demo's CPU budget.
DEMO_TRAINING = dict(model="toy", resolution=32, batch_size=8, learning_rate=1e-3, rank=8, alpha=8.0,
                     lr_warmup_steps=10, checkpoint_every=0, log_every=10)


@dataclass
class RateReport:
    rate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.rate:.1%} [{self.low:.1%}, {self.high:.1%}]"


def attribute_report(images: Sequence[Image.Image], attribute: str) -> RateReport:
    from .toy import rate_interval

    return RateReport(*rate_interval(images, attribute))


def grid(rows: Sequence[Sequence[Image.Image]], scale: int = 2, gap: int = 4) -> Image.Image:
    """Images in rows (e.g. before above after), upscaled for viewing."""
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    canvas = Image.new("RGB", (len(rows[0]) * (w + gap) - gap, len(rows) * (h + gap) - gap), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            canvas.paste(im.resize((w, h), Image.NEAREST), (c * (w + gap), r * (h + gap)))
    return canvas


def evaluation_set(attribute: str, samples: int, seed: int) -> tuple[list[str], list[int]]:
    """Prompts cycling over every caption that leaves the attribute open, one seed per sample."""
    from .toy import open_prompts

    prompts = open_prompts(attribute)
    return [prompts[i % len(prompts)] for i in range(samples)], [seed + i for i in range(samples)]


def run_demo(output_dir: Path, method: str = "dpo", attribute: str = "shaded", pairs: int = 256, steps: int = 150,
             samples: int = 192, seed: int = 0, method_args: dict | None = None) -> dict:
    """Train, sample before/after, write report.md + grid.png; return the report as a dict."""
    from .run import run
    from .toy import attribute_kind, sample_images, write_preference_dataset

    attribute_kind(attribute)  # an unknown attribute stops here, before it names a folder
    config = make_config({**DEMO_TRAINING, "data": str(output_dir / "data" / f"{attribute}-{pairs}pairs-seed{seed}"),
                          "method": method, "max_steps": steps, "seed": seed, "method_args": method_args or {},
                          "output_dir": str(output_dir / "run"), "cache_dir": str(output_dir / "cache"),
                          "overwrite": True})  # the demo's run folder holds its latest run only
    data = Path(config.data)  # one dataset per (attribute, pairs, seed): another demo never reuses these pairs
    if not (data / "pairs.jsonl").exists():
        write_preference_dataset(data, attribute, pairs, seed)
    result = run(config)
    prompts, seeds = evaluation_set(attribute, samples, seed=10_000)
    before = sample_images(None, prompts, seeds)
    after = sample_images(None, prompts, seeds, lora=str(result.lora_path))
    rate_before, rate_after = attribute_report(before, attribute), attribute_report(after, attribute)
    shown = min(12, samples)
    with atomic_path(output_dir / "grid.png") as tmp:
        grid([before[:shown], after[:shown]]).save(tmp, format="PNG")
    report = {"method": method, "attribute": attribute, "steps": result.steps, "samples": samples,
              "before": vars(rate_before), "after": vars(rate_after),
              "moved": rate_after.low > rate_before.high, "lora": str(result.lora_path), "final_metrics": result.metrics}
    write_text(output_dir / "report.json", json.dumps(report, indent=2))
    write_text(output_dir / "report.md", render_report(report, rate_before, rate_after, output_dir))
    return report


def render_report(report: dict, before: RateReport, after: RateReport, output_dir: Path) -> str:
    verdict = ("the intervals do not overlap: the model moved toward the chosen side" if report["moved"]
               else "the intervals overlap: no significant change at this budget")
    return (f"# PrefAlign demo: {report['method']} toward '{report['attribute']}'\n\n"
            f"Attribute rate over {report['samples']} samples (same prompts and seeds), 95% Wilson interval:\n\n"
            f"| model | rate |\n|---|---|\n| base | {before} |\n| base + LoRA | {after} |\n\n"
            f"Verdict: {verdict}.\n\nGrid (top: base, bottom: with the LoRA): {output_dir / 'grid.png'}\n"
            f"LoRA: {report['lora']}\n")
