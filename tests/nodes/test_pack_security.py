"""The pack's defences against hostile or mistaken input (issue 14, pack side; issue 13 items 16, 19, 22),
through the nodes as ComfyUI runs them (fake ComfyUI modules: tests/nodes/conftest.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import prefalign_pack

ROOT = Path(prefalign_pack.__file__).resolve().parent
import prefalign_pack.trainer.data.synthetic as synthetic  # noqa: E402
STORE_NODES = ("PrefAlignAddPair", "PrefAlignLoadStore", "PrefAlignGalleryPicker", "PrefAlignExportParquet",
               "PrefAlignImportParquet")


def images(*values, size=16):
    return torch.stack([torch.full((size, size, 3), v / 255.0) for v in values])


def pickapic(path: Path, n: int, **kwargs) -> Path:
    return synthetic.write_parquet(path, synthetic.pickapic_rows(n, size=16, **kwargs), row_group_size=8)


@pytest.fixture
def nodes(pack, monkeypatch):
    monkeypatch.delenv("PREFALIGN_DATASETS_DIR", raising=False)
    return {key: cls() for key, cls in pack.NODE_CLASS_MAPPINGS.items()}


def stores(comfy_folders) -> list[str]:
    return prefalign_pack.nodes.pair_store.list_stores(comfy_folders["user"] / "prefalign_stores")


def load_dataset(nodes, source):
    return nodes["PrefAlignPairsFromDataset"].load(source, "train", 0, -1, False, False)


# -- item 4: every path a graph supplies stays inside the data roots ----------------------------------------


@pytest.fixture
def outside(comfy_folders):
    """A readable Pick-a-Pic file outside ComfyUI's input folder, and a symlink to its folder from inside."""
    folder = comfy_folders["input"].parent / "outside"
    pickapic(folder / "secret_pairs.parquet", 4)
    (comfy_folders["input"] / "link").symlink_to(folder, target_is_directory=True)
    return folder


def escapes(outside: Path) -> list[str]:
    """Ways out of the input folder, each to a file that exists and to one that does not."""
    return [str(outside / "secret_pairs.parquet"), str(outside / "nothing.parquet"),
            "../outside/secret_pairs.parquet", "../outside/nothing.parquet",
            "link/secret_pairs.parquet", "link/nothing.parquet", "sub/../../outside/secret_pairs.parquet"]


def _without_quoted(message: str) -> str:
    return re.sub(r"'[^']*'", "'…'", message)


def test_import_parquet_reads_only_inside_the_data_roots(nodes, comfy_folders, outside):
    """Import Parquet read `/anything/secret_pairs.parquet` and `../../outside/…` (and Export + /view sent
    them back over HTTP). Now every way out is refused, with one message whether or not the file exists."""
    messages = set()
    for text in escapes(outside):
        with pytest.raises(ValueError, match="is outside the folders PrefAlign reads data from") as e:
            nodes["PrefAlignImportParquet"].import_(text, "stolen", False)
        messages.add(_without_quoted(str(e.value)))
        refused = type(nodes["PrefAlignImportParquet"]).VALIDATE_INPUTS(text, "stolen")
        assert isinstance(refused, str) and "is outside the folders" in refused  # refused when queued
    assert len(messages) == 1, messages
    assert str(outside) not in messages.pop()
    assert stores(comfy_folders) == []


def test_pairs_from_dataset_reads_only_inside_the_data_roots(nodes, pack, comfy_folders, outside):
    messages = set()
    for text in escapes(outside):
        with pytest.raises(ValueError, match="is outside the folders PrefAlign reads data from") as e:
            load_dataset(nodes, text)
        messages.add(_without_quoted(str(e.value)))
        refused = pack.NODE_CLASS_MAPPINGS["PrefAlignPairsFromDataset"].VALIDATE_INPUTS(text)
        assert isinstance(refused, str) and "is outside the folders" in refused  # refused when queued
    assert len(messages) == 1, messages


