"""The drag-and-drop workflow example_workflows/"Generate, score, pair and train.json", built from the node definitions.

    python tests/nodes/score_workflow.py      # rewrite it after a node's inputs change

Generate a batch, score it (Load Preference Scorer + Score Images for Preference), turn the scores into pairs (Preference Pairs from Scores, kept in
the store `scored_pairs` too), train a preference LoRA on them and sample with it. A Gallery Picker on the
scored images offers auto-mark and the comparison mode for the artist to add or correct pairs.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = "Generate, score, pair and train.json"
FOLDER = "example_workflows"  # the folder ComfyUI's template browser serves for a pack


def _tools():
    if "prefalign_workflow_tools" in sys.modules:
        return sys.modules["prefalign_workflow_tools"]
    spec = importlib.util.spec_from_file_location("prefalign_workflow_tools", HERE / "workflow_tools.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def build(info: dict) -> dict:
    wt = _tools()
    g = wt.Graph(info)
    ckpt = g.add("CheckpointLoaderSimple", (40, 60), {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, size=[320, 100])
    text = g.add("PrimitiveStringMultiline", (40, 220), {"value": wt.PROMPT}, title="Prompt", size=[320, 120])
    pos = g.add("CLIPTextEncode", (400, 60), {}, {"clip": (ckpt, 1), "text": (text, 0)}, title="Positive")
    neg = g.add("CLIPTextEncode", (400, 260), {"text": wt.NEGATIVE}, {"clip": (ckpt, 1)}, title="Negative")
    lat = g.add("EmptyLatentImage", (400, 460), {"width": 512, "height": 512, "batch_size": 8})
    ks = g.add("KSampler", (760, 60), {"seed": 1, "steps": 25, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                                       "denoise": 1.0},
               {"model": (ckpt, 0), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat, 0)}, size=[320, 270])
    dec = g.add("VAEDecode", (1120, 60), {}, {"samples": (ks, 0), "vae": (ckpt, 2)}, size=[200, 50])
    judge = g.add("PrefAlignLoadScorer", (760, 380), {"kind": "clip", "clip_model": "(none)", "aesthetic_head": "(none)"},
                  title="Load Preference Scorer (pick your PickScore / CLIP)",
                  size=[360, 200])
    score = g.add("PrefAlignScoreImages", (1120, 160), {}, {"images": (dec, 0), "prompt": (text, 0), "scorer": (judge, 0)},
                  size=[420, 600])
    pairs = g.add("PrefAlignPairsFromScores", (1580, 60), {"policy": "all-pairs", "margin": 0.5, "store": "scored_pairs"},
                  {"images": (score, 0), "scores": (score, 1)}, size=[340, 200])
    g.add("PrefAlignGalleryPicker", (1120, 820), {"store": "scored_pairs"}, {"images": (score, 0), "prompt": (text, 0)},
          title="Review: auto-mark, compare, or mark by hand", size=[520, 560])
    tr = g.add("PrefAlignTrainLoRA", (1960, 60), {"steps": 100, "lora_name": "scored_pairs"},
               {"model": (ckpt, 0), "clip": (ckpt, 1), "vae": (ckpt, 2), "pairs": (pairs, 0)}, size=[400, 700])
    lat1 = g.add("EmptyLatentImage", (1960, 820), {"width": 512, "height": 512, "batch_size": 1})
    ks2 = g.add("KSampler", (2400, 60), {"seed": 2, "steps": 25, "cfg": 7.0, "sampler_name": "euler",
                                         "scheduler": "normal", "denoise": 1.0},
                {"model": (tr, 0), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat1, 0)},
                title="Sample with the new LoRA", size=[320, 270])
    dec2 = g.add("VAEDecode", (2760, 60), {}, {"samples": (ks2, 0), "vae": (ckpt, 2)}, size=[200, 50])
    g.add("PreviewImage", (2760, 160), {}, {"images": (dec2, 0)}, title="With the LoRA", size=[320, 320])
    return g.ui("Generate -> score -> pairs -> train: AI-feedback pairs from a scorer, reviewed in the gallery")


if __name__ == "__main__":
    wt = _tools()
    root = HERE.parents[1]
    spec = importlib.util.spec_from_file_location("prefalign_pack", root / "__init__.py", submodule_search_locations=[str(root)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["prefalign_pack"] = pack
    spec.loader.exec_module(pack)
    info = wt.object_info(pack)
    ui = build(info)
    problems = [p for p in wt.validate(ui, info) if "is not one of the choices" not in p]
    assert not problems, problems
    (root / FOLDER / NAME).write_text(json.dumps(ui, indent=1) + "\n")
    print("wrote", NAME)
