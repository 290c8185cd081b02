"""`python -m trainer eval`: does a LoRA beat its base model? Same prompts and seeds, one or more judges.

Every (prompt, seed) is sampled twice, once from the base model and once with the LoRA (DDIM, eta 0,
so the pair differs only by the LoRA). Each judge (`trainer.scorers`: ``attribute``, ``clip``,
``aesthetic``, ``style``) scores every image, and a pair is a **win** (LoRA image scores strictly higher),
a **tie** or a **loss**. Ties are reported as ties: the **win rate** is wins / (wins + losses), over the
decided pairs only, with a 95% Wilson score interval on that proportion; the shares of wins, ties and
losses among all pairs are shown too, each with its own 95% Wilson interval. (Counting ties as
non-wins would turn "36 wins, 59 ties, 1 loss" into a 37.5% "win rate" that reads as a loss.)

Binary judges (the toy ``attribute`` classifier, ``style``) also report the rate of each model with its
Wilson interval. ``style`` is Diffusion-RPO's style-alignment metric (Gu et al. 2024, arXiv 2406.06382):
the fraction of generations judged in the target style, by the toy classifier without ``--scorer-model``,
else by CLIP zero-shot ("a {style} image" beats the alternatives); a fixed, cheap stand-in for the paper's
judging, not its exact protocol.

A judge that labelled the LoRA's training pairs (`trainer pairs` records its name and weights fingerprint in
the parquet; the LoRA's metadata names the dataset) is marked: a LoRA can learn a judge's quirks, so judge
with one that did not label too.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .atomic import atomic_path, write_text
from .scorers import Scorer


@dataclass
class Rate:
    hits: int
    n: int
    rate: float
    low: float
    high: float


@dataclass
class WinRate:
    """LoRA vs base over paired samples. `rate`/`low`/`high`: wins among decided pairs (None when all tied)."""

    wins: int
    ties: int
    losses: int
    rate: float | None
    low: float
    high: float
    win_share: Rate
    tie_share: Rate
    loss_share: Rate

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def decided(self) -> int:
        return self.wins + self.losses


def rate(flags: Sequence[bool | float]) -> Rate:
    """Share of true flags with its 95% Wilson interval."""
    from .toy.scoring import wilson_interval

    hits = int(sum(bool(f) for f in flags))
    low, high = wilson_interval(hits, len(flags))
    return Rate(hits, len(flags), hits / len(flags), low, high)


def win_rate(lora_scores: Sequence[float], base_scores: Sequence[float]) -> WinRate:
    """Wins over decided pairs (95% Wilson interval), and the win / tie / loss shares of all pairs."""
    from .toy.scoring import wilson_interval

    if len(lora_scores) != len(base_scores) or not lora_scores:
        raise ValueError(f"need equally many scores, at least one: got {len(lora_scores)} and {len(base_scores)}")
    wins = [a > b for a, b in zip(lora_scores, base_scores)]
    ties = [a == b for a, b in zip(lora_scores, base_scores)]
    losses = [a < b for a, b in zip(lora_scores, base_scores)]
    w, t, l = sum(wins), sum(ties), sum(losses)
    low, high = wilson_interval(w, w + l) if w + l else (0.0, 1.0)
    return WinRate(w, t, l, w / (w + l) if w + l else None, low, high, rate(wins), rate(ties), rate(losses))


def judge_report(scorer: Scorer, base_scores: Sequence[float], lora_scores: Sequence[float],
                 labelled: bool | None = None) -> dict:
    """One judge's verdict on paired samples: win rate, plus rates (binary judges) or mean scores."""
    wr = win_rate(lora_scores, base_scores)
    out: dict = {"name": scorer.name, "fingerprint": scorer.fingerprint, "labelled": labelled,
                 "binary": scorer.binary, "win_rate": asdict(wr)}
    if scorer.binary:
        before, after = rate(base_scores), rate(lora_scores)
        out.update(before=asdict(before), after=asdict(after), moved=after.low > before.high)
    else:
        out.update(moved=wr.low > 0.5)
    out.update(mean_base=float(np.mean(base_scores)), mean_lora=float(np.mean(lora_scores)),
               scores={"base": list(base_scores), "lora": list(lora_scores)})
    return out


