"""The integration harness's own logic, without ComfyUI (runs in the normal suite)."""
from __future__ import annotations

import importlib
from pathlib import Path

cs = importlib.import_module("comfy_server")  # tests/comfyui is on the path of its own tests

PACK = Path("/tmp/pytest-7/comfy0/custom_nodes/prefalign")


def test_pack_import_report_ignores_comfyui_failures_under_a_prefalign_path():
    """A ComfyUI checkout under a path containing "prefalign" logs its own audio-node failures with that word."""
    log = "\n".join([
        "WARNING: some comfy_extras/ nodes did not import correctly.",
        "IMPORT FAILED: /home/me/prefalign-dev/ComfyUI/comfy_extras/nodes_audio.py",
        "Cannot import /home/me/prefalign-dev/ComfyUI/custom_nodes/websocket_image_save.py module for custom nodes: x",
        "Cannot import /tmp/pytest-7/comfy0/custom_nodes/prefalign_other module for custom nodes: no module named y",
        "Import times for custom nodes:",
        "   0.0 seconds (IMPORT FAILED): /tmp/pytest-7/comfy0/custom_nodes/prefalign_other",
        "   0.3 seconds: /tmp/pytest-7/comfy0/custom_nodes/prefalign",
    ])
    assert cs.pack_import_report(log, PACK) == (True, [])


def test_pack_import_report_finds_the_packs_own_failure():
    log = "\n".join([
        "Traceback (most recent call last):",
        "ModuleNotFoundError: No module named 'safetensors'",
        f"Cannot import {PACK} module for custom nodes: No module named 'safetensors'",
        "Import times for custom nodes:",
        f"   0.1 seconds (IMPORT FAILED): {PACK}",
    ])
    loaded, problems = cs.pack_import_report(log, PACK)
    assert not loaded and len(problems) == 2
    assert cs.pack_import_report("Starting server", PACK) == (False, [])
