"""Build, check and convert ComfyUI workflows without ComfyUI.

- `object_info()`: node definitions in /object_info shape: the pack's nodes from their INPUT_TYPES, stock
  nodes from `stock_object_info.json` (a snapshot of a real ComfyUI's /object_info for the few stock nodes
  the workflows use; the integration test checks the workflows against the live server instead).
- `Graph`: a tiny builder for UI-format (LiteGraph, version 0.4) workflows; `python workflow_tools.py`
  rewrites example_workflows/*.json.
- `validate(ui, info)`: every node type exists, links join matching types, every required input is
  linked or has a widget value, widget values fit their specs.
- `to_api(ui, info)`: the API-format prompt the frontend would queue for a UI workflow.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# ComfyUI serves a pack's templates from the first of example_workflows/, example/, examples/, workflow/, workflows/
# that exists; this repository's examples/ (accelerate configs) would shadow a later name
WORKFLOW_DIR = ROOT / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE = "MarkdownNote"  # the frontend's own note node: not in /object_info, never queued
VIRTUAL = {NOTE, "Note"}
MUTED = 2  # a node's `mode` when muted (Ctrl+M): kept in the graph, left out of the queued prompt


def pack_object_info(mappings: dict, display: dict) -> dict:
    info = {}
    for key, cls in mappings.items():
        inputs = cls.INPUT_TYPES()
        info[key] = {
            "input": {s: {n: list(v) for n, v in inputs.get(s, {}).items()} for s in ("required", "optional")},
            "input_order": {s: list(inputs.get(s, {})) for s in ("required", "optional")},
            "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)), "category": cls.CATEGORY,
            "display_name": display.get(key, key),
        }
    return info


def object_info(pack=None) -> dict:
    info = json.loads((HERE / "stock_object_info.json").read_text())
    if pack is not None:
        info.update(pack_object_info(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS))
    return info


def _kind(spec) -> str:
    t = spec[0]
    return "COMBO" if isinstance(t, list) or t == "COMBO" else t


def is_widget(spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return _kind(spec) in WIDGET_TYPES and not opts.get("forceInput")


def has_control(name: str, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    c = opts.get("control_after_generate")
    return bool(c) if c is not None else (_kind(spec) == "INT" and name in ("seed", "noise_seed"))


def ordered_inputs(defn: dict) -> list[tuple[str, list, bool]]:
    out = []
    for section in ("required", "optional"):
        specs = defn["input"].get(section, {})
        order = (defn.get("input_order") or {}).get(section) or list(specs)
        out += [(n, specs[n], section == "required") for n in order if n in specs]
    return out


def widget_names(defn: dict) -> list[str]:
    """The widget values' slots in order, `*control*` standing for a control_after_generate combo."""
    names = []
    for name, spec, _ in ordered_inputs(defn):
        if is_widget(spec):
            names.append(name)
            if has_control(name, spec):
                names.append(f"{name}*control*")
    return names


