"""Scorers: judge generated images without a person (AI feedback), for pairs and for evaluation.

A scorer is named on the command line as ``KIND[:ARGUMENT]``:

| spec | scorer |
|---|---|
| ``clip:MODEL`` | PickScore-style preference, logit_scale * cos(text, image), any CLIP folder or hub id (``yuvalkirstain/PickScore_v1``, ``openai/clip-vit-large-patch14``) |
| ``aesthetic:HEAD.safetensors,CLIP`` | LAION-style aesthetic head on CLIP image embeddings (head as safetensors; see `aesthetic`) |
| ``attribute:VALUE`` | the toy world's exact classifier: 1 when the image has the attribute (``shaded``, ``red``, ...) |
| ``style[:VALUE]`` | 1 when CLIP zero-shot puts the image in the style (Diffusion-RPO's metric); the toy classifier without a CLIP |

Several specs make an `Ensemble` (mean rank or majority vote). Without an argument, ``clip`` and
``aesthetic`` use the default CLIP model and ``attribute`` / ``style`` the default attribute the caller passes.
"""
from __future__ import annotations

from typing import Sequence

from .aesthetic import AestheticScorer
from .attribute import AttributeScorer
from .base import Judgement, Scorer, pixels
from .clip import ClipModel, ClipScorer, StyleJudge
from .ensemble import VOTES, Ensemble

KINDS = ("clip", "aesthetic", "attribute", "style")

__all__ = ["KINDS", "VOTES", "AestheticScorer", "AttributeScorer", "ClipModel", "ClipScorer", "Ensemble", "Judgement",
           "Scorer", "StyleJudge", "check_spec", "make_scorer", "make_scorers", "pixels"]


def check_spec(spec: str) -> tuple[str, str | None]:
    """(kind, argument) of a spec, or a ValueError naming the spec and the kinds."""
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"--scorer {spec!r}: unknown kind {kind!r}; use one of {', '.join(k + '[:...]' for k in KINDS)}")
    return kind, arg or None


def make_scorers(specs: Sequence[str], attribute: str | None = None, clip_model: str | None = None,
                 alternatives: Sequence[str] = (), clips: dict[str, ClipModel] | None = None) -> list[Scorer]:
    """One scorer per spec; a CLIP model named by several specs is loaded once, and so is one named in several
    calls that share `clips` (location -> loaded model, filled here)."""
    clips = {} if clips is None else clips

    def clip(location: str | None, spec: str) -> ClipModel:
        if not location:
            raise ValueError(f"--scorer {spec!r} needs a CLIP model: write {spec.split(':')[0]}:MODEL "
                             "(a CLIP folder or hub id) or give --scorer-model")
        if location not in clips:
            clips[location] = ClipModel(location, option="--scorer-model" if location == clip_model else f"--scorer {spec}")
        return clips[location]

    out: list[Scorer] = []
    for spec in specs:
        kind, arg = check_spec(spec)
        if kind == "clip":
            out.append(ClipScorer(clip(arg or clip_model, spec)))
        elif kind == "aesthetic":
            head, _, model = (arg or "").partition(",")
            if not head:
                raise ValueError(f"--scorer {spec!r}: write aesthetic:HEAD.safetensors,CLIP_MODEL")
            out.append(AestheticScorer(head, clip(model or clip_model, spec)))
        else:
            value = arg or attribute
            if not value:
                raise ValueError(f"--scorer {spec!r}: name the attribute, e.g. {kind}:shaded")
            if kind == "attribute" or not clip_model:
                out.append(AttributeScorer(value))
            else:
                from ..toy import ATTRIBUTES, attribute_kind

                others = alternatives or [v for v in ATTRIBUTES[attribute_kind(value)] if v != value]
                out.append(StyleJudge(value, clip(clip_model, spec), others))
    return out


def make_scorer(specs: str | Sequence[str], vote: str = "mean-rank", **defaults) -> Scorer:
    """The judge for pairing: one scorer, or an `Ensemble` of several voting with `vote`."""
    scorers = make_scorers([specs] if isinstance(specs, str) else specs, **defaults)
    if not scorers:
        raise ValueError("no scorer given")
    return scorers[0] if len(scorers) == 1 else Ensemble(scorers, vote)