def test_configured_datasets_folders_are_data_roots(nodes, pack, comfy_folders, monkeypatch, tmp_path):
    """$PREFALIGN_DATASETS_DIR (several, os.pathsep-separated) and extra_model_paths.yaml's
    `prefalign_datasets` add data roots; relative paths are looked up in each."""
    env_a, env_b, yaml_dir = tmp_path / "ds_a", tmp_path / "ds_b", tmp_path / "ds_yaml"
    pickapic(env_b / "b.parquet", 3)
    pickapic(yaml_dir / "y.parquet", 5)
    env_a.mkdir()
    monkeypatch.setenv("PREFALIGN_DATASETS_DIR", os.pathsep.join([str(env_a), str(env_b)]))
    monkeypatch.setattr(sys.modules["folder_paths"], "folder_names_and_paths",
                        {"prefalign_datasets": ([str(yaml_dir)], set())}, raising=False)
    assert load_dataset(nodes, "b.parquet")[1] == 3
    assert load_dataset(nodes, str(yaml_dir / "y.parquet"))[1] == 5
    assert nodes["PrefAlignImportParquet"].import_("y.parquet", "s", False)["result"] == (5,)
    with pytest.raises(ValueError, match="is outside the folders"):
        load_dataset(nodes, str(tmp_path / "elsewhere.parquet"))
    with pytest.raises(ValueError, match=r"not found in ComfyUI's input folder and 3 datasets folders"):
        load_dataset(nodes, "nothing.parquet")
    assert type(nodes["PrefAlignImportParquet"]).VALIDATE_INPUTS("y.parquet", "s") is True
    assert "parquet_path 'nothing.parquet' not found in" in type(nodes["PrefAlignImportParquet"]).VALIDATE_INPUTS(
        "nothing.parquet", "s")


# -- items 16 and 22: results shown on the node, messages without server paths --------------------------


def test_store_nodes_show_their_result_on_the_node(nodes, comfy_folders):
    """Issue 13 item 16: ComfyUI's frontend ignores ui.text; the pack's widget renders ui.prefalign_text."""
    out = nodes["PrefAlignAddPair"].add(images(200, 210), images(20), "a prompt", "art")
    assert out["ui"] == {"prefalign_text": ["added 2 pairs; store 'art' holds 2"]} and out["result"] == (2,)
    out = nodes["PrefAlignLoadStore"].load("art")
    assert out["ui"] == {"prefalign_text": ["loaded 2 pairs from store 'art'"]} and out["result"][1] == 2
    out = nodes["PrefAlignExportParquet"].export("art", "art.parquet")
    assert out["ui"] == {"prefalign_text": ["wrote 2 pairs to output/prefalign/art.parquet"]}
    (comfy_folders["input"] / "art.parquet").write_bytes(Path(out["result"][0]).read_bytes())
    out = nodes["PrefAlignImportParquet"].import_("art.parquet", "copy", False)
    assert out["ui"] == {"prefalign_text": ["added 2 of 2 pairs from input/art.parquet to store 'copy'; it holds 2"]}
    out = nodes["PrefAlignImportParquet"].import_("art.parquet", "copy", False)
    assert out["ui"] == {"prefalign_text": ["added 0 of 2 pairs from input/art.parquet to store 'copy', "
                                            "2 already in the store"]} and out["result"] == (0,)


def test_non_parquet_import_names_the_file_and_leaves_no_store(nodes, comfy_folders):
    """Issue 13 item 22: pyarrow's "magic bytes" message without the file name, and an empty store left behind."""
    (comfy_folders["input"] / "photo.parquet").write_bytes(b"\xff\xd8\xff\xe0 a jpeg, not a parquet file")
    with pytest.raises(ValueError, match=r"^input/photo\.parquet: not a readable parquet file") as e:
        nodes["PrefAlignImportParquet"].import_("photo.parquet", "newstore", False)
    assert str(comfy_folders["input"].parent) not in str(e.value)
    assert not (comfy_folders["user"] / "prefalign_stores" / "newstore").exists()


def test_messages_name_files_relative_to_comfyui_folders(nodes, comfy_folders, monkeypatch, tmp_path):
    """Issue 14 item 16: error messages showed the server's absolute paths."""
    rows = synthetic.pickapic_rows(3, size=16)
    rows[2]["label_0"] = 0.7
    synthetic.write_parquet(comfy_folders["input"] / "sub" / "labels.parquet", rows)
    for run in (lambda: load_dataset(nodes, "sub/labels.parquet"),
                lambda: nodes["PrefAlignImportParquet"].import_("sub/labels.parquet", "s", False)):
        with pytest.raises(ValueError, match=r"^input/sub/labels\.parquet row 2: label_0=0\.7") as e:
            run()
        assert str(tmp_path) not in str(e.value)
    monkeypatch.setenv("PREFALIGN_STORE_DIR", str(tmp_path / "elsewhere"))
    nodes["PrefAlignAddPair"].add(images(1), images(2), "p", "s")
    store = prefalign_pack.nodes.pair_store.PairStore(tmp_path / "elsewhere", "s")
    store.image_path(store.pairs()[0]["chosen"]).unlink()
    with pytest.raises(ValueError, match=r"^store 's', pair 1: the chosen image file images/../[0-9a-f]{64}\.png is missing") as e:
        nodes["PrefAlignLoadStore"].load("s")
    assert str(tmp_path) not in str(e.value)