class Graph:
    """Builds a UI-format workflow. `add(type, widgets={...}, links={input: (node, output_index)})`."""

    def __init__(self, info: dict) -> None:
        self.info, self.nodes, self.links = info, [], []

    def add(self, type_: str, pos, widgets: dict | None = None, links: dict | None = None, title: str | None = None,
            size=None, control: str = "fixed") -> int:
        """`control`: what the frontend does to a seed after each run (fixed, increment, decrement, randomize)."""
        defn = self.info[type_]
        widgets, links = dict(widgets or {}), dict(links or {})
        node_id = len(self.nodes) + 1
        inputs, values = [], []
        for name, spec, _ in ordered_inputs(defn):
            if is_widget(spec):
                if name in links:  # a widget driven by a link: socket with its widget name
                    inputs.append({"name": name, "type": _kind(spec) if _kind(spec) != "COMBO" else "COMBO",
                                   "widget": {"name": name}, "link": self._link(links.pop(name), node_id, len(inputs), _kind(spec))})
                    default = spec[1].get("default", "") if len(spec) > 1 else ""
                    values.append(widgets.pop(name, default))
                else:
                    if name not in widgets:
                        opts = spec[1] if len(spec) > 1 else {}
                        if "default" in opts:
                            widgets[name] = opts["default"]
                        elif isinstance(spec[0], list) and spec[0]:  # a combo without a default: the frontend's first
                            widgets[name] = spec[0][0]
                        else:
                            raise ValueError(f"{type_}.{name} needs a value")
                    values.append(widgets.pop(name))
                if has_control(name, spec):
                    values.append(control)
            else:
                link = self._link(links.pop(name), node_id, len(inputs), spec[0]) if name in links else None
                inputs.append({"name": name, "type": spec[0], "link": link})
        if widgets or links:
            raise ValueError(f"{type_}: unknown inputs {sorted(widgets) + sorted(links)}")
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(defn["output_name"], defn["output"]))]
        node = {"id": node_id, "type": type_, "pos": list(pos), "size": list(size or [320, 160]), "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": type_}, "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        for link in self.links:
            if link[3] == node_id:
                self.nodes[link[1] - 1]["outputs"][link[2]]["links"].append(link[0])
        return node_id

    def note(self, pos, text: str, size=(420, 300)) -> int:
        """A Markdown note on the canvas (the frontend's MarkdownNote: text only, nothing runs)."""
        node_id = len(self.nodes) + 1
        self.nodes.append({"id": node_id, "type": NOTE, "pos": list(pos), "size": list(size), "flags": {},
                           "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                           "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        return node_id

    def mute(self, *node_ids: int) -> None:
        """Start these nodes muted: the user unmutes them (Ctrl+M) when it is their turn."""
        for node_id in node_ids:
            self.nodes[node_id - 1]["mode"] = MUTED

    def _link(self, src, dst: int, dst_slot: int, type_) -> int:
        src_node, src_slot = src
        link_id = len(self.links) + 1
        out_type = self.info[self.nodes[src_node - 1]["type"]]["output"][src_slot]
        self.links.append([link_id, src_node, src_slot, dst, dst_slot, out_type])
        return link_id

    def ui(self, title: str) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"prefalign": {"title": title}, "ds": {"scale": 0.8, "offset": [0, 0]}},
                "version": 0.4}


def validate(ui: dict, info: dict) -> list[str]:
    """Problems a user would hit on drag-and-drop or on queueing; empty when the workflow is fine."""
    problems = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {l[0]: l for l in ui["links"]}
    for n in ui["nodes"]:
        t = n["type"]
        if t in VIRTUAL:
            continue
        if t not in info:
            problems.append(f"node {n['id']}: missing node type {t}")
            continue
        defn = info[t]
        slots = widget_names(defn)
        values = n.get("widgets_values", [])
        if len(values) != len(slots):
            problems.append(f"node {n['id']} {t}: {len(values)} widget values for {len(slots)} widgets {slots}")
            continue
        specs = {name: spec for name, spec, _ in ordered_inputs(defn)}
        for slot, value in zip(slots, values):
            if slot.endswith("*control*"):
                if value not in ("fixed", "increment", "decrement", "randomize"):
                    problems.append(f"node {n['id']} {t}: bad control value {value!r}")
                continue
            spec = specs[slot]
            kind, opts = _kind(spec), (spec[1] if len(spec) > 1 else {})
            if kind == "COMBO" and isinstance(spec[0], list) and spec[0] and value not in spec[0]:
                problems.append(f"node {n['id']} {t}.{slot}: {value!r} is not one of the choices")
            if kind in ("INT", "FLOAT") and not (isinstance(value, (int, float)) and opts.get("min", value) <= value <= opts.get("max", value)):
                problems.append(f"node {n['id']} {t}.{slot}: {value!r} out of range")
            if kind == "INT" and isinstance(value, float):
                problems.append(f"node {n['id']} {t}.{slot}: {value!r} is not an integer")
            if kind == "STRING" and not isinstance(value, str):
                problems.append(f"node {n['id']} {t}.{slot}: not a string")
            if kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"node {n['id']} {t}.{slot}: not a boolean")
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for name, spec, required in ordered_inputs(defn):
            if required and not is_widget(spec) and name not in linked:
                problems.append(f"node {n['id']} {t}: required input {name} is not connected")
        for i, inp in enumerate(n.get("inputs", [])):
            if inp.get("link") is None:
                continue
            link = links.get(inp["link"])
            if link is None or link[3] != n["id"] or link[4] != i:
                problems.append(f"node {n['id']} {t}: input {inp['name']} has a dangling link {inp['link']}")
                continue
            src = nodes.get(link[1])
            if src is None:
                problems.append(f"link {link[0]}: missing source node {link[1]}")
                continue
            out_type = info.get(src["type"], {}).get("output", [None] * 99)[link[2]]
            want = specs[inp["name"]][0] if inp["name"] in specs else None
            want = "COMBO" if isinstance(want, list) else want
            if out_type != want and want != "*":
                problems.append(f"link {link[0]}: {src['type']} gives {out_type}, {t}.{inp['name']} takes {want}")
    return problems


