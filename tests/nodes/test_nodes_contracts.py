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
    pairs, n = nodes["PrefAlignLoadStore"]().load("artist1")["result"]
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
    with pytest.raises(ValueError, match="not found in ComfyUI's input folder"):
        nodes["PrefAlignImportParquet"]().import_("missing.parquet", "copy", False)


def test_dataset_node_parquet_limit_and_shuffle(pack, comfy_folders):
    nodes = pack.NODE_CLASS_MAPPINGS
    for i in range(6):
        nodes["PrefAlignAddPair"]().add(images(100 + i), images(i), f"p{i}", "ds")
    exported = nodes["PrefAlignExportParquet"]().export("ds", "ds.parquet")["result"][0]
    (comfy_folders["input"] / "ds.parquet").write_bytes(Path(exported).read_bytes())
    src = "ds.parquet"
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


@pytest.fixture
def comfy_lora(monkeypatch):
    """comfy.lora's key maps for the fake model, by ComfyUI's first rule: `lora_unet_<path with _>` -> `<path>.weight`."""
    import sys
    import types

    mod = types.ModuleType("comfy.lora")

    def model_lora_keys_unet(model, key_map={}):
        for k in model.state_dict():
            if k.startswith("diffusion_model.") and k.endswith(".weight"):
                key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
        return key_map

    mod.model_lora_keys_unet = model_lora_keys_unet
    mod.model_lora_keys_clip = lambda model, key_map={}: key_map
    monkeypatch.setitem(sys.modules, "comfy.lora", mod)
    monkeypatch.setattr(sys.modules["comfy"], "lora", mod, raising=False)
    return mod


Q = "lora_unet_input_blocks_0_attn1_to_q"  # a module of the fake UNet: 8 in, 8 out


def save_lora(comfy_folders, name, modules: dict, metadata: dict | None = None) -> str:
    """A kohya LoRA file in models/loras/prefalign/ with one rank-2 module per {name: (in, out)}."""
    from safetensors.torch import save_file

    path = comfy_folders["loras"] / "prefalign" / name
    path.parent.mkdir(exist_ok=True)
    weights = {}
    for module, (n_in, n_out) in modules.items():
        weights |= {f"{module}.lora_down.weight": torch.zeros(2, n_in), f"{module}.lora_up.weight": torch.zeros(n_out, 2),
                    f"{module}.alpha": torch.tensor(2.0)}
    save_file(weights, str(path), metadata=metadata)
    return f"prefalign/{name}"


def test_load_lora_node_metadata(pack, comfy_folders, comfy_lora):
    name = save_lora(comfy_folders, "x.safetensors", {Q: (8, 8)},
                     {"prefalign.method": "dpo", "prefalign.steps": "12", "prefalign.dataset": "store:artist1",
                      "prefalign.method_args": json.dumps({"beta": 2500})})
    cls = pack.NODE_CLASS_MAPPINGS["PrefAlignLoadLoRA"]
    assert name in cls.INPUT_TYPES()["required"]["lora_name"][0]
    model = prefalign_fake().make_model_patcher()
    out = cls().load(model, name, 0.8, clip="CLIP", strength_clip=1.0)
    new_model, clip, info = out["result"]
    assert clip == "CLIP"  # no text-encoder weights: CLIP passes through
    assert new_model.lora[f"{Q}.alpha"][1] == 0.8
    assert "method: dpo" in info and "steps: 12" in info and "dataset: store:artist1" in info and "beta=2500" in info
    assert "not applied" not in info
    # the frontend ignores ui.text: the pack's own text widget shows prefalign_text
    assert out["ui"] == {"prefalign_text": [info]}


def test_load_lora_lists_and_reads_safetensors_only(pack, comfy_folders, monkeypatch):
    """ComfyUI lists .pt/.ckpt LoRAs too (pickles): the node neither offers nor reads them."""
    import sys

    save_lora(comfy_folders, "ok.safetensors", {Q: (8, 8)})
    (comfy_folders["loras"] / "prefalign" / "old.pt").write_bytes(b"not read")
    monkeypatch.setattr(sys.modules["folder_paths"], "get_filename_list",
                        lambda kind: ["prefalign/ok.safetensors", "prefalign/old.pt", "other.ckpt"])
    cls = pack.NODE_CLASS_MAPPINGS["PrefAlignLoadLoRA"]
    assert cls.INPUT_TYPES()["required"]["lora_name"][0] == ["prefalign/ok.safetensors"]
    with pytest.raises(ValueError, match=r"prefalign/old.pt: Load Preference LoRA reads .safetensors files only"):
        cls().load(prefalign_fake().make_model_patcher(), "prefalign/old.pt", 1.0)


