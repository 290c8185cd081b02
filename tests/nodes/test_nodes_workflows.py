"""workflows/*.json load with no missing nodes and fit the node definitions (no ComfyUI needed)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import prefalign_pack

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("prefalign_workflow_tools", HERE / "workflow_tools.py")
wt = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = wt
spec.loader.exec_module(wt)

WORKFLOWS = sorted((wt.ROOT / "workflows").glob("*.json"))
# File-list dropdowns (LoRA names) are read from fresh, empty model folders: whatever files an earlier
# test on the same worker left behind must not decide whether a workflow's placeholder name is valid.
pytestmark = pytest.mark.usefixtures("comfy_folders")


def info():
    return wt.object_info(prefalign_pack)


def test_three_workflows():
    names = {p.name for p in WORKFLOWS}
    assert {"prefalign_curate.json", "prefalign_train.json", "prefalign_compare.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_valid(path):
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4 and ui["nodes"] and isinstance(ui["links"], list)
    assert wt.validate(ui, info()) == []
    api = wt.to_api(ui, info())
    assert len(api) == len(ui["nodes"])
    assert any(n["class_type"].startswith("PrefAlign") for n in api.values())


@pytest.mark.parametrize("name", list(wt.WORKFLOWS))
def test_workflow_files_match_builder(name):
    """The committed file is what the builder makes from today's node definitions.
    After changing a node's inputs, regenerate: `python tests/nodes/workflow_tools.py`."""
    built = wt.WORKFLOWS[name](info())
    assert json.loads((wt.ROOT / "workflows" / name).read_text()) == json.loads(json.dumps(built))


def test_validator_catches_problems():
    ui = json.loads((wt.ROOT / "workflows" / "prefalign_train.json").read_text())
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
    ui = json.loads((wt.ROOT / "workflows" / "prefalign_curate.json").read_text())
    api = wt.to_api(ui, info())
    gallery = next(n for n in api.values() if n["class_type"] == "PrefAlignGalleryPicker")
    encoders = [n for n in api.values() if n["class_type"] == "CLIPTextEncode"]
    assert any(e["inputs"]["text"] == gallery["inputs"]["prompt"] for e in encoders)
