"""Peak memory per method and model size: CUDA max allocated on a GPU, peak RSS on the CPU.

For each model, the backend is built once and the encoding cache filled; then, for each method, the
peak is reset (CUDA: `reset_peak_memory_stats`; CPU: freed heap returned to the OS with malloc_trim
and the kernel's peak-RSS mark reset through /proc/self/clear_refs) and `trainer.loop.train` runs a
few steps. "Baseline" is the memory held before the run (model, encoders, cache); "peak" the highest
during it; "training" their difference (activations, gradients, optimiser state).

    python benchmarks/memory.py [--quick] [--models tiny-sd,tiny-sdxl] [--batch 4] [--resolution 64]

Results go to benchmarks/RESULTS.md, section `memory` (`memory_gpu` on CUDA).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import fmt, make_pairs, make_unpaired, method_cases, peak_memory, trim_host_memory

import torch

from benchmarks.results import write_section
from trainer.batches import BatchStream
from trainer.config import make_config
from trainer.distributed import Ranks
from trainer.loop import train
from trainer.methods import build_method
from trainer.run import make_backend


def measure(model: str, checkpointing: bool, args, tmp: Path, device: torch.device) -> list[dict]:
    pairs, unpaired = make_pairs(16, args.resolution), make_unpaired(16, args.resolution)
    base = dict(model=model, data="synthetic pairs", resolution=args.resolution, batch_size=args.batch,
                learning_rate=1e-5, checkpoint_every=0, cache_dir=str(tmp / "cache"),
                gradient_checkpointing=checkpointing, seed=0, max_steps=args.steps, log_every=args.steps,
                mixed_precision="bf16" if device.type == "cuda" else "no")
    torch.manual_seed(0)
    backend = make_backend(make_config(dict(base, output_dir=str(tmp))), device)
    cases = method_cases()
    if args.quick:
        cases = [c for c in cases if c.label in ("dpo", "sft", "kto", "dpo (space=ncp)")]
    rows = []
    for case in cases:
        method = build_method(case.name, case.args)
        examples = pairs if method.paired else unpaired
        config = make_config(dict(base, method=case.name, method_args=case.args,
                                  output_dir=str(tmp / f"{model}-{len(rows)}-{checkpointing}")))
        BatchStream(config, backend, examples, method, Ranks.single(device))  # fill the cache outside the measurement
        with peak_memory(device) as memory:
            train(config, backend, examples)
        row = {"model": model, "checkpointing": checkpointing, "method": case.label, **memory}
        print(row, flush=True)
        rows.append(row)
    del backend
    trim_host_memory()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="dpo/sft/kto/dpo-ncp only")
    parser.add_argument("--models", default="tiny-sd,tiny-sdxl")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="off")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flags = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    rows = []
    with tempfile.TemporaryDirectory(prefix="prefalign-bench-") as tmp:
        for model in args.models.split(","):
            for checkpointing in flags:
                rows += measure(model, checkpointing, args, Path(tmp), device)
    if args.no_write:
        return
    kind = "CUDA max allocated" if device.type == "cuda" else "peak RSS of the process"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (fp32)"
    lines = [
        f"{kind} in MiB, {where}, batch {args.batch}, resolution {args.resolution} px, cached latents, "
        f"{args.steps} steps per method. Baseline = held before the run (weights, encoders, cache, "
        "allocator); training = peak - baseline.",
        "",
        "| model | checkpointing | method | baseline MiB | peak MiB | training MiB |",
        "|---|:-:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {'on' if r['checkpointing'] else 'off'} | {r['method']} | "
                     f"{fmt(r['before'], 0)} | {fmt(r['peak'], 0)} | {fmt(r['peak'] - r['before'], 0)} |")
    write_section("memory_gpu" if device.type == "cuda" else "memory", "\n".join(lines))


if __name__ == "__main__":
    main()
