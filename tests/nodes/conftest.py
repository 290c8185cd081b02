"""Load the pack the way ComfyUI does (a package imported by path, relative imports inside), with fakes of
the few ComfyUI modules the nodes touch. No ComfyUI is needed for anything under tests/nodes/."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK = "prefalign_pack"
_here = Path(__file__).resolve().parent


def _load_fakes():
    spec = importlib.util.spec_from_file_location("prefalign_fake_comfy", _here / "fake_comfy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["prefalign_fake_comfy"] = mod
    spec.loader.exec_module(mod)
    return mod


fake_comfy = sys.modules.get("prefalign_fake_comfy") or _load_fakes()


def load_pack():
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = mod
    spec.loader.exec_module(mod)
    return mod


load_pack()


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
    return load_pack()



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
        spec = importlib.util.spec_from_file_location("prefalign_tests_parent_conftest", path)
        _parent = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = _parent
        spec.loader.exec_module(_parent)
    return getattr(_parent, name)
