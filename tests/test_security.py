"""Hostile data in the trainer (issue 14): every attack is built by the test itself, a few KB on disk.

- EPS/PostScript never reaches Ghostscript (parquet cell, jsonl folder, HF dataset);
- parquet decompression bombs are refused from their page headers, within a memory ceiling;
- 16-bit PNG bombs are refused by decoded bytes or converted within a memory ceiling;
- image paths stay inside the dataset folder, with one message whether the outside file exists or not;
- dataset loading scripts never run;
- tampered checkpoints are skipped with a warning line, NaN ones never resumed nor called "last good".
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import EpsImagePlugin, Image
from safetensors.torch import load_file, save_file

from conftest import make_pairs, tiny_config
from trainer.checkpoint import (TrainingState, latest_checkpoint, list_checkpoints, load_checkpoint,
                                resolve_resume, save_checkpoint)
from trainer.data import BadImageError, DataError, DataSpec, ImageTransform, decode_image, open_examples
from trainer.data import hf as hf_module
from trainer.data.images import open_image
from trainer.data.parquet import BLOCK_BYTES, CACHE_BYTES, ParquetSource
from trainer.data.synthetic import encode, noise_jpegs, pickapic_rows, write_parquet

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


# --- files the attacks are made of -----------------------------------------------------------------

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"(/tmp/prefalign-eps-ran) (w) file closefile showpage\n%%EOF\n")  # PostScript Ghostscript would run


def png(width: int, height: int, bit_depth: int, colour_type: int, sample: bytes, level: int = 9) -> bytes:
    """A PNG whose every sample is `sample`, compressed row by row: never materialised whole."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\0" + sample * (width * channels)  # filter type 0, then the samples
    z = zlib.compressobj(level)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _i32(value: int) -> bytes:
    """The next field (id + 1) of a Thrift compact struct, an i32."""
    return bytes([1 << 4 | 5]) + _varint((value << 1) ^ (value >> 31))


def _data_page_header(uncompressed: int, compressed: int) -> bytes:
    """PageHeader{type DATA_PAGE, sizes, DataPageHeader{1 value, PLAIN, RLE, RLE}} in the compact protocol."""
    inner = _i32(1) + _i32(0) + _i32(3) + _i32(3) + b"\0"
    return _i32(0) + _i32(uncompressed) + _i32(compressed) + bytes([2 << 4 | 12]) + inner + b"\0"


def _zstd_zeros(prefix: bytes, n: int) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(prefix)
        block = bytes(2**20)
        for _ in range(n // len(block)):
            out.write(block)
        out.write(bytes(n % len(block)))
    return sink.getvalue().to_pybytes()


def parquet_bomb(path: Path, cell: int, claimed: int | None = None) -> Path:
    """A Pick-a-Pic parquet whose jpg_0 cell is `cell` zero bytes, zstd: ~40 KB on disk.

    pyarrow writes the file with an incompressible 40 KB cell; that page is then replaced, in
    place and at the same length, by a page holding the zeros (the zstd frame padded with a
    skippable frame), so the footer's offsets stay right. `claimed` makes the page header lie
    about the uncompressed size."""
    schema = pa.schema([("caption", pa.string()), pa.field("jpg_0", pa.binary(), nullable=False),
                        ("jpg_1", pa.binary()), ("label_0", pa.float64()), ("label_1", pa.float64())])
    cells = {"caption": ["x"], "jpg_0": [np.random.default_rng(0).bytes(40_000)], "jpg_1": [noise_jpegs(1, 8)[0]],
             "label_0": [1.0], "label_1": [0.0]}
    pq.write_table(pa.table(cells, schema=schema), path, compression="zstd", use_dictionary=False,
                   write_statistics=False)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(1)
    start, total = chunk.data_page_offset, chunk.total_compressed_size  # one page: its header and data
    frame = _zstd_zeros(struct.pack("<I", cell), cell)  # PLAIN: 4-byte length, then the bytes
    for header_len in range(8, 40):
        pad = total - header_len - len(frame) - 8
        header = _data_page_header(claimed if claimed is not None else cell + 4, len(frame) + 8 + pad)
        if len(header) == header_len:
            break
    data = bytearray(path.read_bytes())
    data[start:start + total] = header + frame + struct.pack("<II", 0x184D2A50, pad) + bytes(pad)
    path.write_bytes(bytes(data))
    return path


def dictionary_bomb(path: Path, rows: int, entry: int) -> Path:
    """Every row's jpg_0 refers to one `entry`-byte dictionary value: rows x entry bytes once dense."""
    jpg_0 = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array([bytes(entry)]))
    table = pa.table({"caption": ["x"] * rows, "jpg_0": jpg_0, "jpg_1": [b"y"] * rows,
                      "label_0": [1.0] * rows, "label_1": [0.0] * rows})
    pq.write_table(table, path, compression="zstd", dictionary_pagesize_limit=GiB, store_schema=False)
    return path


