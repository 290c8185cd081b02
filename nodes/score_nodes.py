"""Nodes over trainer/scorers: load a judge, score a batch, turn scores into pairs.

Scorer weights load only from ComfyUI's `models/prefalign_scorers/` (or $PREFALIGN_SCORER_DIR): a CLIP model
folder (PickScore, plain CLIP) or an aesthetic head `.safetensors` file; a name that resolves outside that
folder (after following symlinks) is refused. Score Images for Preference remembers the scores of every batch it scored
(by the images' content hashes, in memory), so the Gallery Picker's auto-mark can find the scores of a batch
it shows when a Score Images for Preference node sits between the images and the picker.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..trainer.data.images import png_bytes
from . import comfy_env, paths
from .images import tensor_to_pils, tensor_to_pngs
from .store_nodes import PAIRS, PreferencePairs, open_store

CATEGORY = "preference/score"
SCORER = "PREFALIGN_SCORER"
SCORES = "PREFALIGN_SCORES"
KINDS = ("clip", "aesthetic", "toy attribute")
NONE = "(none)"


def scorer_root() -> Path:
    env = os.environ.get("PREFALIGN_SCORER_DIR")
    if env:
        return Path(env)
    models = getattr(comfy_env.folder_paths(), "models_dir", None)
    if models is None:
        raise ValueError("ComfyUI's models folder is unknown here; set PREFALIGN_SCORER_DIR")
    return Path(models) / "prefalign_scorers"


def _listable_root() -> Path | None:
    try:
        root = scorer_root()
    except (ImportError, ValueError):  # outside ComfyUI: nothing to list
        return None
    return root if root.is_dir() else None


def clip_models() -> list[str]:
    """CLIP model folders (a config.json inside) under the scorer folder, as relative names."""
    root = _listable_root()
    if root is None:
        return []
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob("config.json") if p.parent != root)


def head_files() -> list[str]:
    root = _listable_root()
    if root is None:
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.safetensors")
                  if not (p.parent / "config.json").exists())  # weights inside a CLIP folder are not heads


def confined(name: str, what: str) -> Path:
    """The path of `name` inside the scorer folder; anything that escapes it is refused by name only."""
    root = scorer_root().resolve()
    path = (root / name).resolve()
    if not name or name == NONE or not path.is_relative_to(root) or path == root or not path.exists():
        raise ValueError(f"{what} {name!r} is not in models/prefalign_scorers; put it there and pick it from the list")
    return path


@dataclass
class ScoredBatch:
    """What Score Images for Preference outputs (PREFALIGN_SCORES): the judgement of one batch under one prompt."""

    prompt: str
    scorer: str
    judgement: object  # trainer.scorers.Judgement
    shas: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.shas)


class ScoreRegistry:
    """Judgements of recent batches by their images' content hashes (bounded; in memory)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity, self.items, self.lock = capacity, OrderedDict(), threading.Lock()

    def add(self, scored: ScoredBatch) -> None:
        with self.lock:
            self.items[scored.shas] = scored
            self.items.move_to_end(scored.shas)
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)

    def find(self, shas: tuple[str, ...]) -> ScoredBatch | None:
        with self.lock:
            return self.items.get(tuple(shas))


REGISTRY = ScoreRegistry()


class LoadScorer:
    DESCRIPTION = ("Load a judge for generated images: a CLIP preference model (PickScore-style: logit_scale x "
                   "cos(prompt, image)), a LAION-style aesthetic head on a CLIP, or the toy world's attribute "
                   "classifier. Weights come from models/prefalign_scorers/. Chain loaders through ensemble_with "
                   "to let several judges vote.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (SCORER,)
    RETURN_NAMES = ("scorer",)
    OUTPUT_TOOLTIPS = ("The judge, for Score Images for Preference.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "kind": (list(KINDS), {"tooltip": "clip: PickScore-style preference; aesthetic: a head on CLIP image "
                                              "embeddings; toy attribute: the toy world's exact classifier."}),
            "clip_model": ([NONE, *clip_models()], {"tooltip": "A CLIP model folder in models/prefalign_scorers/ "
                                                               "(e.g. PickScore_v1 or clip-vit-large-patch14)."}),
            "aesthetic_head": ([NONE, *head_files()], {"tooltip": "An aesthetic head .safetensors in "
                                                                  "models/prefalign_scorers/ (aesthetic only)."}),
            "attribute": ("STRING", {"default": "shaded", "tooltip": "The attribute the toy classifier looks for "
                                                                     "(toy attribute only)."}),
        }, "optional": {
            "ensemble_with": (SCORER, {"tooltip": "Another judge: both vote, and a pair is kept only when they agree."}),
            "vote": (["mean-rank", "majority"], {"default": "mean-rank", "tooltip": "How an ensemble decides: "
                     "mean-rank (every judge must agree) or majority."}),
        }}

    def load(self, kind, clip_model, aesthetic_head, attribute, ensemble_with=None, vote="mean-rank"):
        from ..trainer.scorers import AestheticScorer, AttributeScorer, ClipModel, ClipScorer, Ensemble

        def clip() -> ClipModel:  # named by its folder inside models/prefalign_scorers, not the server's path
            return ClipModel(str(confined(clip_model, "clip_model")), label=clip_model, option="clip_model")

        if kind == "clip":
            scorer = ClipScorer(clip())
        elif kind == "aesthetic":
            scorer = AestheticScorer(confined(aesthetic_head, "aesthetic_head"), clip())
        elif kind == "toy attribute":
            scorer = AttributeScorer(attribute.strip())
        else:
            raise ValueError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
        if ensemble_with is None:
            return (scorer,)
        members = ensemble_with.members if isinstance(ensemble_with, Ensemble) else [ensemble_with]
        return (Ensemble([*members, scorer], vote),)