def to_api(ui: dict, info: dict) -> dict:
    """The API-format prompt for a UI workflow (what the frontend posts to /prompt)."""
    links = {l[0]: l for l in ui["links"]}
    prompt = {}
    for n in ui["nodes"]:
        if n.get("mode", 0) != 0 or n["type"] in VIRTUAL:
            continue
        defn = info[n["type"]]
        inputs = {}
        for slot, value in zip(widget_names(defn), n.get("widgets_values", [])):
            if not slot.endswith("*control*"):
                inputs[slot] = value
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": n.get("title", n["type"])}}
    return prompt


# --------------------------------------------------------------------------------------------- the workflows
PROMPT = "a watercolor fox in a snowy forest, soft light"
NEGATIVE = "blurry, low quality"
SD15_SAMPLER = {"seed": 1, "steps": 25, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}


def sd15_batch(g: Graph, batch_size: int, control: str) -> tuple[int, int, int, int, int]:
    """An SD1.5 checkpoint generating `batch_size` images of the prompt (a Prompt node feeds the Positive encoder);
    `control`: the sampler's seed after each run. Node ids (ckpt, prompt, positive, negative, decoded images)."""
    ckpt = g.add("CheckpointLoaderSimple", (40, 60), {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, size=[320, 100])
    text = g.add("PrimitiveStringMultiline", (40, 220), {"value": PROMPT}, title="Prompt", size=[320, 120])
    pos = g.add("CLIPTextEncode", (400, 60), {}, {"clip": (ckpt, 1), "text": (text, 0)}, title="Positive")
    neg = g.add("CLIPTextEncode", (400, 260), {"text": NEGATIVE}, {"clip": (ckpt, 1)}, title="Negative")
    lat = g.add("EmptyLatentImage", (400, 460), {"width": 512, "height": 512, "batch_size": batch_size})
    ks = g.add("KSampler", (760, 60), SD15_SAMPLER,
               {"model": (ckpt, 0), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat, 0)}, size=[320, 270],
               control=control)
    dec = g.add("VAEDecode", (1120, 60), {}, {"samples": (ks, 0), "vae": (ckpt, 2)}, size=[200, 50])
    return ckpt, text, pos, neg, dec


def curate(info: dict) -> dict:
    g = Graph(info)
    # randomize: each run (Run again) generates a new batch instead of returning the cached one
    _, text, _, _, dec = sd15_batch(g, 4, control="randomize")
    g.add("PrefAlignGalleryPicker", (1120, 160), {"store": "my_pairs"}, {"images": (dec, 0), "prompt": (text, 0)}, size=[520, 560])
    return g.ui("Curate: generate a batch, pick chosen and rejected images")


def train(info: dict) -> dict:
    g = Graph(info)
    ckpt = g.add("CheckpointLoaderSimple", (40, 60), {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, size=[320, 100])
    store = g.add("PrefAlignLoadStore", (40, 220), {"store": "my_pairs"}, size=[320, 80])
    tr = g.add("PrefAlignTrainLoRA", (400, 60), {
        "method": "dpo", "method_args": "beta = 5000.0\nloss_type = \"sigmoid\"\nspace = \"latent\"", "steps": 200,
        "learning_rate": "1e-4", "rank": 8, "alpha": 8.0, "batch_size": 1, "gradient_accumulation_steps": 4,
        "resolution": 512, "training_seed": 0, "checkpoint_every": 50, "target_modules": "to_q, to_k, to_v, to_out.0",
        "lora_name": "my_pairs"}, {"model": (ckpt, 0), "clip": (ckpt, 1), "vae": (ckpt, 2), "pairs": (store, 0)}, size=[400, 780])
    # the Train node itself saves the file, with its metadata, into models/loras/prefalign/: no Save LoRA node
    g.add("PreviewImage", (860, 60), {}, {"images": (tr, 2)}, title="Loss curve", size=[360, 380])
    pos = g.add("CLIPTextEncode", (860, 480), {"text": PROMPT}, {"clip": (ckpt, 1)}, title="Positive")
    neg = g.add("CLIPTextEncode", (860, 680), {"text": NEGATIVE}, {"clip": (ckpt, 1)}, title="Negative")
    lat = g.add("EmptyLatentImage", (860, 880), {"width": 512, "height": 512, "batch_size": 1})
    ks = g.add("KSampler", (1240, 480), SD15_SAMPLER,
               {"model": (tr, 0), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat, 0)}, size=[320, 270])
    dec = g.add("VAEDecode", (1600, 480), {}, {"samples": (ks, 0), "vae": (ckpt, 2)}, size=[200, 50])
    g.add("PreviewImage", (1600, 580), {}, {"images": (dec, 0)}, title="Sample with the new LoRA", size=[320, 320])
    return g.ui("Train: pair store -> Train Preference LoRA -> saved LoRA")