# --- peak memory, measured in a fresh interpreter ----------------------------------------------------

PROBE = """
import json, sys
from trainer.data import DataError, DataSpec, decode_image, open_examples

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

out = {}
for name, code in json.loads(sys.argv[1]).items():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before, scope = rss("VmRSS"), {"DataSpec": DataSpec, "decode_image": decode_image, "open_examples": open_examples}
    try:
        exec(code, scope)
        outcome = "ok " + str(scope.get("result"))
    except DataError as e:
        outcome = str(e)
    out[name] = [rss("VmHWM") - before, outcome]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def peaks(tmp_path_factory) -> dict[str, tuple[float, str]]:
    """Peak RSS growth (MiB) and outcome of reading each bomb, one fresh process for all of them."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS is read from Linux's /proc")
    tmp = tmp_path_factory.mktemp("bombs")
    (tmp / "grey16.png").write_bytes(png(8192, 8192, 16, 0, b"\x9c\x40"))  # 40000 of 65535 everywhere
    (tmp / "rgba16.png").write_bytes(png(8192, 8192, 16, 6, b"\x9c\x40", level=1))
    cases = {
        "parquet": f"open_examples(DataSpec({str(parquet_bomb(tmp / 'bomb.parquet', GiB))!r}))[0]",
        "lying header": f"open_examples(DataSpec({str(parquet_bomb(tmp / 'liar.parquet', GiB, claimed=1000))!r}))[0]",
        "dictionary": f"s = open_examples(DataSpec({str(dictionary_bomb(tmp / 'dict.parquet', 400, 4_000_000))!r}))\n"
                      "result = sum(len(s[i].images[0]) for i in range(0, len(s), 7))",
        "grey16": f"result = decode_image(open({str(tmp / 'grey16.png')!r}, 'rb').read(), 'x')[0].getpixel((9, 9))",
        "rgba16": f"decode_image(open({str(tmp / 'rgba16.png')!r}, 'rb').read(), 'x')",
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {k: (v[0], v[1]) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


# --- 1. only image formats are decoded: EPS never reaches Ghostscript ------------------------------------

@pytest.fixture
def ghostscript(monkeypatch) -> list:
    """Calls that reach Pillow's EPS plugin's Ghostscript runner (recorded instead of run)."""
    calls: list = []

    def record(tile, size, fp, scale=1, transparency=False):
        calls.append(size)
        return Image.new("RGB", size).im

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", record)
    return calls


def test_the_eps_probe_is_what_pillow_would_run(ghostscript):
    """Unrestricted, Pillow opens these bytes as EPS and hands them to Ghostscript: the fixture sees it."""
    with Image.open(io.BytesIO(EPS)) as img:
        assert img.format == "EPS"
        img.load()
    assert ghostscript == [(16, 16)]


def _eps_in_parquet(tmp_path: Path) -> DataSpec:
    rows = pickapic_rows(2)
    rows[0]["jpg_0"] = rows[0]["jpg_1"] = EPS
    return DataSpec(str(write_parquet(tmp_path / "d.parquet", rows)))


def _eps_in_jsonl_folder(tmp_path: Path) -> DataSpec:
    (tmp_path / "a.png").write_bytes(EPS)  # the name does not matter: formats are sniffed
    (tmp_path / "b.png").write_bytes(EPS)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a.png", "rejected": "b.png"}) + "\n")
    return DataSpec(str(tmp_path))


def _eps_in_hf_dataset(tmp_path: Path) -> DataSpec:
    datasets.Dataset.from_dict({"caption": ["p"], "jpg_0": [EPS], "jpg_1": [EPS], "label_0": [1.0],
                                "label_1": [0.0]}).save_to_disk(str(tmp_path / "saved"))
    return DataSpec(str(tmp_path / "saved"))


@pytest.mark.parametrize("make", [_eps_in_parquet, _eps_in_jsonl_folder, _eps_in_hf_dataset])
def test_eps_is_refused_before_ghostscript_could_run(tmp_path, ghostscript, make):
    example = open_examples(make(tmp_path))[0]
    with pytest.raises(BadImageError, match=r"image does not decode as any accepted format \(PNG, JPEG, WEBP\)"):
        ImageTransform(16)(example, False, None)
    assert ghostscript == []


def test_only_the_listed_formats_are_opened():
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert open_image(encode(Image.new("RGB", (4, 4)), fmt)).format == fmt
    for fmt in ("TIFF", "BMP", "GIF"):
        with pytest.raises(Image.UnidentifiedImageError):
            open_image(encode(Image.new("RGB", (4, 4)), fmt))
    with pytest.raises(TypeError):  # the list is not widened per call
        open_image(encode(Image.new("RGB", (4, 4)), "TIFF"), ("TIFF",))


# --- 2. parquet cells: checked from the page headers before they are read ---------------------------------

def test_a_one_gib_parquet_cell_is_refused_naming_file_row_and_column(tmp_path, peaks):
    path = parquet_bomb(tmp_path / "bomb.parquet", GiB)
    assert path.stat().st_size < 60_000
    growth, message = peaks["parquet"]
    assert message.endswith(f"bomb.parquet row 0, column 'jpg_0': a parquet page of {GiB + 4} bytes holds this "
                            "cell, above max_cell_bytes = 268435456 (decompression bomb?); raise max_cell_bytes to "
                            "read it"), message
    assert growth < 64, f"reading the refused bomb cost {growth:.0f} MiB"


def test_pyarrow_allocates_no_more_than_a_page_header_says(peaks):
    """A header that understates its page gets past our check, but not past pyarrow: it
    decompresses into a buffer of the stated size and fails, without allocating the rest."""
    growth, message = peaks["lying header"]
    assert "liar.parquet: row group 0 does not read (corrupt file?)" in message
    assert growth < 64, f"the lying page cost {growth:.0f} MiB"


def test_dictionary_pages_repeated_on_every_row_are_read_in_bounded_blocks(peaks):
    """400 rows share one 4 MB dictionary entry: 1.6 GB once dense, so the rows are read in blocks
    of at most BLOCK_BYTES, and the cache keeps CACHE_BYTES of them."""
    growth, outcome = peaks["dictionary"]
    assert outcome == f"ok {4_000_000 * len(range(0, 400, 7))}"
    bound = (CACHE_BYTES + 2 * BLOCK_BYTES) / 2**20 + 64
    assert growth < bound, f"reading the rows cost {growth:.0f} MiB"


def test_the_cell_limit_is_a_config_key_and_names_the_rows_of_a_shared_page(tmp_path):
    from trainer.config import make_config
    from trainer.run import open_config_examples

    path = write_parquet(tmp_path / "d.parquet", pickapic_rows(6), row_group_size=3)
    config = make_config({"model": "tiny-sd", "data": str(path), "max_cell_bytes": 1000})
    with pytest.raises(DataError, match=r"d\.parquet rows 0-2, column 'jpg_0': a parquet page of \d+ bytes holds this "
                                        r"cell, above max_cell_bytes = 1000"):
        open_config_examples(config)[0]
    assert len(open_config_examples(make_config({"model": "tiny-sd", "data": str(path)}))) > 0


def test_corrupt_page_headers_name_the_file_and_column(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", pickapic_rows(3))
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(1)
    data = bytearray(path.read_bytes())
    start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o)
    assert data[start] == 0x15 and data[start + 1] < 0x80  # field 1 (type), an i32 of one byte
    data[start + 1] = 9 << 1  # page type 9 does not exist
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{path} row 0 onwards, column 'jpg_0': page at byte {start} has "
                                        "unsupported page type 9"):
        open_examples(DataSpec(str(path)))[0]


@pytest.mark.parametrize("options", [dict(data_page_version="2.0"), dict(use_dictionary=False, write_batch_size=1,
                                                                         data_page_size=1, compression="snappy")])
def test_page_scan_reads_what_pyarrow_writes(tmp_path, options):
    """Version-2 pages, dictionaries, many pages a chunk: every row reads back as pyarrow reads it."""
    rows = pickapic_rows(9)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4, **options)
    source = ParquetSource(path, keep_ties=True)
    source.block_bytes = 1  # one row per read: the page map decides every block
    assert [source[i].prompt for i in range(len(source))] == [r["caption"] for r in rows]
    assert [set(source[i].images) for i in range(len(source))] == [{r["jpg_0"], r["jpg_1"]} for r in rows]


