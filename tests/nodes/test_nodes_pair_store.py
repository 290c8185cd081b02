"""The pair store: records, images, gallery marks, parquet round trip, names, concurrency, crash safety."""
from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prefalign_pack  # loaded by tests/nodes/conftest.py the way ComfyUI loads the pack

ROOT = Path(prefalign_pack.__file__).resolve().parent
store_mod = prefalign_pack.nodes.pair_store
PairStore, StoreError = store_mod.PairStore, store_mod.StoreError


def png(value: int, size: int = 16) -> bytes:
    arr = np.full((size, size, 3), value % 256, np.uint8)
    arr[0, 0] = (value // 256) % 256  # distinct content for distinct values
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_add_and_load_pairs(tmp_path):
    s = PairStore(tmp_path, "mine")
    pid = s.add_pair("a cat", png(1), png(2))
    assert pid == 1 and s.count() == 1
    (ex,) = s.examples()
    assert ex.prompt == "a cat" and ex.labels == (1.0, 0.0) and ex.is_pair
    assert Path(ex.images[0]).read_bytes() == png(1)
    assert Path(ex.images[1]).read_bytes() == png(2)
    # reopen: same data; identical images are stored once
    s2 = PairStore(tmp_path, "mine", create=False)
    s2.add_pair("a dog", png(1), png(3))
    assert s2.count() == 2
    assert len(list((tmp_path / "mine" / "images").rglob("*.png"))) == 3


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", "a\\b", ".hidden", "x" * 65, "a..b", "/abs", "nul\x00", "é"])
def test_bad_store_names_rejected(tmp_path, name):
    with pytest.raises(StoreError):
        PairStore(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_missing_store_not_created(tmp_path):
    with pytest.raises(StoreError, match="no pair store"):
        PairStore(tmp_path, "nothere", create=False)
    assert not (tmp_path / "nothere").exists()


def test_image_limits(tmp_path):
    s = PairStore(tmp_path, "lim")
    with pytest.raises(StoreError, match="does not decode"):
        s.add_pair("p", b"not an image", png(1))
    big = Image.new("RGB", (5000, 4000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(StoreError, match="outside the limit"):
        s.add_pair("p", buf.getvalue(), png(1))
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(StoreError, match="unsupported"):
        s.add_pair("p", gif.getvalue(), png(1))
    assert s.count() == 0


def test_gallery_marks_make_every_pairing(tmp_path):
    s = PairStore(tmp_path, "g")
    batch = s.add_batch("a fox", [png(i) for i in range(5)])
    s.set_mark(batch, 0, "chosen")
    s.set_mark(batch, 1, "chosen")
    s.set_mark(batch, 2, "rejected")
    state = s.set_mark(batch, 3, "rejected")
    assert state["marks"] == ["chosen", "chosen", "rejected", "rejected", "none"]
    assert state["pairs"] == 4
    got = {(p["chosen_idx"], p["rejected_idx"]) for p in s.pairs()}
    assert got == {(0, 2), (0, 3), (1, 2), (1, 3)}
    assert all(p["prompt"] == "a fox" and p["source"] == "gallery" for p in s.pairs())
    # idempotent, and un-marking removes that image's pairs; switching sides works
    s.set_mark(batch, 0, "chosen")
    assert s.count() == 4
    s.set_mark(batch, 3, "none")
    assert s.count() == 2
    s.set_mark(batch, 1, "rejected")
    assert {(p["chosen_idx"], p["rejected_idx"]) for p in s.pairs()} == {(0, 1), (0, 2)}
    # the pairs point at the right image files
    ex = s.examples()[0]
    assert Path(ex.images[0]).read_bytes() == png(0)
    with pytest.raises(StoreError):
        s.set_mark(batch, 5, "chosen")
    with pytest.raises(StoreError):
        s.set_mark(batch, 0, "best")
    with pytest.raises(StoreError):
        s.set_mark("0" * 32, 0, "chosen")
    with pytest.raises(StoreError):
        s.set_mark("../../x", 0, "chosen")


def test_parquet_round_trip(tmp_path):
    import pyarrow.parquet as pq

    s = PairStore(tmp_path / "stores", "src")
    for i in range(3):
        s.add_pair(f"prompt {i}", png(10 + i), png(20 + i))
    out = tmp_path / "export" / "pairs.parquet"
    assert s.export_parquet(out) == 3
    table = pq.read_table(out)
    assert table.column("caption").to_pylist() == ["prompt 0", "prompt 1", "prompt 2"]
    assert table.column("label_0").to_pylist() == [1.0] * 3
    assert table.column("jpg_0").to_pylist()[1] == png(11)
    # the trainer reads it as Pick-a-Pic (winner first)
    from prefalign_pack.trainer.data.sources import DataSpec, open_examples

    src = open_examples(DataSpec(source=str(out)))
    assert len(src) == 3 and src[2].prompt == "prompt 2"
    first = src[0].images[0]
    assert (first if isinstance(first, bytes) else Path(first).read_bytes()) == png(10)
    # and a store imports it back
    t = PairStore(tmp_path / "stores", "dst")
    assert t.import_parquet(out) == 3
    assert [e.prompt for e in t.examples()] == ["prompt 0", "prompt 1", "prompt 2"]
    assert Path(t.examples()[0].images[0]).read_bytes() == png(10)


def test_import_swaps_losers_and_drops_ties(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pp.parquet"
    pq.write_table(pa.table({"caption": ["a", "b", "c"], "jpg_0": [png(1), png(2), png(3)],
                             "jpg_1": [png(4), png(5), png(6)], "label_0": [1.0, 0.0, 0.5], "label_1": [0.0, 1.0, 0.5]}), path)
    s = PairStore(tmp_path, "imp")
    assert s.import_parquet(path) == 2
    ex = s.examples()
    assert Path(ex[1].images[0]).read_bytes() == png(5)  # label_0 = 0: jpg_1 won
    assert s.import_parquet(path, keep_ties=True) == 3


def _writer(args):
    base, worker, n = args
    s = store_mod.PairStore(base, "shared")
    for i in range(n):
        s.add_pair(f"w{worker} p{i}", png(worker * 1000 + i), png(worker * 1000 + i + 500))
    return n


def test_concurrent_writers(tmp_path):
    PairStore(tmp_path, "shared")
    with ProcessPoolExecutor(4) as pool:
        done = sum(pool.map(_writer, [(tmp_path, w, 15) for w in range(4)]))
    s = PairStore(tmp_path, "shared")
    assert done == 60 and s.count() == 60
    assert len({e.prompt for e in s.examples()}) == 60
    assert all(Path(p).is_file() for e in s.examples() for p in e.images)


def test_reopen_after_kill(tmp_path):
    script = textwrap.dedent(f"""
        import sys, io
        import importlib.util
        spec = importlib.util.spec_from_file_location("pk", {str(ROOT / '__init__.py')!r}, submodule_search_locations=[{str(ROOT)!r}])
        pk = importlib.util.module_from_spec(spec); sys.modules["pk"] = pk; spec.loader.exec_module(pk)
        import numpy as np
        from PIL import Image
        mod = pk.nodes.pair_store
        s = mod.PairStore({str(tmp_path)!r}, "crash")
        def png(v):
            a = np.random.default_rng(v).integers(0, 255, (64, 64, 3), dtype=np.uint8)
            b = io.BytesIO(); Image.fromarray(a).save(b, format="PNG"); return b.getvalue()
        i = 0
        while True:
            s.add_pair(f"p{{i}}", png(2 * i), png(2 * i + 1)); i += 1
            if i == 3:
                print("ready", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    s = PairStore(tmp_path, "crash")
    n = s.count()
    assert n >= 3
    with sqlite3.connect(s.db_path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for e in s.examples():  # every recorded pair's images are complete files
        for p in e.images:
            Image.open(p).load()
    s.add_pair("after", png(7), png(8))
    assert s.count() == n + 1


def test_fingerprint_changes(tmp_path):
    s = PairStore(tmp_path, "fp")
    a = s.fingerprint()
    s.add_pair("x", png(1), png(2))
    b = s.fingerprint()
    assert a != b
    s.delete_pair(1)
    assert s.fingerprint() not in (b,)
