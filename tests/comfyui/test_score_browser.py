"""Scorer-assisted curation in a real ComfyUI and its real frontend (skipped unless COMFYUI_DIR is set).

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy-venv/bin/python PREFALIGN_CKPT_DIR=~/.cache/prefalign-ckpts \\
      python -m pytest tests/comfyui/test_score_browser.py -s

The generate -> score -> pairs -> train workflow runs on the tiny SD1.5 checkpoint with a tiny CLIP as the
judge (tests/conftest.py's, copied into models/prefalign_scorers/); the browser reads the Score Images for Preference node's text, auto-marks
and accepts in the Gallery Picker, and judges the batch in the comparison mode. Screenshots (for a person to
look at) go to $PREFALIGN_SCREENSHOTS or a temp folder. It drives the page with tests/comfyui/browser_tools.mjs
and reads the result text through the pack's text widget (both from the pack-ui work).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the integration tests")
STORE = "browser_scored"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_clip):
    cs = importlib.import_module("comfy_server")  # tests/comfyui is on the path of its own tests
    s = cs.ComfyServer.from_env(tmp_path_factory.mktemp("comfy_scores"))
    shutil.copytree(tiny_clip, s.base / "models" / "prefalign_scorers" / "tiny-pick")  # a link out of the folder is refused
    s.start()
    yield s
    s.stop()


def test_score_node_text_automark_and_comparison_mode(server, tmp_path):
    workflow = importlib.import_module("comfy_server").workflow_tools()
    info = server.get("/object_info")
    assert info["PrefAlignLoadScorer"]["input"]["required"]["clip_model"][0] == ["(none)", "tiny-pick"]
    shots = Path(os.environ.get("PREFALIGN_SCREENSHOTS", tmp_path / "shots"))
    out = subprocess.run(["node", str(HERE / "compare_test.mjs"), server.url, str(shots), STORE, workflow.SCORED],
                         capture_output=True, text=True, timeout=1500, env={**os.environ, "CHROMIUM": CHROMIUM})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nbrowser saw: {json.dumps(seen)}\nscreenshots: {shots}")
    assert seen["workflow"]["missing"] == []
    assert [e for e in seen["errors"] if "prefalign" in e.lower()] == []
    # the Score Images for Preference node: one line per image under its previews
    lines = seen["scoreText"].splitlines()
    assert lines[0] == "clip:tiny-pick:" and len(lines) == 9
    assert seen["scoreTextVisible"] and seen["scorePreviews"] == 8
    scores = [float(line.split(": ")[1].split(" ")[0]) for line in lines[1:]]
    # auto-mark suggested the best image chosen and the worst rejected; A applied exactly those marks
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    expected = ["chosen" if i == best else "rejected" if i == worst else "none" for i in range(8)]
    assert seen["suggested"] == expected and seen["marked"] == expected, seen
    assert "1 chosen, 1 rejected" in seen["galleryStatus"]
    # comparison mode: two large images, 8 images in 3 Swiss rounds of 4 judgements, each saved as a pair
    assert min(seen["compareImages"]) > 300
    assert "round 1 of 3, judgement 1 of 12" in seen["compareTitle"]
    judged = seen["judged"]  # keys: left, right, skip, undo, then left, right, ...
    assert len(judged) == 14 and judged[4] == judged[2]  # undo brought the skipped pair back
    assert seen["compareDone"].startswith("Done: ranking") and seen["ranking"] == 8 and seen["closed"]
    assert seen["compareStatus"].startswith("12 pairs saved")
    # once the graph has finished: the store holds the scored pairs, the accepted marks' pair and 12 judgements
    entry = wait_for_idle(server)
    kept = next(line for node in entry["outputs"].values() for line in node.get("prefalign_text", [])
                if "pair(s) kept" in line)
    assert server.get(f"/prefalign/store?store={STORE}")["pairs"] == int(kept.split(" ")[0]) + 1 + 12


def wait_for_idle(server, timeout: float = 900) -> dict:
    """The last prompt's history entry once nothing is queued or running."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        q = server.get("/queue")
        if not q["queue_running"] and not q["queue_pending"]:
            history = server.get("/history")
            entry = list(history.values())[-1]
            assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-2000:]
            return entry
        time.sleep(1)
    raise TimeoutError("the graph did not finish")