# --- 3. 16-bit PNGs: bounded by decoded bytes, converted without 64-bit copies -------------------------------

def test_a_16_bit_png_bomb_converts_within_a_memory_bound(peaks):
    """8192 x 8192 16-bit grey (0.15 MB of PNG): 128 MiB of samples, within the default limit."""
    growth, outcome = peaks["grey16"]
    assert outcome == "ok (156, 156, 156)"  # round(40000 / 257)
    assert growth < 128 + 256 + 128, f"decoding it cost {growth:.0f} MiB (samples 128 MiB + RGB copy 256 MiB)"


def test_a_16_bit_rgba_png_bomb_is_refused_by_decoded_bytes(peaks):
    growth, message = peaks["rgba16"]
    assert message == ("x: image is 8192x8192 RGBA and decodes to 536870912 bytes, above the limit of 268435456 "
                       "(decompression bomb?); raise max_image_bytes to accept it")
    assert growth < 64


def test_the_decoded_bytes_limit_counts_bands_and_sample_depth():
    eight = encode(Image.new("RGB", (64, 64)), "PNG")
    sixteen = png(64, 64, 16, 2, b"\x12\x34")
    decode_image(eight, "x", max_bytes=64 * 64 * 3)
    with pytest.raises(BadImageError, match="decodes to 24576 bytes, above the limit of 12288"):
        decode_image(sixteen, "x", max_bytes=64 * 64 * 3)


