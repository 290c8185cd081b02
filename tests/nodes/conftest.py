"""Load the pack the way ComfyUI does (a package imported by path, relative imports inside), with fakes of
the few ComfyUI modules the nodes touch. No ComfyUI is needed for anything under tests/nodes/."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK = "prefalign_pack"
_here = Path(__file__).resolve().parent
# the loader by path of the integration harness (standard library only), which tests/comfyui's probes use too
sys.path.insert(0, str(ROOT / "tests" / "comfyui"))
from comfy_server import load_module as _load  # noqa: E402

# the test helpers, each loaded once under one name: tests read them from sys.modules (tests/nodes is no package)
fake_comfy = _load("prefalign_fake_comfy", _here / "fake_comfy.py")
_load("prefalign_fake_families", _here / "fake_families.py")
_load("prefalign_workflow_tools", _here / "workflow_tools.py")
_load(PACK, ROOT)


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    folders = {k: tmp_path / k for k in ("user", "output", "temp", "input", "loras")}
    for f in folders.values():
        f.mkdir()
    monkeypatch.delenv("PREFALIGN_STORE_DIR", raising=False)
    calls = fake_comfy.install(folders)
    folders["calls"] = calls
    return folders


@pytest.fixture
def pack(comfy_folders):
    return sys.modules[PACK]



# Under pytest's default import mode every conftest.py is the module `conftest`, so once this one is
# imported, the suite's `from conftest import make_pairs` (tests/conftest.py) would find this module.
# Delegate unknown names to a copy of the parent conftest so both keep working.
_parent = None


def __getattr__(name):
    global _parent
    if name.startswith("__"):
        raise AttributeError(name)
    if _parent is None:
        path = _here.parent / "conftest.py"
        if not path.is_file():
            raise AttributeError(name)
        _parent = _load("prefalign_tests_parent_conftest", path)
    return getattr(_parent, name)
