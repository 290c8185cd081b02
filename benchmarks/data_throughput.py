"""Data-layer throughput: decode a synthetic Pick-a-Pic parquet through the loader.

Writes a synthetic parquet of small JPEG pairs in a temp folder, then reads one epoch of it
through `make_loader` (the loader training decodes with when it encodes every step or streams)
with 0, 1 and 2 DataLoader workers, both by random access (sampler) and streaming (row group by
row group). Each run is a fresh process so its peak RSS is its own.
Results go to benchmarks/RESULTS.md, section `data_throughput`.

    python benchmarks/data_throughput.py [--pairs 20000] [--workers 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import publish  # noqa: E402
from trainer.data import DataSpec, ImageTransform, make_loader, open_examples  # noqa: E402
from trainer.data.synthetic import pickapic_rows, write_parquet  # noqa: E402


class PeakMemory:
    """Samples, every `interval` s, the PSS of this process and of its (worker) children."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak_total, self.peak_main = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                main = me.memory_full_info().pss
                total = main + sum(c.memory_full_info().pss for c in me.children(recursive=True))
            except psutil.Error:  # a worker exited between listing and reading
                continue
            self.peak_main, self.peak_total = max(self.peak_main, main), max(self.peak_total, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_once(path: str, workers: int, streaming: bool, batch_size: int, resolution: int) -> dict:
    """One epoch through the loader in this process; returns timings and peak memory (MiB)."""
    memory = PeakMemory().__enter__()
    start = time.perf_counter()
    source = open_examples(DataSpec(path))
    opened = time.perf_counter()
    loader = make_loader(source, ImageTransform(resolution), seed=0, batch_size=batch_size,
                         num_workers=workers, streaming=streaming, random_flip=True)
    pairs, batches = 0, iter(loader)
    while pairs < len(source) - batch_size + 1:
        pairs += len(next(batches)["prompts"])
    elapsed = time.perf_counter() - opened
    memory.__exit__()
    del batches
    return {
        "open_s": opened - start,
        "pairs": pairs,
        "pairs_per_s": pairs / elapsed,
        "main_mib": memory.peak_main / 2**20,
        "total_mib": memory.peak_total / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20_000, help="pairs in the synthetic parquet")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--image-size", type=int, default=64, help="side of the stored JPEGs")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--row-group-size", type=int, default=256)
    parser.add_argument("--no-write", action="store_true", help="print the table without updating RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, workers, streaming = args.child.split("|")
        print(json.dumps(run_once(path, int(workers), streaming == "1", args.batch_size, args.resolution)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pickapic.parquet"
        rows = pickapic_rows(args.pairs, size=args.image_size, distinct_images=512)
        write_parquet(path, rows, row_group_size=args.row_group_size)
        size_mib = path.stat().st_size / 2**20
        del rows
        lines = [
            f"{args.pairs} pairs of {args.image_size} px JPEGs ({size_mib:.1f} MiB parquet, row groups of "
            f"{args.row_group_size}), one epoch at resolution {args.resolution}, batch {args.batch_size}, random flip. "
            "Sampler: random access through the row-group cache; streaming: row group by row group with a "
            "1000-pair shuffle buffer. Memory: peak PSS (proportional set size, so pages shared between "
            "processes count once) of the main process, and of the main process plus its workers, sampled every "
            "200 ms; most of it is the torch and pyarrow import.",
            "",
            "| access | workers | pairs/s | open (index) s | main peak PSS MiB | main + workers peak PSS MiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        loads: list[float] = []
        for streaming in (False, True):
            for workers in (int(w) for w in args.workers.split(",")):
                loads.append(os.getloadavg()[0])
                child = f"{path}|{workers}|{int(streaming)}"
                out = subprocess.run([sys.executable, __file__, "--child", child, "--batch-size", str(args.batch_size),
                                      "--resolution", str(args.resolution)], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                lines.append(f"| {'streaming' if streaming else 'sampler'} | {workers} | {r['pairs_per_s']:.0f} | "
                             f"{r['open_s']:.2f} | {r['main_mib']:.0f} | {r['total_mib']:.0f} |")
                print(lines[-1], flush=True)
    lines.append(f"\nLoad average (1 min) before each run: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} "
                 "logical CPUs; above the CPU count, other processes sharing the machine depress the figures.")
    table = "\n".join(lines)
    publish("data_throughput", table, write=not args.no_write)


if __name__ == "__main__":
    main()