def test_image_limits_are_config_keys(tmp_path):
    from trainer.loop import train
    from trainer.run import make_backend

    config = tiny_config(tmp_path, max_steps=1, max_image_bytes=100)
    with pytest.raises(BadImageError, match="decodes to 3072 bytes, above the limit of 100.*max_image_bytes"):
        train(config, make_backend(config, torch.device("cpu")), make_pairs(2))


# --- 4. image paths stay inside the dataset folder -----------------------------------------------------------

@pytest.fixture
def outside(tmp_path) -> Path:
    """A secret image next to the dataset folder, and the folder with one image of its own."""
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "secret.png")
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "inside.png")
    return tmp_path


def _jsonl(folder: Path, chosen: str) -> DataSpec:
    (folder / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": chosen, "rejected": "inside.png"}) + "\n")
    return DataSpec(str(folder))


def test_jsonl_paths_outside_the_folder_are_refused_alike_whether_they_exist_or_not(outside):
    folder = outside / "data"
    (folder / "link.png").symlink_to(outside / "secret.png")
    messages = []
    for chosen in ("../secret.png", "../missing.png", str(outside / "secret.png"), str(outside / "missing.png"),
                   "link.png"):
        with pytest.raises(DataError) as refused:
            open_examples(_jsonl(folder, chosen))
        messages.append(str(refused.value).replace(chosen, "NAME"))
    assert messages[0] == (f"{folder / 'pairs.jsonl'} line 1: field 'chosen' 'NAME' is outside the dataset folder "
                           f"{folder}; set allow_outside_paths = true (--allow-outside-paths) to read images from "
                           "anywhere")
    assert len(set(messages)) == 1
    source = open_examples(DataSpec(str(folder), allow_outside_paths=True))
    assert source[0].images[0] == folder / "link.png"
    assert open_examples(_jsonl(folder, "inside.png"))[0].images[0] == folder / "inside.png"


def test_parquet_and_hf_path_cells_stay_inside_the_dataset_folder(outside, hf_cache):
    folder = outside / "data"
    rows = [{"caption": "p", "jpg_0": str(outside / "secret.png"), "jpg_1": "inside.png", "label_0": 1.0,
             "label_1": 0.0}]
    write_parquet(folder / "d.parquet", rows)
    with pytest.raises(DataError, match=r"d\.parquet row 0: column 'jpg_0' '.*secret\.png' is outside the dataset "
                                        "folder"):
        open_examples(DataSpec(str(folder)))[0]
    allowed = open_examples(DataSpec(str(folder), allow_outside_paths=True))[0]
    assert allowed.images == (outside / "secret.png", folder / "inside.png")

    (folder / "d.parquet").unlink()
    datasets.Dataset.from_list([{**rows[0], "jpg_0": {"bytes": None, "path": "../secret.png"}}]) \
        .save_to_disk(str(folder / "saved"))
    with pytest.raises(DataError, match=r"row 0: column 'jpg_0' '\.\./secret\.png' is outside the dataset folder"):
        open_examples(DataSpec(str(folder / "saved")))[0]


def test_allow_outside_paths_is_a_config_key_and_a_flag():
    from trainer.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--model", "tiny-sd", "--data", "x", "--allow-outside-paths"])
    assert config_from_args(args).allow_outside_paths is True


# --- 6. dataset scripts never run ----------------------------------------------------------------------------

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_a_dataset_loading_script_is_refused_and_never_runs(tmp_path, hf_cache):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "script-ran"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    (folder / "train.csv").write_text("caption,label_0\nx,1\n")  # data the script would read
    for source in (str(folder), f"hf:{folder}"):
        with pytest.raises(DataError, match=r"evil: holds a dataset loading script \(evil\.py\); PrefAlign never "
                                            "runs dataset code"):
            open_examples(DataSpec(source))
    assert not marker.exists()


def test_trust_remote_code_is_refused_where_datasets_asks(tmp_path, monkeypatch, hf_cache):
    """datasets 2.20 to 3.x take trust_remote_code (and may run a hub script with it); it is always False."""
    seen = {}

    def load_dataset(path, split=None, streaming=False, trust_remote_code=None):
        seen["trust_remote_code"] = trust_remote_code
        raise FileNotFoundError(path)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(FileNotFoundError):
        hf_module.load_hf("someone/dataset", "train", streaming=False)
    assert seen == {"trust_remote_code": False}


def test_datasets_is_pinned_to_a_version_that_never_runs_scripts_by_default():
    for text in ((ROOT / "pyproject.toml").read_text(), (ROOT / "requirements.txt").read_text()):
        assert '"datasets>=2.20"' in text or "\ndatasets>=2.20\n" in text


# --- 10. tampered checkpoints ---------------------------------------------------------------------------------

def small_state(step: int, value: float = 1.0) -> TrainingState:
    p = torch.nn.Parameter(torch.full((4,), value))
    optimizer = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(4)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return TrainingState(step, {"a.lora_A.default.weight": torch.full((2, 2), value)}, optimizer.state_dict(),
                         scheduler.state_dict(), torch.Generator().get_state(), {"epoch": 0, "row": step})


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _edit_state(folder: Path, edit) -> None:
    body = json.loads((folder / "state.json").read_text())
    edit(body)
    (folder / "state.json").write_text(body if isinstance(body, str) else json.dumps(body))


@pytest.mark.parametrize("edit, why", [
    (lambda b: b.update(files=[1]), "state.json's files is not the sizes of adapter.safetensors and state.safetensors"),
    (lambda b: b.update(step=-50), "state.json's step -50 is not a whole number 0 or more"),
    (lambda b: b.update(step="3"), "state.json's step '3' is not a whole number 0 or more"),
    (lambda b: b.update(step=2.5), "state.json's step 2.5 is not a whole number 0 or more"),
    (lambda b: b.update(step=7), "state.json says step 7, the folder's name step 3"),
    (lambda b: b.update(optimizer={"__dict__": [1]}), "state.json: optimizer holds a malformed entry"),
    (lambda b: b.update(data=[]), "state.json's data is not a saved state"),
    (lambda b: b["data"].update(row=float("nan")), "state.json: data.row is nan"),
    (lambda b: b.update(extra={"x": nested(34)}), "state.json nests deeper than 32 levels"),
    (lambda b: b.update(extra={"x": "[" * 10_000_000}), None),  # brackets in a string are no nesting
])
def test_a_tampered_state_json_is_skipped_with_a_warning(tmp_path, capsys, edit, why):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(root, small_state(step), keep=5)
    _edit_state(root / "step-3", edit)
    expected = ["step-1", "step-2"] if why else ["step-1", "step-2", "step-3"]
    assert [p.name for p in list_checkpoints(root)] == expected
    assert resolve_resume("latest", root).name == expected[-1]
    assert [p.name for p in list_checkpoints(root)] == expected
    err = capsys.readouterr().err
    if why:
        assert err == f"warning: skipping checkpoint {root / 'step-3'}: {why}\n"  # once per process
        with pytest.raises(ValueError, match=rf"step-3 is damaged and cannot be resumed from \({re.escape(why)}"):
            load_checkpoint(root / "step-3")
    else:
        assert err == "" and load_checkpoint(root / "step-3").step == 3


def test_json_nesting_that_would_exhaust_recursion_is_refused_before_parsing(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, small_state(1), keep=5)
    save_checkpoint(root, small_state(2), keep=5)
    (root / "step-2" / "state.json").write_text('{"step": 2, "extra": ' + "[" * 200_000 + "]" * 200_000 + "}")
    assert [p.name for p in list_checkpoints(root)] == ["step-1"]
    assert "state.json nests deeper than 32 levels" in capsys.readouterr().err


def test_negative_steps_are_never_saved(tmp_path):
    with pytest.raises(ValueError, match=r"cannot checkpoint a negative step \(-2\)"):
        save_checkpoint(tmp_path / "checkpoints", small_state(-2), keep=5)
    assert not (tmp_path / "checkpoints" / "step--2").exists()


def test_a_nan_checkpoint_is_never_resumed_nor_the_last_good_one(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, small_state(1), keep=5)
    save_checkpoint(root, small_state(2, value=float("nan")), keep=5)
    assert [p.name for p in list_checkpoints(root)] == ["step-1", "step-2"]  # complete, as files go
    assert latest_checkpoint(root).name == "step-1"
    assert resolve_resume("latest", root).name == "step-1"
    assert "warning: skipping checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"step-2 is damaged .*tensor a\.lora_A\.default\.weight holds NaN or "
                                         "infinite values"):
        load_checkpoint(root / "step-2")