def test_load_lora_hostile_metadata_is_bounded(pack, comfy_folders, comfy_lora):
    """Deeply nested method_args (json.loads: RecursionError) and megabytes of metadata: a short text, no error."""
    nested = "[" * 50_000 + "]" * 50_000
    name = save_lora(comfy_folders, "big.safetensors", {Q: (8, 8)},
                     {"prefalign.method": "dpo", "prefalign.dataset": "d" * 5_000_000, "prefalign.method_args": nested})
    out = pack.NODE_CLASS_MAPPINGS["PrefAlignLoadLoRA"]().load(prefalign_fake().make_model_patcher(), name, 1.0)
    (text,) = out["ui"]["prefalign_text"]
    assert len(text) < 1000 and "method: dpo" in text and "hyper-parameters: [[[[" in text
    lora_nodes = pack.nodes.lora_nodes
    assert lora_nodes.hyper_parameters('{"beta": {"nested": [1]}}') == '{"beta": {"nested": [1]}}'
    assert lora_nodes.hyper_parameters('{"beta": 5000, "space": "latent"}') == "beta=5000, space=latent"


def test_load_lora_that_does_not_fit_names_the_modules(pack, comfy_folders, comfy_lora):
    """Shapes are checked against the weights ComfyUI's key map puts each module on (the trainer's wrong-base check)."""
    node, model = pack.NODE_CLASS_MAPPINGS["PrefAlignLoadLoRA"](), prefalign_fake().make_model_patcher()
    wrong = save_lora(comfy_folders, "xl.safetensors", {Q: (16, 8), "lora_unet_input_blocks_0_attn1_to_k": (8, 8)},
                      {"prefalign.architecture": "sdxl"})
    with pytest.raises(ValueError, match=rf"xl.safetensors does not fit this model \(its metadata says it was trained "
                                         rf"for sdxl\): 1 of its 2 modules have other shapes: module {Q} has in/out "
                                         rf"features 16/8 in the LoRA, 8/8 in the model"):
        node.load(model, wrong, 1.0)
    elsewhere = save_lora(comfy_folders, "other.safetensors", {"lora_unet_down_blocks_9_proj": (8, 8)})
    with pytest.raises(ValueError, match=r"none of its 1 modules exists in it \(e.g. lora_unet_down_blocks_9_proj\)"):
        node.load(model, elsewhere, 1.0)
    partly = save_lora(comfy_folders, "partly.safetensors", {Q: (8, 8), "lora_unet_down_blocks_9_proj": (8, 8)})
    info = node.load(model, partly, 1.0)["result"][2]
    assert "not applied: 1 modules this model does not have (e.g. lora_unet_down_blocks_9_proj)" in info


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


def test_node_search_finds_the_pack(pack):
    """'dpo' found nothing and 'preference' 5 of 8 nodes: aliases for newer ComfyUI, display names for older
    frontends (which search only the display name)."""
    display = pack.NODE_DISPLAY_NAME_MAPPINGS
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert {"preference", "dpo", "prefalign"} <= set(cls.SEARCH_ALIASES), key
        assert "preference" in display[key].lower(), display[key]
    assert "dpo" in display["PrefAlignTrainLoRA"].lower()
    assert all("lora" in pack.NODE_CLASS_MAPPINGS[k].SEARCH_ALIASES for k in ("PrefAlignTrainLoRA", "PrefAlignLoadLoRA"))


def test_docs_name_the_nodes_by_their_display_names(pack):
    import re

    root = Path(prefalign_pack.__file__).parent
    readme = root.joinpath("README.md").read_text()
    section = readme[readme.index("## In ComfyUI"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:]  # after the header
    assert sorted(rows) == sorted(pack.NODE_DISPLAY_NAME_MAPPINGS.values())
    named = set(re.findall(r"\*\*([^*]+)\*\*", root.joinpath("example_workflows", "README.md").read_text()))
    assert named and named <= set(pack.NODE_DISPLAY_NAME_MAPPINGS.values())