def compare(info: dict) -> dict:
    g = Graph(info)
    ckpt = g.add("CheckpointLoaderSimple", (40, 60), {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, size=[320, 100])
    lora = g.add("PrefAlignLoadLoRA", (40, 220), {"lora_name": "prefalign/your_lora.safetensors", "strength_model": 1.0, "strength_clip": 1.0},
                 {"model": (ckpt, 0), "clip": (ckpt, 1)}, size=[360, 200])
    pos_base = g.add("CLIPTextEncode", (440, 60), {"text": PROMPT}, {"clip": (ckpt, 1)}, title="Positive (base)")
    neg_base = g.add("CLIPTextEncode", (440, 260), {"text": NEGATIVE}, {"clip": (ckpt, 1)}, title="Negative (base)")
    pos_lora = g.add("CLIPTextEncode", (440, 460), {"text": PROMPT}, {"clip": (lora, 1)}, title="Positive (LoRA)")
    neg_lora = g.add("CLIPTextEncode", (440, 660), {"text": NEGATIVE}, {"clip": (lora, 1)}, title="Negative (LoRA)")
    lat = g.add("EmptyLatentImage", (440, 860), {"width": 512, "height": 512, "batch_size": 2})
    sampler = {**SD15_SAMPLER, "seed": 42}
    base = g.add("KSampler", (800, 60), sampler, {"model": (ckpt, 0), "positive": (pos_base, 0), "negative": (neg_base, 0), "latent_image": (lat, 0)}, title="Without LoRA", size=[320, 270])
    tuned = g.add("KSampler", (800, 400), sampler, {"model": (lora, 0), "positive": (pos_lora, 0), "negative": (neg_lora, 0), "latent_image": (lat, 0)}, title="With LoRA (same seed)", size=[320, 270])
    dec_a = g.add("VAEDecode", (1160, 60), {}, {"samples": (base, 0), "vae": (ckpt, 2)}, size=[200, 50])
    dec_b = g.add("VAEDecode", (1160, 400), {}, {"samples": (tuned, 0), "vae": (ckpt, 2)}, size=[200, 50])
    st = g.add("ImageStitch", (1400, 60), {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
               {"image1": (dec_a, 0), "image2": (dec_b, 0)}, size=[300, 160])
    g.add("SaveImage", (1400, 260), {"filename_prefix": "prefalign_compare"}, {"images": (st, 0)}, title="Left: base, right: LoRA", size=[520, 420])
    return g.ui("Compare: same seeds with and without the preference LoRA, side by side")


# file names are the titles ComfyUI's template browser shows; `<name>.jpg` beside each is its thumbnail
def generate_score_train(info: dict) -> dict:
    """Generate a batch, score it, turn the scores into pairs (kept in the store `scored_pairs` too), train a
    preference LoRA on them and sample with it; a Gallery Picker on the scored images offers auto-mark and the
    comparison mode for the artist to add or correct pairs."""
    g = Graph(info)
    ckpt, text, pos, neg, dec = sd15_batch(g, 8, control="fixed")
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
               {"model": (ckpt, 0), "clip": (ckpt, 1), "vae": (ckpt, 2), "pairs": (pairs, 0)}, size=[400, 780])
    lat1 = g.add("EmptyLatentImage", (1960, 900), {"width": 512, "height": 512, "batch_size": 1})
    ks2 = g.add("KSampler", (2400, 60), {**SD15_SAMPLER, "seed": 2},
                {"model": (tr, 0), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat1, 0)},
                title="Sample with the new LoRA", size=[320, 270])
    dec2 = g.add("VAEDecode", (2760, 60), {}, {"samples": (ks2, 0), "vae": (ckpt, 2)}, size=[200, 50])
    g.add("PreviewImage", (2760, 160), {}, {"images": (dec2, 0)}, title="With the LoRA", size=[320, 320])
    return g.ui("Generate -> score -> pairs -> train: AI-feedback pairs from a scorer, reviewed in the gallery")