def test_a_run_resumed_past_a_nan_checkpoint_names_the_finite_one_as_last_good(tmp_path, monkeypatch):
    from trainer import loop
    from trainer.loop import NonFiniteLossError, train
    from trainer.run import make_backend

    config = tiny_config(tmp_path, max_steps=2, checkpoint_every=1)
    train(config, make_backend(config, torch.device("cpu")), make_pairs(4))
    poisoned = tmp_path / "out" / "checkpoints" / "step-2"
    adapter = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(poisoned / "adapter.safetensors")).items()}
    size = (poisoned / "adapter.safetensors").stat().st_size
    save_file(adapter, str(poisoned / "adapter.safetensors"))
    assert (poisoned / "adapter.safetensors").stat().st_size == size  # still "complete" by its recorded sizes

    real_build = loop.build_method

    def build_method(name, args):  # every loss is NaN from here on
        method = real_build(name, args)
        real_loss = method.loss

        def loss(outputs):
            value, metrics = real_loss(outputs)
            return value * math.nan, {**metrics, "loss": value.detach() * math.nan}

        method.loss = loss
        return method

    monkeypatch.setattr(loop, "build_method", build_method)
    config = tiny_config(tmp_path, max_steps=3, checkpoint_every=1, resume="latest")
    with pytest.raises(NonFiniteLossError, match=r"at step 2; stopped\. Last good checkpoint: .*step-1\."):
        train(config, make_backend(config, torch.device("cpu")), make_pairs(4))
