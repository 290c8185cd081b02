"""`python -m trainer demo`: align the toy model toward an attribute its captions leave open, and show it.

Builds a toy preference dataset (chosen = images with the attribute, rejected = the same object
without it), trains a LoRA with any method, samples the same seeds and prompts before and after
(a negative-branch method's LoRA, npo, goes into the unconditional branch of guidance only), and
reports with 95% Wilson intervals the attribute rate and the prompt fidelity: the share of samples
that keep each attribute their prompt names (colour and shape when preferring a style). The demo
passes when the attribute moved (the intervals separate) and no prompted attribute fell by more than
5 points; a before/after grid PNG shows it.
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
#: Learning rates other than DEMO_TRAINING's. npo: its LoRA acts through the negative branch, where guidance
#: multiplies its effect by (scale - 1) = 2; at 1e-3 it moved 'shaded' 37% -> 96% but kept the prompted colour in
#: only 78% of the samples (64 pairs, 40 steps); at 1e-4 (the official recipe also trains NPO at a lower rate
#: than DPO: 5e-6) it keeps 100% (benchmarks/alignment.py).
DEMO_LEARNING_RATE: dict[str, float] = {"npo": 1e-4}


def toy_training(method: str) -> dict:
    """The toy recipe of `method`: DEMO_TRAINING with the method's learning rate."""
    return {**DEMO_TRAINING, "method": method,
            "learning_rate": DEMO_LEARNING_RATE.get(method, DEMO_TRAINING["learning_rate"])}


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


def fidelity_report(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, RateReport]:
    """Per attribute kind the prompts name, the share of images that keep it (95% Wilson interval)."""
    from .toy import fidelity_rates

    return {kind: RateReport(*r) for kind, r in fidelity_rates(images, prompts).items()}


def fidelity_falls(before: dict[str, RateReport], after: dict[str, RateReport]) -> dict[str, float]:
    """The prompted attributes whose rate fell by more than the bound (5 points), with the fall."""
    from .toy import fidelity_drops

    return fidelity_drops({k: (r.rate,) for k, r in before.items()}, {k: (r.rate,) for k, r in after.items()})


def sample_with_lora(method: str, lora: str | Path, prompts: Sequence[str], seeds: Sequence[int],
                     steps: int = 20, model: str | Path | None = None) -> list[Image.Image]:
    """Samples with a trained LoRA where its method puts it: the whole model, or the CFG negative branch (npo)."""
    from .methods import method_class
    from .toy import sample_images

    where = "negative_lora" if method_class(method).negative_branch else "lora"
    return sample_images(model, prompts, seeds, steps=steps, **{where: str(lora)})


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
    from .evaluate import prompt_seeds
    from .toy import open_prompts

    return prompt_seeds(open_prompts(attribute), samples, seed)


def run_demo(output_dir: Path, method: str = "dpo", attribute: str = "shaded", pairs: int = 256, steps: int = 150,
             samples: int = 192, seed: int = 0, method_args: dict | None = None) -> dict:
    """Train, sample before/after, write report.md + grid.png; return the report as a dict."""
    from .methods import method_class
    from .run import run
    from .toy import attribute_kind, sample_images, write_preference_dataset

    attribute_kind(attribute)  # an unknown attribute stops here, before it names a folder
    config = make_config({**toy_training(method), "data": str(output_dir / "data" / f"{attribute}-{pairs}pairs-seed{seed}"),
                          "max_steps": steps, "seed": seed, "method_args": method_args or {},
                          "output_dir": str(output_dir / "run"), "cache_dir": str(output_dir / "cache"),
                          "overwrite": True})  # the demo's run folder holds its latest run only
    data = Path(config.data)  # one dataset per (attribute, pairs, seed): another demo never reuses these pairs
    if not (data / "pairs.jsonl").exists():
        write_preference_dataset(data, attribute, pairs, seed)
    result = run(config)
    prompts, seeds = evaluation_set(attribute, samples, seed=10_000)
    before = sample_images(None, prompts, seeds)
    after = sample_with_lora(method, result.lora_path, prompts, seeds)
    shown = min(12, samples)
    with atomic_path(output_dir / "grid.png") as tmp:
        grid([before[:shown], after[:shown]]).save(tmp, format="PNG")
    report = {"method": method, "attribute": attribute, "steps": result.steps, "samples": samples,
              **judge(before, after, prompts, attribute), "lora": str(result.lora_path),
              "negative_branch": method_class(method).negative_branch, "final_metrics": result.metrics}
    write_text(output_dir / "report.json", json.dumps(report, indent=2))
    write_text(output_dir / "report.md", render_report(report, output_dir))
    return report


def judge(before: Sequence[Image.Image], after: Sequence[Image.Image], prompts: Sequence[str], attribute: str) -> dict:
    """Attribute rate and prompt fidelity of both sample sets, and the verdict: `moved` (the intervals
    separate), `fidelity_kept` (no prompted attribute fell more than 5 points), `passed` (both)."""
    rate_before, rate_after = attribute_report(before, attribute), attribute_report(after, attribute)
    fid_before, fid_after = fidelity_report(before, prompts), fidelity_report(after, prompts)
    falls = fidelity_falls(fid_before, fid_after)
    moved = rate_after.low > rate_before.high
    return {"before": vars(rate_before), "after": vars(rate_after), "moved": moved,
            "fidelity": {k: {"before": vars(fid_before[k]), "after": vars(fid_after[k])} for k in fid_before},
            "fidelity_falls": falls, "fidelity_kept": not falls, "passed": moved and not falls}


def render_report(report: dict, output_dir: Path) -> str:
    def cell(r: dict) -> str:
        return str(RateReport(**r))

    if report["passed"]:
        verdict = "the model moved toward the chosen side and kept what the prompts ask for"
    elif report["moved"]:
        falls = ", ".join(f"{k} -{v:.1%}" for k, v in report["fidelity_falls"].items())
        verdict = f"the model moved toward the chosen side, but prompt fidelity fell more than 5 points ({falls})"
    else:
        verdict = "the intervals overlap: no significant change at this budget"
    rows = [f"| '{report['attribute']}' (preferred) | {cell(report['before'])} | {cell(report['after'])} |"]
    rows += [f"| {kind} as prompted | {cell(r['before'])} | {cell(r['after'])} |" for kind, r in report["fidelity"].items()]
    where = "in the negative branch of guidance" if report["negative_branch"] else "on the model"
    return (f"# PrefAlign demo: {report['method']} toward '{report['attribute']}'\n\n"
            f"Rates over {report['samples']} samples (same prompts and seeds), 95% Wilson intervals: the preferred "
            f"attribute, and each attribute the prompts name (prompt fidelity).\n\n"
            f"| rate | base | base + LoRA {where} |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
            f"Verdict: {verdict}.\n\nGrid (top: base, bottom: with the LoRA): {output_dir / 'grid.png'}\n"
            f"LoRA: {report['lora']}\n")