def score_pairs(scorer: Scorer, base: Sequence[Image.Image], lora: Sequence[Image.Image], prompts: Sequence[str],
                labelled: bool | None = None) -> dict:
    """`judge_report` for images already sampled (same prompts, same seeds)."""
    return judge_report(scorer, scorer.score(base, prompts), scorer.score(lora, prompts), labelled)


def labelled_by(scorer: Scorer, labellers: list[dict] | None) -> bool | None:
    """Whether `scorer` (or a member) labelled the training pairs; None when the labellers are unknown."""
    if labellers is None:
        return None
    used = {entry.get("fingerprint") for entry in labellers}
    return any(identity["fingerprint"] in used for identity in scorer.identities())


def training_labellers(lora: str | os.PathLike) -> list[dict] | None:
    """The scorers that labelled the LoRA's training data, read from the dataset its metadata names."""
    from .export import read_lora
    from .pairs import read_labellers

    _, meta = read_lora(lora)
    dataset = meta.get("prefalign.dataset")
    return read_labellers(dataset) if dataset else None


def evaluate(lora: str | os.PathLike, model: str = "toy", scorers: str | Sequence[str] = ("attribute",),
             attribute: str = "shaded", scorer_model: str | None = None, prompts: str | os.PathLike | None = None,
             samples: int = 96, seed: int = 10_000, steps: int = 20, output_dir: str | os.PathLike | None = None,
             alternatives: Sequence[str] = (), guidance_scale: float | None = None) -> dict:
    """Sample base and base+LoRA on the same (prompt, seed) pairs, judge them, write eval.json + grid.png."""
    from .demo import grid
    from .generate import cpu_threads, default_guidance, generate, load_pipeline
    from .prompts import read_prompts
    from .scorers import make_scorers

    if samples < 1:
        raise ValueError(f"--samples must be positive, got {samples}")
    if not Path(lora).is_file():
        raise ValueError(f"--lora {lora}: no such file")
    judges = make_scorers([scorers] if isinstance(scorers, str) else list(scorers), attribute=attribute,
                          clip_model=scorer_model, alternatives=alternatives)
    labellers = training_labellers(lora)
    if prompts is None:
        from .toy import open_prompts

        base_prompts = open_prompts(attribute)
    else:
        base_prompts = read_prompts(prompts)
    prompt_list = [base_prompts[i % len(base_prompts)] for i in range(samples)]
    seeds = [seed + i for i in range(samples)]
    guidance = default_guidance(model) if guidance_scale is None else guidance_scale
    pipe = load_pipeline(model)
    base = generate(pipe, prompt_list, seeds, steps, guidance, threads=cpu_threads(model))
    tuned = generate(pipe, prompt_list, seeds, steps, guidance, lora=str(lora), threads=cpu_threads(model))
    report = {"lora": str(lora), "model": model, "attribute": attribute, "samples": samples, "seed": seed,
              "steps": steps, "guidance_scale": guidance, "labellers": labellers,
              "results": [score_pairs(j, base, tuned, prompt_list, labelled_by(j, labellers)) for j in judges],
              "prompts": prompt_list, "seeds": seeds}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        shown = min(12, samples)
        with atomic_path(out / "grid.png") as tmp:
            grid([base[:shown], tuned[:shown]]).save(tmp, format="PNG")
        report["files"] = [str(out / "eval.json"), str(out / "grid.png")]
        write_text(out / "eval.json", json.dumps(report, indent=2))
    return report