def test_redact_rewrites_only_whole_folder_paths(pack, comfy_folders):
    paths = pack.nodes.paths
    inp = str(comfy_folders["input"])
    assert paths.redact(f"{inp}/a.parquet row 3; {inp}2/b; '{inp}'") == f"input/a.parquet row 3; {inp}2/b; 'input'"
    assert paths.display_path(comfy_folders["output"] / "prefalign" / "x.parquet") == "output/prefalign/x.parquet"
    assert paths.display_path("/somewhere/else/y.parquet") == "y.parquet"


# -- item 19: typos, unknown stores, invalid names ----------------------------------------------------------


@pytest.fixture
def hub_calls(pack, monkeypatch):
    """Every Hugging Face load the dataset node makes, answered as an unreachable hub would."""
    calls = []

    def refuse(source, *args, **kwargs):
        calls.append(source)
        raise ConnectionError("hub unreachable\nretrying...")

    sources = sys.modules[pack.__name__ + ".trainer.data.sources"]
    monkeypatch.setattr(sources, "HFSource", refuse)
    monkeypatch.setattr(sources, "HFStreamSource", refuse)
    return calls


@pytest.mark.parametrize("typo", ["pickapic.parquet", "my_pairs", "data/pairs.jsonl", "a/b/c", "./owner/name",
                                  "owner/a..b"])
def test_dataset_typo_says_where_it_looked_without_asking_the_hub(nodes, comfy_folders, hub_calls, typo):
    """A local path typo waited 26 s for the hub and showed its error; now: the folders searched, at once."""
    with pytest.raises(ValueError, match=rf"^dataset '{re.escape(typo)}' not found in ComfyUI's input folder; "
                                         "a Hugging Face dataset id is owner/name"):
        load_dataset(nodes, typo)
    assert hub_calls == []


def test_hub_ids_go_to_the_hub_after_the_local_folders(nodes, comfy_folders, hub_calls):
    with pytest.raises(ValueError, match=r"^'owner/name' is not in ComfyUI's input folder; owner/name: cannot be "
                                         r"loaded as a Hugging Face dataset \(ConnectionError: hub unreachable\)$"):
        load_dataset(nodes, "owner/name")
    with pytest.raises(ValueError, match=r"^canonical: cannot be loaded as a Hugging Face dataset "
                                         r"\(ConnectionError: hub unreachable\)$"):
        load_dataset(nodes, "hf:canonical")
    assert hub_calls == ["owner/name", "canonical"]
    pickapic(comfy_folders["input"] / "owner" / "name" / "train.parquet", 4)  # a local folder of that name wins
    assert load_dataset(nodes, "owner/name")[1] == 4 and len(hub_calls) == 2


@pytest.mark.parametrize("key", STORE_NODES)
def test_store_names_are_checked_when_the_graph_is_queued(pack, key):
    """An invalid store name was refused only after the batch upstream had been generated."""
    cls = pack.NODE_CLASS_MAPPINGS[key]
    validate = (lambda store: cls.VALIDATE_INPUTS(None, store)) if key == "PrefAlignImportParquet" else cls.VALIDATE_INPUTS
    for bad in ("../x", "", "a/b", ".hidden", "a\nb"):
        assert "invalid store name" in validate(bad), bad
    assert validate("my-store_1.v2") is True
    assert validate(None) is True  # a linked input is checked when the node runs


def test_a_batch_that_cannot_give_pairs_says_so(nodes, comfy_folders):
    with pytest.raises(ValueError, match="a batch of 1 image gives 0 pairs"):
        nodes["PrefAlignGalleryPicker"].show(images(10), "one", "g")
    with pytest.raises(ValueError, match="0 pairs: chosen has 0 images"):
        nodes["PrefAlignAddPair"].add(images(1)[:0], images(2), "p", "g")
    assert stores(comfy_folders) == []
    rows = synthetic.pickapic_rows(4, size=16, tie_every=1)
    synthetic.write_parquet(comfy_folders["input"] / "ties.parquet", rows)
    with pytest.raises(ValueError, match=r"^input/ties\.parquet: no examples left after filtering \(4 rows read, "
                                         "4 ties dropped"):
        nodes["PrefAlignImportParquet"].import_("ties.parquet", "g", False)
    assert stores(comfy_folders) == []