FLUX_FILES = """## Flux.1: which file goes where
- `models/diffusion_models/`: `flux1-dev.safetensors` (or `flux1-schnell`; an fp8 file works too). **Load Diffusion
  Model**'s `weight_dtype` **fp8_e4m3fn** halves the weights' memory (Flux's 11.9B parameters: 12 GB instead of
  24 GB); the LoRA still trains in float32.
- `models/text_encoders/`: `clip_l.safetensors` and `t5xxl_fp8_e4m3fn.safetensors` (or `t5xxl_fp16`), type *flux*.
- `models/vae/`: `ae.safetensors`.

Memory to train at 1024 px, one pair, rank 16, gradient_checkpointing on: about 18 GB with fp8 weights (a 24 GB
GPU), 30 GB in bf16; the Train node says so when the GPU is too small. docs/memory.md has the table."""

FLUX_STEPS = """## Curate, then train
1. **Queue**: 4 images per run (the seed randomizes: Run again for more). Click = chosen, right-click = rejected in
   the **Preference Gallery Picker**; marks land in the store `flux_pairs`.
2. When the store holds enough pairs (20+), select the muted (grey) training nodes and press **Ctrl+M**, and mute
   the sampler above; Queue. `target_modules = auto` takes Flux's attention and MLP layers (double and single
   blocks); `guidance = -1` trains at Flux-dev's 3.5 (set the value you sample with). Flow-DPO's beta is left to
   the model (1000) unless you uncomment it.
3. The LoRA lands in `models/loras/prefalign/`: **LoraLoaderModelOnly** or **Load LoRA** applies it, and diffusers'
   `load_lora_weights` loads the same file."""

SD35_FILES = """## SD3.5: which file goes where
- `models/checkpoints/`: `sd3.5_medium.safetensors` (or `sd3.5_large`): **Load Checkpoint** gives MODEL and VAE.
- `models/text_encoders/`: `clip_g.safetensors`, `clip_l.safetensors`, `t5xxl_fp16.safetensors` (or fp8) for
  **TripleCLIPLoader**. Without T5 (a Load Checkpoint that includes CLIP-L/G), prompts are shorter but it trains.

SD3.5-medium trains at 1024 px, one pair, rank 16 with gradient_checkpointing in about 8 GB (5 GB with its weights
in fp8 through Load Diffusion Model); SD3.5-large in 21 GB (13 GB). docs/memory.md has the table."""

SD35_STEPS = """## Curate, then train
1. **Queue** to generate 4 images; pick in the **Preference Gallery Picker** (store `sd35_pairs`).
2. With enough pairs, unmute the grey training nodes (select, **Ctrl+M**), mute the sampler above, Queue.
   `target_modules = auto`: the MMDiT's attention (both attentions of SD3.5-medium) and MLP layers; timesteps are
   drawn logit-normal as SD3 trains. Long prompts keep all their tokens.
3. The file is in diffusers' names: stock **Load LoRA** and diffusers both load it."""


