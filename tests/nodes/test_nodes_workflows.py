"""example_workflows/*.json load with no missing nodes and fit the node definitions (no ComfyUI needed)."""
from __future__ import annotations

import json
import sys

import pytest

import prefalign_pack

wt = sys.modules["prefalign_workflow_tools"]  # loaded by conftest.py

WORKFLOWS = sorted(wt.WORKFLOW_DIR.glob("*.json"))
# File-list dropdowns (LoRA names) are read from fresh, empty model folders: whatever files an earlier
# test on the same worker left behind must not decide whether a workflow's placeholder name is valid.
pytestmark = pytest.mark.usefixtures("comfy_folders")


def info():
    return wt.object_info(prefalign_pack)


def test_three_workflows():
    names = {p.name for p in WORKFLOWS}
    assert {wt.CURATE, wt.TRAIN, wt.COMPARE} <= names


def test_template_folder_is_the_one_comfyui_serves():
    """ComfyUI serves templates from the first existing folder of this list: with the workflows in `workflows/`,
    the repository's `examples/` (accelerate configs) was served instead and every template and picture was a 404."""
    order = ["example_workflows", "example", "examples", "workflow", "workflows"]  # app/custom_node_manager.py
    served = next(name for name in order if (wt.ROOT / name).is_dir())
    assert wt.ROOT / served == wt.WORKFLOW_DIR


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_template_browser_title_and_thumbnail(path):
    """ComfyUI's template browser titles a pack's workflow by its file name and asks for `<name>.jpg` beside it."""
    from PIL import Image

    title = path.stem
    assert title[0].isupper() and " " in title and "_" not in title and not title.lower().startswith("prefalign")
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"{thumb.name} is missing: run tests/comfyui/make_thumbnails.mjs"
    assert thumb.stat().st_size < 120_000
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and 320 <= im.width <= 1024 and 0.4 <= im.height / im.width <= 1.0
        colours = im.convert("L").getextrema()
    assert colours[1] - colours[0] > 100  # a picture of the graph, not a blank page


def test_train_workflow_saves_the_lora_once():
    """The Train node saves the file with its metadata into models/loras/prefalign/; a Save LoRA node would write a
    second copy, without metadata, into output/loras/ (which LoRA menus list too)."""
    ui = json.loads((wt.WORKFLOW_DIR / wt.TRAIN).read_text())
    assert not [n["type"] for n in ui["nodes"] if "save" in n["type"].lower() and "lora" in n["type"].lower()]
    train = next(n for n in ui["nodes"] if n["type"] == "PrefAlignTrainLoRA")
    assert train["outputs"][1]["name"] == "lora" and train["outputs"][1]["links"] == []


def test_curate_seed_is_randomized():
    """Run again must generate a new batch: with a fixed seed ComfyUI returns the cached one."""
    ui = json.loads((wt.WORKFLOW_DIR / wt.CURATE).read_text())
    (sampler,) = [n for n in ui["nodes"] if n["type"] == "KSampler"]
    slots = wt.widget_names(info()["KSampler"])
    assert sampler["widgets_values"][slots.index("seed*control*")] == "randomize"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_valid(path):
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4 and ui["nodes"] and isinstance(ui["links"], list)
    assert wt.validate(ui, info()) == []
    api = wt.to_api(ui, info())
    queued = [n for n in ui["nodes"] if n["type"] not in wt.VIRTUAL and n.get("mode", 0) == 0]  # notes, muted nodes: not
    assert len(api) == len(queued)
    assert any(n["class_type"].startswith("PrefAlign") for n in api.values())


@pytest.mark.parametrize("name", list(wt.WORKFLOWS))
def test_workflow_files_match_builder(name):
    """The committed file is what the builder makes from today's node definitions.
    After changing a node's inputs, regenerate: `python tests/nodes/workflow_tools.py`."""
    built = wt.WORKFLOWS[name](info())
    assert json.loads((wt.WORKFLOW_DIR / name).read_text()) == json.loads(json.dumps(built))


def test_validator_catches_problems():
    ui = json.loads((wt.WORKFLOW_DIR / wt.TRAIN).read_text())
    i = info()
    broken = json.loads(json.dumps(ui))
    broken["nodes"][0]["type"] = "NoSuchNode"
    assert any("missing node type" in p for p in wt.validate(broken, i))
    broken = json.loads(json.dumps(ui))
    train = next(n for n in broken["nodes"] if n["type"] == "PrefAlignTrainLoRA")
    train["widgets_values"].pop()
    assert any("widget values" in p for p in wt.validate(broken, i))
    broken = json.loads(json.dumps(ui))
    train = next(n for n in broken["nodes"] if n["type"] == "PrefAlignTrainLoRA")
    next(x for x in train["inputs"] if x["name"] == "pairs")["link"] = None
    assert any("pairs is not connected" in p for p in wt.validate(broken, i))


def test_gallery_prompt_shared_with_text_encoder():
    ui = json.loads((wt.WORKFLOW_DIR / wt.CURATE).read_text())
    api = wt.to_api(ui, info())
    gallery = next(n for n in api.values() if n["class_type"] == "PrefAlignGalleryPicker")
    encoders = [n for n in api.values() if n["class_type"] == "CLIPTextEncode"]
    assert any(e["inputs"]["text"] == gallery["inputs"]["prompt"] for e in encoders)
