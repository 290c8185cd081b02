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
    with pytest.raises(StoreError, match="chosen: image is not a PNG, JPEG or WebP"):
        s.add_pair("p", b"not an image", png(1))
    with pytest.raises(StoreError, match="rejected: image does not decode"):
        s.add_pair("p", png(1), png(2)[:-40])  # truncated inside the pixel data
    big = Image.new("RGB", (5000, 4000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(StoreError, match="outside the limit"):
        s.add_pair("p", buf.getvalue(), png(1))
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(StoreError, match="not a PNG, JPEG or WebP"):
        s.add_pair("p", gif.getvalue(), png(1))
    assert s.count() == 0
    assert not (tmp_path / "lim").exists()  # nothing written for refused images, not even an empty store


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
    assert t.import_parquet(out).added == 3
    assert [e.prompt for e in t.examples()] == ["prompt 0", "prompt 1", "prompt 2"]
    assert Path(t.examples()[0].images[0]).read_bytes() == png(10)


def test_import_swaps_losers_and_drops_ties(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pp.parquet"
    pq.write_table(pa.table({"caption": ["a", "b", "c"], "jpg_0": [png(1), png(2), png(3)],
                             "jpg_1": [png(4), png(5), png(6)], "label_0": [1.0, 0.0, 0.5], "label_1": [0.0, 1.0, 0.5]}), path)
    s = PairStore(tmp_path, "imp")
    done = s.import_parquet(path)
    assert (done.rows, done.added, done.ties_dropped) == (2, 2, 1)
    ex = s.examples()
    assert Path(ex[1].images[0]).read_bytes() == png(5)  # label_0 = 0: jpg_1 won
    again = s.import_parquet(path, keep_ties=True)  # only the tie is new
    assert (again.rows, again.added, again.already_there) == (3, 1, 2) and s.count() == 3
    assert Path(s.examples()[2].images[0]).read_bytes() == png(3)  # a kept tie: jpg_0 first


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


def test_delete_pair_only_from_its_source(tmp_path):
    s = PairStore(tmp_path, "del")
    manual, judged = s.add_pair("x", png(1), png(2)), s.add_pair("y", png(3), png(4), source="compare")
    assert not s.delete_pair(manual, source="compare") and not s.delete_pair(99, source="compare")
    assert s.delete_pair(judged, source="compare") and not s.delete_pair(judged)
    assert [p["id"] for p in s.pairs()] == [manual]


def pickapic(path: Path, n: int, bad_row: int | None = None, row_group_size: int = 8) -> Path:
    """A Pick-a-Pic style parquet of n distinct pairs (jpg_0 wins); `bad_row`'s loser does not decode."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    losers = [png(1000 + 2 * i + 1) for i in range(n)]
    if bad_row is not None:
        losers[bad_row] = png(1)[:-40]  # cut inside its pixel data
    pq.write_table(pa.table({"caption": [f"p{i}" for i in range(n)], "jpg_0": [png(1000 + 2 * i) for i in range(n)],
                             "jpg_1": losers, "label_0": [1.0] * n, "label_1": [0.0] * n}), path,
                   row_group_size=row_group_size)
    return path


def test_import_is_all_or_nothing_and_names_the_row(tmp_path):
    """Issue 14 item 7: a bad image at row 15 adds nothing (was: 15 pairs, and a retry 30) and names the row."""
    stores = tmp_path / "stores"
    s = PairStore(stores, "art")
    s.add_pair("mine", png(1), png(2))
    bad = pickapic(tmp_path / "bad.parquet", 20, bad_row=15)
    with pytest.raises(StoreError, match=r"bad\.parquet row 15, rejected: image does not decode"):
        s.import_parquet(bad)
    assert s.count() == 1
    fresh = PairStore(stores, "fresh")
    with pytest.raises(StoreError, match="row 15"):
        fresh.import_parquet(bad)
    assert store_mod.list_stores(stores) == ["art"]  # the failed import created no store
    good = pickapic(tmp_path / "good.parquet", 20)
    assert s.import_parquet(good).added == 20
    again = s.import_parquet(good)  # the retry of a finished import: idempotent by content
    assert (again.added, again.already_there) == (0, 20) and s.count() == 21
    assert sorted(e.prompt for e in s.examples()) == sorted(["mine"] + [f"p{i}" for i in range(20)])


def test_import_progress_cancel_and_store_stays_writable(tmp_path, monkeypatch):
    """Issue 14 item 15: chunked import reporting progress; an exception from the progress hook (ComfyUI's
    Cancel) adds nothing; while rows are staged the store takes other writes (no lock held for hours)."""
    monkeypatch.setattr(store_mod, "IMPORT_CHUNK", 4)
    path = pickapic(tmp_path / "pp.parquet", 10)
    s = PairStore(tmp_path, "s")
    s.add_pair("before", png(1), png(2))
    seen = []

    def progress(done, total):
        seen.append((done, total))
        PairStore(tmp_path, "s", busy_timeout=0.5).add_pair(f"during {done}", png(3 + done), png(50 + done))

    assert s.import_parquet(path, progress=progress).added == 10
    assert seen == [(4, 10), (8, 10), (10, 10)]
    assert s.count() == 1 + 3 + 10

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done >= 8:
            raise Cancelled

    other = pickapic(tmp_path / "other.parquet", 10)
    with pytest.raises(Cancelled):
        PairStore(tmp_path, "s").import_parquet(other, progress=cancel)
    with pytest.raises(Cancelled):
        PairStore(tmp_path, "new").import_parquet(other, progress=cancel)
    assert s.count() == 14 and store_mod.list_stores(tmp_path) == ["s"]


def test_version_1_store_is_upgraded_and_deduplicated(tmp_path):
    """A store written before imports were idempotent keeps its pairs, minus the copies a retried import added."""
    s = PairStore(tmp_path, "old")
    s.add_pair("kept", png(1), png(2))
    path = pickapic(tmp_path / "pp.parquet", 3)
    s.import_parquet(path)
    with sqlite3.connect(s.db_path) as con:  # back to version 1: no unique index or counter, a retry's copies
        for drop in ("INDEX pairs_imported", "TRIGGER pairs_added", "TRIGGER pairs_removed", "TABLE counts"):
            con.execute(f"DROP {drop}")
        con.execute("PRAGMA user_version = 0")
        con.execute("INSERT INTO pairs (prompt, chosen, rejected, source, created) "
                    "SELECT prompt, chosen, rejected, source, created FROM pairs WHERE source GLOB 'import *'")
        con.execute("INSERT INTO pairs (prompt, chosen, rejected, source, created) "
                    "SELECT prompt, chosen, rejected, source, created FROM pairs WHERE prompt = 'kept'")
    assert s.count() == 8  # read as it is: reads never write, so never upgrade
    assert s.import_parquet(path).added == 0  # the first write upgrades the store
    assert sorted(e.prompt for e in s.examples()) == ["kept", "kept", "p0", "p1", "p2"]  # only imports deduplicated
    assert s.count() == 5
    s.delete_pair(1)
    assert s.count() == 4 == len(s.pairs())


def test_missing_image_files_are_refused_with_store_pair_and_file(tmp_path):
    """Issue 14 item 8: marking, loading for training and export name the store, pair and file."""
    s = PairStore(tmp_path, "gone")
    s.add_pair("a", png(1), png(2))
    batch = s.add_batch("b", [png(3), png(4), png(5)])
    s.set_mark(batch, 0, "chosen")
    sha = lambda data: __import__("hashlib").sha256(data).hexdigest()  # noqa: E731
    s.image_path(sha(png(4))).unlink()
    with pytest.raises(store_mod.MissingImageError,
                       match=rf"store 'gone', batch {batch}, image 1: image file images/{sha(png(4))[:2]}/{sha(png(4))}\.png is missing"):
        s.set_mark(batch, 1, "rejected")
    assert s.count() == 1 and s.batch_state(batch)["marks"] == ["chosen", "none", "none"]
    s.set_mark(batch, 2, "rejected")  # the batch's other images still pair
    assert s.count() == 2
    s.image_path(sha(png(2))).unlink()
    with pytest.raises(store_mod.MissingImageError,
                       match=rf"store 'gone', pair 1: the rejected image file images/../{sha(png(2))}\.png is missing"):
        s.examples()
    out = tmp_path / "out.parquet"
    with pytest.raises(store_mod.MissingImageError, match="pair 1"):
        s.export_parquet(out)
    assert not out.exists() and list(tmp_path.glob("*.tmp")) == []


def test_tampered_records_are_refused(tmp_path):
    """Issue 14 item 12: stored image names are checked against the sha256 rule before any path is built."""
    s = PairStore(tmp_path / "stores", "t")
    s.add_pair("a", png(1), png(2))
    batch = s.add_batch("b", [png(3), png(4)])
    with sqlite3.connect(s.db_path) as con:
        con.execute("UPDATE pairs SET chosen = '../../../secret'")
        con.execute("UPDATE batches SET images = ?", ('["../../../secret", "' + "0" * 64 + '"]',))
    with pytest.raises(store_mod.StoreDamagedError, match="'../../../secret' is not a sha256 digest"):
        s.examples()
    with pytest.raises(store_mod.StoreDamagedError, match=f"batch {batch} does not list image names"):
        s.batch_image(batch, 0)
    with sqlite3.connect(s.db_path) as con:
        con.execute("UPDATE batches SET images = ?", ("[" * 5000 + "]" * 5000,))  # deeper than Python's stack
    with pytest.raises(store_mod.StoreDamagedError):
        s.set_mark(batch, 0, "chosen")


def test_batch_pairs_and_image_addresses_come_from_the_batch_record(tmp_path, monkeypatch):
    """A batch's image addresses and a pair of two of its images are read from its record (the files are named by
    their sha256 and were checked when the batch was added): no image is read back, decoded or hashed again."""
    import hashlib

    s = PairStore(tmp_path, "b")
    batch = s.add_batch("a fox", [png(3), png(4), png(5)])
    expected = [hashlib.sha256(png(i)).hexdigest() for i in (3, 4, 5)]
    monkeypatch.setattr(store_mod, "check_image", lambda data: pytest.fail("an image was decoded again"))
    monkeypatch.setattr(hashlib, "sha256", lambda data=b"": pytest.fail("an image was hashed again"))
    assert s.batch_shas(batch) == expected
    pid = s.add_batch_pair(batch, 2, 0, source="compare")
    (pair,) = s.pairs()
    assert (pair["id"], pair["prompt"], pair["source"], pair["batch"]) == (pid, "a fox", "compare", None)
    assert s.image_path(pair["chosen"]).read_bytes() == png(5) and s.image_path(pair["rejected"]).read_bytes() == png(3)
    s.set_mark(batch, 1, "chosen")
    s.set_mark(batch, 1, "none")  # the batch's marks make and remove their own pairs only
    assert [p["id"] for p in s.pairs()] == [pid]
    with pytest.raises(StoreError, match="index 3 is outside the batch of 3"):
        s.add_batch_pair(batch, 3, 0)
    with pytest.raises(StoreError, match="no batch"):
        s.add_batch_pair("0" * 32, 1, 0)
    s.image_path(s.batch_shas(batch)[1]).unlink()
    for missing in (lambda: s.batch_shas(batch), lambda: s.add_batch_pair(batch, 0, 1)):
        with pytest.raises(store_mod.MissingImageError, match=rf"store 'b', batch {batch}, image 1: image file .* is missing"):
            missing()
    assert s.count() == 1


@pytest.mark.parametrize("name", ["art\n", "art\r", "art\n\n", "\nart"])
def test_store_names_are_matched_whole(tmp_path, name):
    """Issue 14 item 11: `$` accepted a trailing newline (`art%0a`)."""
    with pytest.raises(StoreError, match="invalid store name"):
        store_mod.check_store_name(name)
    (tmp_path / name).mkdir()
    (tmp_path / name / "pairs.sqlite").write_bytes(b"")
    assert store_mod.list_stores(tmp_path) == []


def test_unknown_store_lists_the_existing_ones(tmp_path):
    """Issue 13 item 19 (and 14 item 16: the message names stores, never the server folder)."""
    with pytest.raises(StoreError, match=r"no pair store named 'x'; no stores exist yet") as e:
        PairStore(tmp_path, "x", create=False)
    PairStore(tmp_path, "cats").add_pair("a", png(1), png(2))
    PairStore(tmp_path, "dogs").add_pair("a", png(1), png(2))
    with pytest.raises(StoreError, match=r"^no pair store named 'x'; existing stores: cats, dogs$") as e:
        PairStore(tmp_path, "x", create=False)
    assert str(tmp_path) not in str(e.value)


def test_batch_state_says_why_there_are_no_pairs(tmp_path):
    """Issue 13 item 19: a batch that gives 0 pairs says so."""
    s = PairStore(tmp_path, "g")
    batch = s.add_batch("p", [png(1), png(2), png(3)])
    assert s.batch_state(batch)["message"] == "0 pairs yet: mark at least one image chosen and one rejected"
    assert s.set_mark(batch, 0, "chosen")["message"] == "0 pairs: mark at least one image rejected"
    s.set_mark(batch, 0, "none")
    assert s.set_mark(batch, 1, "rejected")["message"] == "0 pairs: mark at least one image chosen"
    assert s.set_mark(batch, 2, "chosen")["message"] == "1 pair from this batch (1 chosen x 1 rejected)"


def test_a_mark_does_the_same_work_in_a_large_store(tmp_path, monkeypatch):
    """Issue 14 item 5: a mark on a store of 10^6 pairs took ~2 s (a COUNT(*) over every pair for the total,
    each mark and each IS_CHANGED). Counted in SQLite VM instructions (deterministic, unlike time): a mark,
    its batch state and the fingerprint cost about the same in a store 50x larger."""
    import hashlib

    def filled(name, n):
        s = PairStore(tmp_path, name)
        batch = s.add_batch("p", [png(1), png(2), png(3)])
        sha = hashlib.sha256(png(1)).hexdigest()
        with sqlite3.connect(s.db_path) as con:
            con.executemany("INSERT INTO pairs (prompt, chosen, rejected, source, created) VALUES (?, ?, ?, 'manual', 0)",
                            ((f"prompt {i}", sha, sha) for i in range(n)))
        return s, batch

    steps = [0]
    connect = sqlite3.connect

    def counting(*args, **kwargs):
        con = connect(*args, **kwargs)
        con.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1), 100)  # one tick per 100 VM steps
        return con

    def work(s, batch):
        monkeypatch.setattr(store_mod.sqlite3, "connect", counting)
        steps[0] = 0
        s.set_mark(batch, 0, "chosen")
        state = s.set_mark(batch, 1, "rejected")
        s.fingerprint()
        monkeypatch.setattr(store_mod.sqlite3, "connect", connect)
        return steps[0], state

    small, large = filled("small", 1_000), filled("large", 50_000)
    (few, small_state), (many, large_state) = work(*small), work(*large)
    assert small_state["total_pairs"] == 1_001 and large_state["total_pairs"] == 50_001
    assert small[0].count() == 1_001 and large[0].fingerprint() == "large:50001:50001"
    assert many < 2 * few, f"{many} vs {few} (x100 VM steps)"