def flow_curate_and_train(info: dict, family: str) -> dict:
    """Curate pairs on a diffusion transformer and train on them in one graph: stock loaders, the gallery, then the
    training nodes (muted until the store holds pairs), notes on which file goes where."""
    g = Graph(info)
    flux = family == "flux"
    if flux:
        unet = g.add("UNETLoader", (40, 60), {"unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn"}, size=[320, 90])
        te = g.add("DualCLIPLoader", (40, 190), {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8_e4m3fn.safetensors",
                                                 "type": "flux"}, size=[320, 110])
        ae = g.add("VAELoader", (40, 340), {"vae_name": "ae.safetensors"}, size=[320, 60])
        model, clip, vae = (unet, 0), (te, 0), (ae, 0)
    else:
        ckpt = g.add("CheckpointLoaderSimple", (40, 60), {"ckpt_name": "sd3.5_medium.safetensors"}, size=[320, 100])
        te = g.add("TripleCLIPLoader", (40, 200), {"clip_name1": "clip_g.safetensors", "clip_name2": "clip_l.safetensors",
                                                   "clip_name3": "t5xxl_fp16.safetensors"}, size=[320, 110])
        model, clip, vae = (ckpt, 0), (te, 0), (ckpt, 2)
    text = g.add("PrimitiveStringMultiline", (40, 440), {"value": PROMPT}, title="Prompt", size=[320, 120])
    pos = g.add("CLIPTextEncode", (400, 60), {}, {"clip": clip, "text": (text, 0)}, title="Positive")
    neg = g.add("CLIPTextEncode", (400, 260), {"text": "" if flux else NEGATIVE}, {"clip": clip}, title="Negative")
    positive = (pos, 0)
    if flux:
        positive = (g.add("FluxGuidance", (400, 460), {"guidance": 3.5}, {"conditioning": (pos, 0)}, size=[320, 60]), 0)
    lat = g.add("EmptySD3LatentImage", (400, 560), {"width": 1024, "height": 1024, "batch_size": 4}, size=[320, 110])
    sampler = ({"seed": 1, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0} if flux else
               {"seed": 1, "steps": 28, "cfg": 4.5, "sampler_name": "dpmpp_2m", "scheduler": "sgm_uniform", "denoise": 1.0})
    ks = g.add("KSampler", (760, 60), sampler, {"model": model, "positive": positive, "negative": (neg, 0),
                                                "latent_image": (lat, 0)}, size=[320, 270], control="randomize")
    dec = g.add("VAEDecode", (1120, 60), {}, {"samples": (ks, 0), "vae": vae}, size=[200, 50])
    store = f"{family}_pairs"
    g.add("PrefAlignGalleryPicker", (1120, 160), {"store": store}, {"images": (dec, 0), "prompt": (text, 0)}, size=[520, 560])
    load = g.add("PrefAlignLoadStore", (40, 800), {"store": store}, size=[320, 80])
    tr = g.add("PrefAlignTrainLoRA", (400, 800), {
        "method": "dpo", "steps": 500, "learning_rate": "1e-4", "rank": 16, "alpha": 16.0, "batch_size": 1,
        "gradient_accumulation_steps": 4, "resolution": 1024, "checkpoint_every": 100, "lora_name": store,
        "gradient_checkpointing": True}, {"model": model, "clip": clip, "vae": vae, "pairs": (load, 0)}, size=[400, 820])
    preview = g.add("PreviewImage", (860, 800), {}, {"images": (tr, 2)}, title="Loss curve", size=[360, 380])
    lat1 = g.add("EmptySD3LatentImage", (860, 1220), {"width": 1024, "height": 1024, "batch_size": 1}, size=[320, 110])
    ks2 = g.add("KSampler", (1240, 800), {**sampler, "seed": 2}, {"model": (tr, 0), "positive": positive, "negative": (neg, 0),
                                                                   "latent_image": (lat1, 0)}, title="Sample with the new LoRA", size=[320, 270])
    dec2 = g.add("VAEDecode", (1600, 800), {}, {"samples": (ks2, 0), "vae": vae}, size=[200, 50])
    out = g.add("PreviewImage", (1600, 900), {}, {"images": (dec2, 0)}, title="With the LoRA", size=[320, 320])
    g.mute(load, tr, preview, lat1, ks2, dec2, out)
    g.note((1680, 60), FLUX_FILES if flux else SD35_FILES, size=[460, 330])
    g.note((1680, 420), FLUX_STEPS if flux else SD35_STEPS, size=[460, 340])
    title = "Flux.1: curate pairs, then train a preference LoRA" if flux else "SD3.5: curate pairs, then train a preference LoRA"
    return g.ui(title)


CURATE, TRAIN, COMPARE = "Curate preference pairs.json", "Train a preference LoRA.json", "Compare with and without the LoRA.json"
SCORED = "Generate, score, pair and train.json"
FLUX, SD35 = "Flux curate and train.json", "SD3.5 curate and train.json"
WORKFLOWS = {CURATE: curate, TRAIN: train, COMPARE: compare, SCORED: generate_score_train,
             FLUX: lambda info: flow_curate_and_train(info, "flux"), SD35: lambda info: flow_curate_and_train(info, "sd35")}


def build_all(info: dict) -> dict[str, dict]:
    return {name: fn(info) for name, fn in WORKFLOWS.items()}


if __name__ == "__main__":  # regenerate example_workflows/*.json
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("prefalign_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["prefalign_pack"] = pack
    spec.loader.exec_module(pack)
    info = object_info(pack)
    for name, ui in build_all(info).items():
        problems = [p for p in validate(ui, info) if "is not one of the choices" not in p]
        assert not problems, problems
        (WORKFLOW_DIR / name).write_text(json.dumps(ui, indent=1) + "\n")
        print("wrote", name)
