"""`python -m trainer eval`: does a LoRA beat its base model? Same prompts and seeds, three scorers.

Every (prompt, seed) is sampled twice, once from the base model and once with the LoRA (DDIM, eta 0,
so the pair differs only by the LoRA). A scorer gives each image a number; the **win rate** is the
fraction of pairs whose LoRA image scores strictly higher than its base image (ties count as
non-wins), with a 95% Wilson interval. Scorers:

- ``attribute``: the toy world's exact classifier; score 1 when the image has ``--attribute``, else 0.
  Also reports the attribute rate of each model with its Wilson interval.
- ``clip``: a CLIP preference model (PickScore / HPS-style) from a folder or hub id
  (``--scorer-model``): score = logit_scale * cos(text_emb(prompt), image_emb(image)), exactly how
  PickScore scores an image (its `logit_scale.exp()` times the dot product of unit embeddings).
- ``style``: the style-alignment metric of Diffusion-RPO (Gu et al. 2024, arXiv 2406.06382), which
  judges whether generations are in the target style. We report the *fraction of generations judged
  in the target style* (``--attribute``) for base and LoRA, with Wilson intervals. The judge is the toy
  classifier when no ``--scorer-model`` is given (exact on toy images), otherwise CLIP zero-shot
  classification: an image is in the target style when "a {style} image" has the highest cosine
  among the target and its alternatives (the other values of the attribute's kind in the toy world,
  or ``--alternatives``). This is a reproducible stand-in for the paper's judging, not its exact
  protocol: the judge is fixed and cheap so the number can be compared across runs.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path, write_text

SCORERS = ("attribute", "clip", "style")
STYLE_TEMPLATE = "a {} image"


@dataclass
class WinRate:
    wins: int
    ties: int
    losses: int
    rate: float
    low: float
    high: float

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses


@dataclass
class Rate:
    hits: int
    n: int
    rate: float
    low: float
    high: float


def win_rate(lora_scores: Sequence[float], base_scores: Sequence[float]) -> WinRate:
    """Fraction of pairs where the LoRA image scores strictly higher, with its 95% Wilson interval."""
    from .toy.scoring import wilson_interval

    if len(lora_scores) != len(base_scores) or not lora_scores:
        raise ValueError(f"need equally many scores, at least one: got {len(lora_scores)} and {len(base_scores)}")
    wins = sum(a > b for a, b in zip(lora_scores, base_scores))
    ties = sum(a == b for a, b in zip(lora_scores, base_scores))
    low, high = wilson_interval(wins, len(lora_scores))
    return WinRate(wins, ties, len(lora_scores) - wins - ties, wins / len(lora_scores), low, high)


def rate(flags: Sequence[bool | float]) -> Rate:
    from .toy.scoring import wilson_interval

    hits = int(sum(bool(f) for f in flags))
    low, high = wilson_interval(hits, len(flags))
    return Rate(hits, len(flags), hits / len(flags), low, high)


class Scorer(Protocol):
    binary: bool

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]: ...


def pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float [N, 3, H, W] in [-1, 1] (what `ClipEmbedder.images` takes)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


class AttributeScorer:
    """1.0 when the toy classifier finds `attribute` in the image, else 0.0 (the prompt is not used)."""

    binary = True

    def __init__(self, attribute: str) -> None:
        from .toy import attribute_kind

        attribute_kind(attribute)  # unknown values fail here, before any sampling
        self.attribute = attribute

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        from .toy import has_attribute

        return [float(has_attribute(im, self.attribute)) for im in images]


class ClipScorer:
    """PickScore / HPS-style preference: logit_scale * cos(text embedding, image embedding)."""

    binary = False

    def __init__(self, location: str, batch_size: int = 64) -> None:
        from .models.embedder import ClipEmbedder
        from .models.loading import check_model_source

        check_model_source(location, "--scorer-model")  # a typo or an offline hub id: said before any download
        try:
            self.embedder = ClipEmbedder(location)
        except ValueError as e:  # the embedder names its training option ("config key 'embedder'"): name ours
            reason = str(e).split(": ", 1)[-1].splitlines()[0]
            raise ValueError(f"--scorer-model {location}: {reason}") from None
        self.logit_scale = float(self.embedder.model.logit_scale.exp())
        self.batch_size = batch_size

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.cat([self.embedder.images(pixels(images[i:i + self.batch_size]))
                          for i in range(0, len(images), self.batch_size)])

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        step = self.batch_size
        text = torch.cat([self.embedder.text(prompts[i:i + step]) for i in range(0, len(prompts), step)])
        return (self.logit_scale * (text * self.embed(images)).sum(-1)).tolist()


class StyleScorer:
    """1.0 when the image is judged in the target style: toy classifier, or CLIP zero-shot over styles."""

    binary = True

    def __init__(self, style: str, clip: ClipScorer | None = None, alternatives: Sequence[str] = ()) -> None:
        self.style, self.clip = style, clip
        if clip is None:
            self.toy = AttributeScorer(style)
            return
        if not alternatives:
            from .toy import ATTRIBUTES, attribute_kind

            alternatives = [v for v in ATTRIBUTES[attribute_kind(style)] if v != style]
        self.labels = [style, *[a for a in alternatives if a != style]]
        if len(self.labels) < 2:
            raise ValueError("style scoring with CLIP needs at least one alternative style")

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if self.clip is None:
            return self.toy.score(images, prompts)
        text = self.clip.embedder.text([STYLE_TEMPLATE.format(s) for s in self.labels])
        best = (self.clip.embed(images) @ text.T).argmax(-1)
        return [float(i == 0) for i in best.tolist()]


def make_scorer(kind: str, attribute: str, scorer_model: str | None = None,
                alternatives: Sequence[str] = ()) -> Scorer:
    if kind == "attribute":
        return AttributeScorer(attribute)
    if kind == "clip":
        if not scorer_model:
            raise ValueError("--scorer clip needs --scorer-model (a CLIP folder or hub id, e.g. PickScore)")
        return ClipScorer(scorer_model)
    if kind == "style":
        return StyleScorer(attribute, ClipScorer(scorer_model) if scorer_model else None, alternatives)
    raise ValueError(f"unknown scorer {kind!r}; choose one of {', '.join(SCORERS)}")


def read_prompts(source: str | os.PathLike | None, attribute: str) -> list[str]:
    """Prompts from a file (one a line, blank lines skipped), or the toy captions leaving `attribute` open."""
    if source is None:
        from .toy import open_prompts

        return open_prompts(attribute)
    if not Path(source).is_file():
        raise ValueError(f"--prompts {source}: no such file")
    prompts = [line.strip() for line in Path(source).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{source}: no prompts")
    return prompts


def score_pairs(scorer: Scorer, base: Sequence[Image.Image], lora: Sequence[Image.Image],
                prompts: Sequence[str]) -> dict:
    """The report for images already sampled: win rate, plus rates (binary scorers) or mean scores."""
    base_scores, lora_scores = scorer.score(base, prompts), scorer.score(lora, prompts)
    out: dict = {"win_rate": asdict(win_rate(lora_scores, base_scores))}
    if scorer.binary:
        before, after = rate(base_scores), rate(lora_scores)
        out.update(before=asdict(before), after=asdict(after), moved=after.low > before.high)
    else:
        out.update(mean_base=float(np.mean(base_scores)), mean_lora=float(np.mean(lora_scores)),
                   moved=out["win_rate"]["low"] > 0.5)
    out["scores"] = {"base": base_scores, "lora": lora_scores}
    return out


def evaluate(lora: str | os.PathLike, model: str = "toy", scorer: str = "attribute", attribute: str = "shaded",
             scorer_model: str | None = None, prompts: str | os.PathLike | None = None, samples: int = 96,
             seed: int = 10_000, steps: int = 20, output_dir: str | os.PathLike | None = None,
             alternatives: Sequence[str] = ()) -> dict:
    """Sample base and base+LoRA on the same (prompt, seed) pairs, score them, write eval.json + grid.png."""
    from .demo import grid
    from .toy import load_toy_pipeline, sample_images, toy_model_path

    if samples < 1:
        raise ValueError(f"--samples must be positive, got {samples}")
    if not Path(lora).exists():
        raise ValueError(f"--lora {lora}: no such file")
    judge = make_scorer(scorer, attribute, scorer_model, alternatives)
    base_prompts = read_prompts(prompts, attribute)
    prompt_list = [base_prompts[i % len(base_prompts)] for i in range(samples)]
    seeds = [seed + i for i in range(samples)]
    if model != "toy":
        from .models.loading import check_model_source

        check_model_source(model, "--model")
    pipe = load_toy_pipeline(toy_model_path() if model == "toy" else model)
    base = sample_images(pipe, prompt_list, seeds, steps=steps)
    tuned = sample_images(pipe, prompt_list, seeds, steps=steps, lora=str(lora))
    report = {"lora": str(lora), "model": model, "scorer": scorer, "scorer_model": scorer_model,
              "attribute": attribute, "samples": samples, "seed": seed, "steps": steps,
              **score_pairs(judge, base, tuned, prompt_list), "prompts": prompt_list, "seeds": seeds}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        report["files"] = [str(out / "eval.json"), str(out / "grid.png")]
        shown = min(12, samples)
        with atomic_path(out / "grid.png") as tmp:
            grid([base[:shown], tuned[:shown]]).save(tmp, format="PNG")
        write_text(out / "eval.json", json.dumps(report, indent=2))
    return report


def summary(report: dict) -> str:
    w = report["win_rate"]
    lines = [f"{report['scorer']} scorer, {report['samples']} (prompt, seed) pairs, LoRA {report['lora']}",
             f"win rate (LoRA scores higher): {w['rate']:.1%} [{w['low']:.1%}, {w['high']:.1%}] "
             f"({_count(w['wins'], 'win')}, {_count(w['ties'], 'tie')}, {_count(w['losses'], 'loss', 'losses')})"]
    if "before" in report:
        b, a = report["before"], report["after"]
        what = "in style" if report["scorer"] == "style" else "attribute rate"
        lines.append(f"'{report['attribute']}' {what}: base {b['rate']:.1%} [{b['low']:.1%}, {b['high']:.1%}] -> "
                     f"LoRA {a['rate']:.1%} [{a['low']:.1%}, {a['high']:.1%}]")
    else:
        lines.append(f"mean score: base {report['mean_base']:.3f} -> LoRA {report['mean_lora']:.3f}")
    if report.get("files"):
        lines.append(f"wrote {' and '.join(report['files'])}")
    return "\n".join(lines)


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"
