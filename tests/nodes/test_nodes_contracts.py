"""Every node's ComfyUI contract: inputs with tooltips, outputs, function, category; store/gallery/LoRA/dataset nodes."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

import prefalign_pack

KNOWN_TYPES = {"MODEL", "CLIP", "VAE", "IMAGE", "STRING", "INT", "FLOAT", "BOOLEAN", "LORA_MODEL", "PREFERENCE_PAIRS",
               "PREFALIGN_SCORER", "PREFALIGN_SCORES"}


def test_pack_exports():
    assert prefalign_pack.WEB_DIRECTORY == "./web"
    m = prefalign_pack.NODE_CLASS_MAPPINGS
    assert set(m) == set(prefalign_pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert {"PrefAlignPairsFromDataset", "PrefAlignAddPair", "PrefAlignLoadStore", "PrefAlignGalleryPicker",
            "PrefAlignExportParquet", "PrefAlignImportParquet", "PrefAlignTrainLoRA", "PrefAlignLoadLoRA"} <= set(m)
    assert (Path(prefalign_pack.__file__).parent / "web").is_dir()


@pytest.mark.parametrize("key", sorted(prefalign_pack.NODE_CLASS_MAPPINGS))
def test_node_contract(pack, key):
    cls = pack.NODE_CLASS_MAPPINGS[key]
    assert key.startswith("PrefAlign")
    assert cls.CATEGORY.startswith("preference/")
    assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION
    inputs = cls.INPUT_TYPES()
    assert set(inputs) <= {"required", "optional", "hidden"}
    names = []
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            names.append(name)
            kind, opts = spec[0], spec[1]
            assert isinstance(kind, list) or kind in KNOWN_TYPES, (name, kind)
            assert opts.get("tooltip"), f"{key}.{name} has no tooltip"
            if kind in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"]
            if isinstance(kind, list) and kind and "default" in opts:
                assert opts["default"] in kind
    fn = getattr(cls, cls.FUNCTION)
    params = list(inspect.signature(fn).parameters)[1:]
    assert set(inputs.get("required", {})) <= set(params), (key, params)
    assert all(t in KNOWN_TYPES for t in cls.RETURN_TYPES)
    if getattr(cls, "RETURN_NAMES", None):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    if getattr(cls, "OUTPUT_TOOLTIPS", None):
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    assert cls.RETURN_TYPES or getattr(cls, "OUTPUT_NODE", False)


def images(*values, size=16):
    return torch.stack([torch.full((size, size, 3), v / 255.0) for v in values])


def test_add_pair_and_load_store(pack, comfy_folders):
    nodes = pack.NODE_CLASS_MAPPINGS
    out = nodes["PrefAlignAddPair"]().add(images(200, 210), images(20), "a prompt", "artist1")
    assert out["result"] == (2,)
    store_dir = comfy_folders["user"] / "prefalign_stores" / "artist1"
    assert (store_dir / "pairs.sqlite").is_file()
    before = nodes["PrefAlignLoadStore"].IS_CHANGED("artist1")
    pairs, n = nodes["PrefAlignLoadStore"]().load("artist1")
    assert n == 2 and len(pairs) == 2 and pairs[0].prompt == "a prompt" and pairs.description == "store:artist1"
    nodes["PrefAlignAddPair"]().add(images(1), images(2), "more", "artist1")
    assert nodes["PrefAlignLoadStore"].IS_CHANGED("artist1") != before
    with pytest.raises(ValueError, match="no pair store"):
        nodes["PrefAlignLoadStore"]().load("empty")
    with pytest.raises(ValueError, match="invalid store name"):
        nodes["PrefAlignAddPair"]().add(images(1), images(2), "p", "../etc")
    with pytest.raises(ValueError, match="equal batches"):
        nodes["PrefAlignAddPair"]().add(images(1, 2), images(3, 4, 5), "p", "artist1")


def test_gallery_node_records_batch(pack, comfy_folders):
    node = pack.NODE_CLASS_MAPPINGS["PrefAlignGalleryPicker"]()
    ui = node.show(images(10, 20, 30), "three squares", "g1")["ui"]
    (info,) = ui["prefalign_batch"]
    assert info["count"] == 3 and info["store"] == "g1" and info["prompt"] == "three squares"
    store = pack.nodes.pair_store.PairStore(comfy_folders["user"] / "prefalign_stores", "g1")
    assert store.batch_state(info["batch"])["marks"] == ["none"] * 3


def test_export_import_nodes(pack, comfy_folders):
    nodes = pack.NODE_CLASS_MAPPINGS
    nodes["PrefAlignAddPair"]().add(images(200), images(20), "p", "ex")
    path = nodes["PrefAlignExportParquet"]().export("ex", "../../evil name")["result"][0]
    assert Path(path).parent == comfy_folders["output"] / "prefalign"
    assert Path(path).name == "evil_name.parquet"
    (comfy_folders["input"] / "pp.parquet").write_bytes(Path(path).read_bytes())
    assert nodes["PrefAlignImportParquet"]().import_("pp.parquet", "copy", False)["result"] == (1,)
    with pytest.raises(ValueError, match="no parquet"):
        nodes["PrefAlignImportParquet"]().import_("missing.parquet", "copy", False)


def test_dataset_node_parquet_limit_and_shuffle(pack, comfy_folders):
    nodes = pack.NODE_CLASS_MAPPINGS
    for i in range(6):
        nodes["PrefAlignAddPair"]().add(images(100 + i), images(i), f"p{i}", "ds")
    nodes["PrefAlignExportParquet"]().export("ds", "ds.parquet")
    src = str(comfy_folders["output"] / "prefalign" / "ds.parquet")
    node = nodes["PrefAlignPairsFromDataset"]()
    pairs, n = node.load(src, "train", 4, -1, False, False)
    assert n == 4 and [pairs[i].prompt for i in range(4)] == ["p0", "p1", "p2", "p3"]
    shuffled, _ = node.load(src, "train", 0, 3, False, False)
    order = [shuffled[i].prompt for i in range(6)]
    assert sorted(order) == [f"p{i}" for i in range(6)] and order != sorted(order)
    again, _ = node.load(src, "train", 0, 3, False, False)
    assert [again[i].prompt for i in range(6)] == order
    assert isinstance(nodes["PrefAlignPairsFromDataset"].IS_CHANGED(src, "train", 0, -1, False, False), str)
    with pytest.raises(ValueError, match="source is empty"):
        node.load("  ", "train", 0, -1, False, False)


def test_load_lora_node_metadata(pack, comfy_folders):
    from safetensors.torch import save_file

    path = comfy_folders["loras"] / "prefalign" / "x.safetensors"
    path.parent.mkdir()
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_a.alpha": torch.tensor(2.0)}, str(path),
              metadata={"prefalign.method": "dpo", "prefalign.steps": "12", "prefalign.dataset": "store:artist1",
                        "prefalign.method_args": json.dumps({"beta": 2500})})
    cls = pack.NODE_CLASS_MAPPINGS["PrefAlignLoadLoRA"]
    assert "prefalign/x.safetensors" in cls.INPUT_TYPES()["required"]["lora_name"][0]
    model = prefalign_fake().make_model_patcher()
    out = cls().load(model, "prefalign/x.safetensors", 0.8, clip="CLIP", strength_clip=1.0)
    new_model, clip, info = out["result"]
    assert clip == "CLIP"  # no text-encoder weights: CLIP passes through
    assert new_model.lora["lora_unet_a.alpha"][1] == 0.8
    assert "method: dpo" in info and "steps: 12" in info and "dataset: store:artist1" in info and "beta=2500" in info
    assert out["ui"]["text"] == [info]


def prefalign_fake():
    import sys

    return sys.modules["prefalign_fake_comfy"]


def test_pack_imports_without_comfyui(tmp_path):
    """A fresh interpreter with no ComfyUI modules at all imports the pack and lists the nodes."""
    import subprocess
    import sys

    root = Path(prefalign_pack.__file__).parent
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('somepack', {str(root / '__init__.py')!r}, submodule_search_locations=[{str(root)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['somepack'] = m; spec.loader.exec_module(m)\n"
        "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules\n"
        "print(len(m.NODE_CLASS_MAPPINGS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == len(prefalign_pack.NODE_CLASS_MAPPINGS)