# -- item 15: the Import node reports progress and honours Cancel -------------------------------------------


def test_import_node_reports_progress_and_cancel_adds_nothing(nodes, pack, comfy_folders, monkeypatch):
    monkeypatch.setattr(pack.nodes.pair_store, "IMPORT_CHUNK", 8)
    pickapic(comfy_folders["input"] / "pp.parquet", 20)
    calls = comfy_folders["calls"]
    assert nodes["PrefAlignImportParquet"].import_("pp.parquet", "s", False)["result"] == (20,)
    assert calls["progress"] == [(8, 20), (16, 20), (20, 20)]
    pickapic(comfy_folders["input"] / "more.parquet", 20, seed=1)
    calls["interrupt"] = True  # Cancel pressed
    with pytest.raises(sys.modules["prefalign_fake_comfy"].InterruptProcessingException):
        nodes["PrefAlignImportParquet"].import_("more.parquet", "s", False)
    assert pack.nodes.pair_store.PairStore(comfy_folders["user"] / "prefalign_stores", "s").count() == 20


# -- images: one check, only image formats ------------------------------------------------------------------


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def test_store_images_never_reach_other_decoders(nodes, monkeypatch):
    """The store opens images with `formats=`: EPS bytes never reach Pillow's EPS plugin (and Ghostscript)."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1) or 1 / 0)
    check = prefalign_pack.nodes.pair_store.check_image
    with pytest.raises(prefalign_pack.nodes.pair_store.StoreError, match="not a PNG, JPEG or WebP"):
        check(EPS)
    assert opened == []


# -- decompression bomb in an imported parquet cell ---------------------------------------------------------

BOMB = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("pk", sys.argv[1] + "/__init__.py", submodule_search_locations=[sys.argv[1]])
    pk = importlib.util.module_from_spec(spec); sys.modules["pk"] = pk; spec.loader.exec_module(pk)
    import pyarrow.parquet  # imports done before the baseline

    def peak():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

    base = peak()
    try:
        pk.nodes.pair_store.PairStore(sys.argv[3], "s").import_parquet(sys.argv[2])
        print("IMPORTED")
    except ValueError as e:
        print("REFUSED", e)
    print("GROWTH", peak() - base)
""")


@pytest.mark.skipif(not (ROOT / "trainer" / "data" / "parquet_pages.py").is_file(),
                    reason="needs the data-security branch's parquet cell-size check (trainer/data/parquet_pages.py, "
                           "issue 14 item 2): until it is merged ParquetSource materialises every cell")
def test_import_refuses_a_parquet_cell_bomb_before_materialising_it(tmp_path):
    """A few-KB zstd parquet whose jpg_0 cell inflates to 256 MB is refused naming file, row and column,
    with the import's peak memory growing far less than the cell."""
    import pyarrow.parquet as pq

    path = tmp_path / "bomb.parquet"
    writer = textwrap.dedent(f"""
        import pyarrow as pa, pyarrow.parquet as pq
        cell = bytes(256 * 2**20)
        pq.write_table(pa.table({{"caption": ["boom"], "jpg_0": pa.array([cell], pa.binary()),
                                  "jpg_1": pa.array([b"x"], pa.binary()), "label_0": [1.0], "label_1": [0.0]}}),
                       {str(path)!r}, compression="zstd")
    """)
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=120)  # the 256 MB live only in that process
    assert path.stat().st_size < 100_000 and pq.ParquetFile(path).metadata.num_rows == 1
    out = subprocess.run([sys.executable, "-c", BOMB, str(ROOT), str(path), str(tmp_path / "stores")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    refused = next(line for line in out.stdout.splitlines() if line.startswith(("REFUSED", "IMPORTED")))
    assert refused.startswith("REFUSED") and "bomb.parquet" in refused and "row 0" in refused and "jpg_0" in refused
    growth = int(out.stdout.split("GROWTH")[1])
    assert growth < 100 * 2**20, f"peak memory grew {growth / 2**20:.0f} MiB for a refused cell"