def preview_files(pngs: list[bytes]) -> list[dict]:
    """The images as ComfyUI temp previews (what PreviewImage returns), named by content."""
    from ..trainer.atomic import write_bytes

    folder = comfy_env.temp_dir()
    out = []
    for data in pngs:
        name = f"prefalign_score_{hashlib.sha256(data).hexdigest()[:20]}.png"
        if not (folder / name).is_file():
            write_bytes(folder / name, data)
        out.append({"filename": name, "subfolder": "", "type": "temp"})
    return out


class ScoreImages:
    DESCRIPTION = ("Score every image of a batch against the prompt with a judge from Load Preference Scorer; each "
                   "image's score and rank are shown on the node with its previews. Put it between the images and a "
                   "Gallery Picker to enable auto-mark there.")
    CATEGORY = CATEGORY
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", SCORES, "STRING")
    RETURN_NAMES = ("images", "scores", "text")
    OUTPUT_TOOLTIPS = ("The same images, unchanged (connect the Gallery Picker here).",
                       "The judgement, for Preference Pairs from Scores.", "The scores as text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The batch to judge."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt the batch was made from."}),
            "scorer": (SCORER, {"tooltip": "A judge from Load Preference Scorer."}),
        }}

    def score(self, images, prompt, scorer):
        pils = tensor_to_pils(images)
        pngs = [png_bytes(im) for im in pils]
        judgement = scorer.judge(pils, [prompt] * len(pngs))
        scored = ScoredBatch(prompt, scorer.name, judgement, tuple(hashlib.sha256(p).hexdigest() for p in pngs))
        REGISTRY.add(scored)
        text = score_text(scored)
        return {"ui": {"images": preview_files(pngs), "prefalign_text": text.splitlines()},
                "result": (images, scored, text)}


def score_text(scored: ScoredBatch) -> str:
    s = scored.judgement.combined
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    rank = {i: r + 1 for r, i in enumerate(order)}
    lines = [f"{scored.scorer}:"]
    lines += [f"image {i + 1}: {s[i]:.4g} (#{rank[i]})" for i in range(len(s))]
    return "\n".join(lines)


class PairsFromScores:
    DESCRIPTION = ("Turn a scored batch into preference pairs: best vs worst, or every pair whose scores differ by "
                   "the margin (an ensemble: only pairs its judges agree on). Outputs PREFERENCE_PAIRS for the Train "
                   "node and, when a store is named, adds the pairs to that store too.")
    CATEGORY = CATEGORY
    FUNCTION = "pairs"
    OUTPUT_NODE = True
    RETURN_TYPES = (PAIRS, "INT")
    RETURN_NAMES = ("pairs", "count")
    OUTPUT_TOOLTIPS = ("The kept pairs, chosen image first.", "How many pairs were kept.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The batch Score Images for Preference judged (its images output)."}),
            "scores": (SCORES, {"tooltip": "The judgement from Score Images for Preference."}),
            "policy": (["best-worst", "all-pairs"], {"tooltip": "best-worst: one pair, the best image against the "
                                                                "worst; all-pairs: every pair above the margin."}),
            "margin": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                 "tooltip": "Keep a pair only when the scores differ by at least this "
                                            "(an ensemble: in mean normalised rank, 0..1)."}),
            "store": ("STRING", {"default": "", "tooltip": "Also add the pairs to this pair store (empty: don't)."}),
        }}

    def pairs(self, images, scores, policy, margin, store):
        from ..trainer.data.records import PreferenceExample
        from ..trainer.pairs import select_pairs

        pngs = tensor_to_pngs(images)
        if tuple(hashlib.sha256(p).hexdigest() for p in pngs) != scores.shas:
            raise ValueError(f"images: these {len(pngs)} images are not the {len(scores)} that Score Images for Preference judged; "
                             "connect its images output")
        chosen = select_pairs(scores.judgement, policy, margin)
        examples = [PreferenceExample(scores.prompt, (pngs[a], pngs[b]), (1.0, 0.0),
                                      f"{scores.scorer}: image {a + 1} over image {b + 1}") for a, b in chosen]
        text = [f"{len(examples)} pair(s) kept ({policy}, margin {margin:g}) by {scores.scorer}"]
        if store.strip():
            s = open_store(store)
            with paths.shown_errors():
                if chosen:  # no write for none: a store named here is not created empty
                    s.add_pairs([(scores.prompt, pngs[a], pngs[b]) for a, b in chosen], source=f"scorer {scores.scorer}")
                text.append(f"store {s.name!r} holds {s.count()} pairs")
        return {"ui": {"prefalign_text": text},
                "result": (PreferencePairs(examples, f"scores:{scores.scorer}"), len(examples))}


NODES = {
    "PrefAlignLoadScorer": (LoadScorer, "Load Preference Scorer"),
    "PrefAlignScoreImages": (ScoreImages, "Score Images for Preference"),
    "PrefAlignPairsFromScores": (PairsFromScores, "Preference Pairs from Scores"),
}
