"""The pair store: Import Parquet throughput, and how a gallery mark's time grows with the store.

Import: a synthetic Pick-a-Pic parquet of JPEG pairs is imported twice into fresh stores, interleaved:
once row by row through `add_pair` (one transaction and two checked image files per pair: what Import
Parquet did before it was batched) and once through `import_parquet` (images checked and written by a
thread pool, records staged and added in one transaction). Marks: a store is filled with N pairs (rows
only, all naming one image) and a gallery batch is marked repeatedly; the median time of a mark (what
POST /prefalign/mark runs), of the batch state (GET /prefalign/batch) and of the fingerprint
(Load Pair Store's IS_CHANGED). Results go to benchmarks/RESULTS.md, section `pair_store`.

    python benchmarks/pair_store.py [--pairs 400] [--size 512] [--repeats 2] [--store-sizes 10000,100000,1000000]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import load_pack, publish  # noqa: E402
from trainer.data.synthetic import noise_jpegs, write_parquet  # noqa: E402


def pickapic(path: Path, pairs: int, size: int) -> Path:
    images = noise_jpegs(2 * pairs, size)  # every image distinct: no file is written twice
    rows = [{"caption": f"prompt {i}", "jpg_0": images[2 * i], "jpg_1": images[2 * i + 1], "label_0": 1.0,
             "label_1": 0.0} for i in range(pairs)]
    return write_parquet(path, rows, row_group_size=100)


def row_by_row(store_mod, base: Path, path: Path) -> int:
    from trainer.data.parquet import ParquetSource

    store, source = store_mod.PairStore(base, "rows"), ParquetSource(path)
    for i in range(len(source)):
        ex = source[i]
        store.add_pair(ex.prompt, ex.images[0], ex.images[1], source=f"import {path.name}")
    return store.count()


def batched(store_mod, base: Path, path: Path) -> int:
    return store_mod.PairStore(base, "batched").import_parquet(path).added


def import_rows(store_mod, work: Path, pairs: int, size: int, repeats: int) -> tuple[str, list[str]]:
    path = pickapic(work / "pp.parquet", pairs, size)
    times: dict[str, list[float]] = {"row by row (add_pair)": [], "import_parquet": []}
    for _ in range(repeats):
        for name, fn in (("row by row (add_pair)", row_by_row), ("import_parquet", batched)):
            base = work / "stores"
            shutil.rmtree(base, ignore_errors=True)
            start = time.perf_counter()
            assert fn(store_mod, base, path) == pairs
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    head = (f"{pairs} pairs of {size} px JPEGs ({path.stat().st_size / 2**20:.1f} MiB parquet), each way {repeats} "
            f"times interleaved, fastest run; {store_mod.IMPORT_THREADS} checking threads.")
    lines = ["| import | seconds | pairs/s |", "|---|---:|---:|"]
    lines += [f"| {k} | {t:.2f} | {pairs / t:.0f} |" for k, t in best.items()]
    ratio = best["row by row (add_pair)"] / best["import_parquet"]
    lines.append(f"\nimport_parquet is {ratio:.1f}x as fast as the row-by-row path.")
    return head, lines


def fill(store, n: int) -> None:
    """n pair rows naming one image, written straight into the database (what matters is the row count)."""
    sha = hashlib.sha256(b"one").hexdigest()
    with sqlite3.connect(store.db_path) as con:
        con.execute("INSERT OR IGNORE INTO images VALUES (?, 1, 1, 0)", (sha,))
        con.executemany("INSERT INTO pairs (prompt, chosen, rejected, source, created) VALUES (?, ?, ?, 'manual', ?)",
                        ((f"a longish prompt number {i} with a few more words in it", sha, sha, float(i)) for i in range(n)))


def median_ms(fn, times: int = 15) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def marks(store_mod, work: Path, sizes: list[int]) -> tuple[str, list[str]]:
    from PIL import Image

    def png(v: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (v, v, v)).save(buf, format="PNG")
        return buf.getvalue()

    lines = ["| pairs in store | mark ms | batch state ms | fingerprint ms |", "|---:|---:|---:|---:|"]
    for n in sizes:
        base = work / f"marks-{n}"
        store = store_mod.PairStore(base, "big")
        batch = store.add_batch("p", [png(i) for i in range(4)])
        fill(store, n)
        flips = iter(range(10**6))
        mark = median_ms(lambda: store.set_mark(batch, next(flips) % 4, "chosen" if next(flips) % 2 else "rejected"))
        state = median_ms(lambda: store.batch_state(batch))
        fingerprint = median_ms(store.fingerprint)
        lines.append(f"| {n:,} | {mark:.1f} | {state:.1f} | {fingerprint:.1f} |")
        shutil.rmtree(base)
    head = ("Median of 15 calls on a warm page cache; synchronous=FULL, so a mark includes its fsyncs. The per-batch "
            "queries use the pairs table's (batch, chosen_idx, rejected_idx) index; the store's total is a counter kept by triggers.")
    return head, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--store-sizes", default="10000,100000,1000000")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    store_mod = load_pack().nodes.pair_store  # without ComfyUI: only the store is used
    with tempfile.TemporaryDirectory(prefix="prefalign-store-bench-") as tmp:
        import_head, import_lines = import_rows(store_mod, Path(tmp), args.pairs, args.size, args.repeats)
        marks_head, marks_lines = marks(store_mod, Path(tmp), [int(s) for s in args.store_sizes.split(",")])
    load = os.getloadavg()[0]
    body = "\n".join(["### Import Parquet", "", import_head, "", *import_lines, "", "### Marks", "", marks_head, "",
                      *marks_lines, "", f"Load average (1 min) at the end: {load:.1f} on {os.cpu_count()} logical CPUs."])
    publish("pair_store", body, write=not args.no_write)


if __name__ == "__main__":
    main()
