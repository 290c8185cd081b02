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

Collateral damage is measured beside the preference. On toy prompts (which name colour, shape or style) the
report gives the **prompt fidelity** of each model: per attribute the prompt names, the share of samples the
toy classifier finds it in (95% Wilson intervals), and flags a fall of more than 5 points. For any model,
`--prompt-clip MODEL` adds the **prompt alignment**: CLIP text-image similarity (100 x cosine of the prompt's
and the image's CLIP embeddings, CLIPScore without its clamp) of each model, and the mean paired change with a
95% interval.

A LoRA trained with a negative-branch method (npo, read from its metadata) is sampled in the unconditional
branch of classifier-free guidance only; `--negative-lora` adds such a LoRA to the tuned side of any other
(Diffusion-NPO's "DPO + NPO").

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
from .scorers import ClipModel, Scorer


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


def training_labellers(meta: dict[str, str]) -> list[dict] | None:
    """The scorers that labelled the LoRA's training data, read from the dataset its metadata `meta` names."""
    from .pairs import read_labellers

    dataset = meta.get("prefalign.dataset")
    return read_labellers(dataset) if dataset else None


def fidelity(base: Sequence[Image.Image], tuned: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
    """Prompt fidelity of toy samples: per prompted attribute kind, the base and LoRA rates with their 95%
    Wilson intervals, and the kinds that fell more than 5 points (empty when the prompts name no toy attribute)."""
    from .toy import fidelity_drops, fidelity_rates

    before, after = fidelity_rates(base, prompts), fidelity_rates(tuned, prompts)
    if not before:
        return {}
    keys = ("rate", "low", "high")
    falls = fidelity_drops(before, after)
    return {"kinds": {k: {"base": dict(zip(keys, before[k])), "lora": dict(zip(keys, after[k]))} for k in before},
            "falls": falls, "kept": not falls}


def prompt_alignment(clip: ClipModel, base: Sequence[Image.Image], tuned: Sequence[Image.Image],
                     prompts: Sequence[str]) -> dict:
    """CLIP text-image similarity, 100 * cos(prompt embedding, image embedding), of each model, and the mean
    paired change with a 95% normal interval."""
    text = clip.texts(prompts)
    sims = {side: (100.0 * (text * clip.images(images)).sum(-1)).double().numpy()
            for side, images in (("base", base), ("lora", tuned))}
    change = sims["lora"] - sims["base"]
    half = 1.96 * change.std(ddof=1) / np.sqrt(len(change)) if len(change) > 1 else float("inf")
    return {"model": clip.location, "fingerprint": clip.fingerprint, "base": float(sims["base"].mean()),
            "lora": float(sims["lora"].mean()), "change": float(change.mean()),
            "change_low": float(change.mean() - half), "change_high": float(change.mean() + half),
            "scores": {"base": sims["base"].tolist(), "lora": sims["lora"].tolist()}}


def lora_placement(meta: dict[str, str]) -> str:
    """"negative" when the LoRA's method (its metadata `meta`) is a negative-branch one (npo), else "model"."""
    from .methods import method_class, method_names

    method = meta.get("prefalign.method", "")
    return "negative" if method in method_names() and method_class(method).negative_branch else "model"


def prompt_seeds(prompts: Sequence[str], samples: int, seed: int) -> tuple[list[str], list[int]]:
    """The (prompt, seed) pairs of `samples` samples: the prompts in turn, cycling, and consecutive seeds."""
    return [prompts[i % len(prompts)] for i in range(samples)], [seed + i for i in range(samples)]


def evaluate(lora: str | os.PathLike, model: str = "toy", scorers: str | Sequence[str] = ("attribute",),
             attribute: str = "shaded", scorer_model: str | None = None, prompts: str | os.PathLike | None = None,
             samples: int = 96, seed: int = 10_000, steps: int = 20, output_dir: str | os.PathLike | None = None,
             alternatives: Sequence[str] = (), guidance_scale: float | None = None,
             negative_lora: str | os.PathLike | None = None, prompt_clip: str | None = None) -> dict:
    """Sample base and base+LoRA on the same (prompt, seed) pairs, judge them, write eval.json + grid.png."""
    from .demo import grid
    from .export import read_lora
    from .generate import cpu_threads, default_guidance, generate, load_pipeline
    from .prompts import read_prompts
    from .scorers import make_scorers

    if samples < 1:
        raise ValueError(f"--samples must be positive, got {samples}")
    for option, path in (("--lora", lora), ("--negative-lora", negative_lora)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{option} {path}: no such file")
    clips: dict[str, ClipModel] = {}  # --prompt-clip reuses a judge's CLIP at the same location
    judges = make_scorers([scorers] if isinstance(scorers, str) else list(scorers), attribute=attribute,
                          clip_model=scorer_model, alternatives=alternatives, clips=clips)
    meta = read_lora(lora)[1]
    labellers = training_labellers(meta)
    if prompts is None:
        from .toy import open_prompts

        base_prompts = open_prompts(attribute)
    else:
        base_prompts = read_prompts(prompts)
    prompt_list, seeds = prompt_seeds(base_prompts, samples, seed)
    guidance = default_guidance(model) if guidance_scale is None else guidance_scale
    pipe = load_pipeline(model)
    base = generate(pipe, prompt_list, seeds, steps, guidance, threads=cpu_threads(model))
    placement = lora_placement(meta)
    loras = {"negative_lora": str(lora)} if placement == "negative" else {"lora": str(lora)}
    if negative_lora is not None:
        if "negative_lora" in loras:
            raise ValueError(f"--negative-lora: --lora {lora} already goes into the negative branch (its method is "
                             "a negative-branch one); give one negative-branch LoRA")
        loras["negative_lora"] = str(negative_lora)
    tuned = generate(pipe, prompt_list, seeds, steps, guidance, threads=cpu_threads(model), **loras)
    if prompt_clip and prompt_clip not in clips:
        clips[prompt_clip] = ClipModel(prompt_clip, option="--prompt-clip")
    report = {"lora": str(lora), "placement": placement, "negative_lora": negative_lora and str(negative_lora),
              "model": model, "attribute": attribute, "samples": samples, "seed": seed,
              "steps": steps, "guidance_scale": guidance, "labellers": labellers,
              "results": [score_pairs(j, base, tuned, prompt_list, labelled_by(j, labellers)) for j in judges],
              "fidelity": fidelity(base, tuned, prompt_list),
              "prompt_alignment": prompt_alignment(clips[prompt_clip], base, tuned, prompt_list) if prompt_clip else None,
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


def rate_text(r: dict) -> str:
    """A rate with its 95% interval, as reports show it: 37.5% [13.7%, 69.4%]."""
    return f"{r['rate']:.1%} [{r['low']:.1%}, {r['high']:.1%}]"


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
        lines.append(f"  win rate over the {w['wins'] + w['losses']} decided pairs: {rate_text(w)}; "
                     f"ties {rate_text(w['tie_share'])} of all pairs (95% Wilson intervals)")
    if "before" in result:
        b, a = result["before"], result["after"]
        lines.append(f"  rate judged positive: base {rate_text(b)} -> LoRA {rate_text(a)}")
    else:
        lines.append(f"  mean score: base {result['mean_base']:.4g} -> LoRA {result['mean_lora']:.4g}")
    return lines


def fidelity_lines(report: dict) -> list[str]:
    """Collateral damage: prompt fidelity (toy prompts) and prompt alignment (CLIP), when measured."""
    lines = []
    if report.get("fidelity"):
        f = report["fidelity"]
        lines.append("prompt fidelity (toy classifier: samples showing what the prompt names, 95% Wilson intervals)")
        for kind, r in f["kinds"].items():
            lines.append(f"  {kind}: base {rate_text(r['base'])} -> LoRA {rate_text(r['lora'])}")
        lines.append("  kept: no prompted attribute fell more than 5 points" if f["kept"] else
                     "  fell more than 5 points: " + ", ".join(f"{k} -{v:.1%}" for k, v in f["falls"].items()))
    a = report.get("prompt_alignment")
    if a:
        lines.append(f"prompt alignment (CLIP {a['model']}, 100 x cosine): base {a['base']:.2f} -> LoRA {a['lora']:.2f}, "
                     f"change {a['change']:+.2f} [{a['change_low']:+.2f}, {a['change_high']:+.2f}] (95%)")
    return lines


def summary(report: dict) -> str:
    where = {"negative": " in the negative branch of guidance"}.get(report.get("placement"), "")
    extra = f" + negative-branch LoRA {report['negative_lora']}" if report.get("negative_lora") else ""
    lines = [f"{report['samples']} (prompt, seed) pairs, LoRA {report['lora']}{where}{extra} on {report['model']}"]
    for result in report["results"]:
        lines += judge_lines(result)
    lines += fidelity_lines(report)
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
    ev.add_argument("--lora", required=True, help="the LoRA file to evaluate (an npo LoRA, by its metadata, goes into "
                                                 "the negative branch of guidance)")
    _option(ev, "negative_lora", default=None,
            help="a negative-branch LoRA (method npo) to add to the LoRA side, in the unconditional branch of guidance")
    _option(ev, "prompt_clip", default=None,
            help="CLIP folder or hub id for the prompt-alignment score (CLIP text-image similarity), e.g. "
                 "openai/clip-vit-large-patch14")
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
                      args.guidance_scale, args.negative_lora, args.prompt_clip)
    print(summary(report))
    return 0