def _interval(r: dict) -> str:
    return f"[{r['low']:.1%}, {r['high']:.1%}]"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def judge_lines(result: dict) -> list[str]:
    """The lines a person reads for one judge."""
    w = result["win_rate"]
    mark = {True: " (labelled the training pairs)", False: " (did not label the training pairs)"}.get(result["labelled"], "")
    lines = [f"{result['name']}{mark}",
             f"  LoRA vs base: {_count(w['wins'], 'win')}, {_count(w['ties'], 'tie')}, {_count(w['losses'], 'loss', 'losses')}"]
    if w["rate"] is None:
        lines.append("  win rate: no decided pairs (every pair tied)")
    else:
        lines.append(f"  win rate over the {w['wins'] + w['losses']} decided pairs: {w['rate']:.1%} {_interval(w)}; "
                     f"ties {w['tie_share']['rate']:.1%} {_interval(w['tie_share'])} of all pairs (95% Wilson intervals)")
    if "before" in result:
        b, a = result["before"], result["after"]
        lines.append(f"  rate judged positive: base {b['rate']:.1%} {_interval(b)} -> LoRA {a['rate']:.1%} {_interval(a)}")
    else:
        lines.append(f"  mean score: base {result['mean_base']:.4g} -> LoRA {result['mean_lora']:.4g}")
    return lines


def summary(report: dict) -> str:
    lines = [f"{report['samples']} (prompt, seed) pairs, LoRA {report['lora']} on {report['model']}"]
    for result in report["results"]:
        lines += judge_lines(result)
    if report["results"] and all(r["labelled"] for r in report["results"]):
        lines.append("Every judge here labelled the training pairs; a LoRA can learn a judge's quirks, so also judge "
                     "with a scorer that did not label them.")
    if report.get("files"):
        lines.append(f"wrote {' and '.join(report['files'])}")
    return "\n".join(lines)


def add_eval_parser(sub) -> None:
    from .cli import _option
    from .scorers import KINDS

    ev = sub.add_parser("eval", help="win rate / attribute rate of a LoRA against its base model",
                        description="Sample base and base+LoRA on the same prompts and seeds and judge both with one "
                                    "or more scorers. Ties are reported as ties; the win rate is over decided pairs. "
                                    "Writes eval.json and a grid PNG.")
    ev.add_argument("--lora", required=True, help="the LoRA file to evaluate")
    ev.add_argument("--model", default="toy", help="base model: anything `train --model` takes (default: toy)")
    ev.add_argument("--scorer", action="append", default=None, metavar="SPEC",
                    help=f"a judge, repeat for several: {', '.join(KINDS)} with an optional :ARGUMENT, e.g. "
                         "attribute:shaded, clip:yuvalkirstain/PickScore_v1, aesthetic:HEAD.safetensors,CLIP, style "
                         "(default: attribute)")
    _option(ev, "scorer_model", default=None,
            help="default CLIP folder or hub id for clip/aesthetic/style judges given without one")
    ev.add_argument("--attribute", default="shaded", help="attribute / style to measure (default: shaded)")
    ev.add_argument("--alternatives", nargs="+", default=[], help="other styles for CLIP zero-shot style judging")
    ev.add_argument("--prompts", default=None, help="prompt file, .txt (one a line) or .jsonl ({\"prompt\": ...}); "
                                                   "default: toy captions leaving the attribute open")
    ev.add_argument("--samples", type=int, default=96, help="(prompt, seed) pairs (default: 96)")
    ev.add_argument("--seed", type=int, default=10_000, help="first seed (default: 10000)")
    ev.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    _option(ev, "guidance_scale", type=float, default=None,
            help="classifier-free guidance (default: 3 for the toy model, 7.5 otherwise)")
    _option(ev, "output_dir", default="runs/eval", help="where eval.json and grid.png go")
    ev.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    report = evaluate(args.lora, args.model, args.scorer or ["attribute"], args.attribute, args.scorer_model,
                      args.prompts, args.samples, args.seed, args.steps, args.output_dir, args.alternatives,
                      args.guidance_scale)
    print(summary(report))
    return 0
