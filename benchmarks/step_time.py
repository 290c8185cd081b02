"""Trainer step time divided by the floor, per method (goal: <= 1.10).

For each method, `trainer.loop.train` runs on cached latents with `log_every = N`; after every N
steps its `on_step` hook times N iterations of the floor on the same model and batch shape (policy
forward + backward on the 2B images, plus one no-grad reference forward on 2B where the method needs
it; see harness.make_floor). The ratio is the median over adjacent (trainer, floor) interval pairs,
so both are measured in the same run under the same load. NCP (dpo space=ncp) is reported with its
own floor, which includes NCP's encoder passes.

    python benchmarks/step_time.py [--quick] [--model tiny-sd] [--batch 4] [--resolution 64]
    # on a GPU (the same script; bf16 by default there):
    python benchmarks/step_time.py --model /path/to/sdxl-pipeline --resolution 1024 --batch 1 --checkpointing

Results go to benchmarks/RESULTS.md, section `step_time` (or `step_time_gpu` on CUDA).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from harness import (InterleavedTimer, load_note, MethodCase, fmt, make_floor, make_pairs, make_unpaired, method_cases,
                     needs_reference)

import torch

from benchmarks.results import write_section
from trainer.batches import BatchStream
from trainer.config import make_config
from trainer.distributed import Ranks
from trainer.loop import TrainHooks, train
from trainer.methods import build_method
from trainer.run import make_backend


def measure(backend, case: MethodCase, base: dict, pairs, unpaired, every: int, intervals: int, warmup: int,
            root: Path) -> dict:
    method = build_method(case.name, case.args)
    examples = pairs if method.paired else unpaired
    slug = case.label.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "-")
    config = make_config(dict(base, method=case.name, method_args=case.args, output_dir=str(root / slug),
                              max_steps=every * (warmup + intervals + 1), log_every=every))
    device = backend.device
    stream = BatchStream(config, backend, examples, method, Ranks.single(device))  # fills the cache once
    floor = make_floor(backend, case, stream.next_batch().local, config.mixed_precision)
    floor()  # warm-up
    timer = InterleavedTimer(floor, every, warmup, device)
    train(config, backend, examples, TrainHooks(on_step=timer))
    return {"method": case.label, "reference": needs_reference(case), "images": 2 * config.batch_size
            if method.paired and method.uses_rejected else config.batch_size, "step": timer.step_s(),
            "floor": timer.floor_s(), "ratio": timer.ratio(), "pairs": len(timer.trainer),
            "min_ratio": timer.ratio_of_minimums(), "spread": timer.ratio_spread(),
            "trainer_all": timer.trainer, "floor_all": timer.floors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer intervals, only dpo/sft/kto/dpo-ncp")
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--every", type=int, default=2, help="steps per timed interval (metrics read every N)")
    parser.add_argument("--intervals", type=int, default=8)
    parser.add_argument("--methods", default=None, help="comma-separated labels (default: all, plus dpo space=ncp)")
    parser.add_argument("--mixed-precision", default=None, help="no/fp16/bf16 (default: bf16 on CUDA, no on CPU)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: stable ratios on a shared machine; 0: torch's default)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = os.getloadavg()
    mp = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    intervals = 3 if args.quick else args.intervals
    cases = method_cases()
    if args.methods:
        cases = [c for c in cases if c.label in args.methods.split(",")]
    elif args.quick:
        cases = [c for c in cases if c.label in ("dpo", "sft", "kto", "dpo (space=ncp)")]
    pairs, unpaired = make_pairs(64, args.resolution), make_unpaired(64, args.resolution)
    rows = []
    with tempfile.TemporaryDirectory(prefix="prefalign-bench-") as tmp:
        base = dict(model=args.model, data="synthetic pairs", resolution=args.resolution, batch_size=args.batch,
                    learning_rate=1e-5, rank=8, alpha=8.0, checkpoint_every=0, cache=True,
                    cache_dir=str(Path(tmp) / "cache"), mixed_precision=mp, gradient_checkpointing=args.checkpointing,
                    seed=0)
        torch.manual_seed(0)
        backend = make_backend(make_config(dict(base, output_dir=tmp)), device)
        for case in cases:
            row = measure(backend, case, base, pairs, unpaired, args.every, intervals, 1, Path(tmp))
            print(f"{row['method']:>18}: step {row['step'] * 1e3:8.2f} ms  floor {row['floor'] * 1e3:8.2f} ms  "
                  f"ratio {row['ratio']:.3f}  min/min {row['min_ratio']:.3f}  ({row['pairs']} pairs)", flush=True)
            print("    trainer", [round(x * 1e3, 1) for x in row["trainer_all"]], "floor",
                  [round(x * 1e3, 1) for x in row["floor_all"]], flush=True)
            rows.append(row)
    if args.no_write:
        return
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"Model `{args.model}` on {where}, batch {args.batch} pairs, resolution {args.resolution} px, "
        f"mixed precision {mp}, gradient checkpointing {'on' if args.checkpointing else 'off'}, cached latents. "
        f"Trainer = `trainer.loop.train` per optimiser step (noise draw, forward(s), loss, backward, clip, AdamW, "
        f"metrics read every {args.every} steps); floor = bare UNet forward+backward on the trained images "
        f"(+ one no-grad reference forward where needed; NCP: + its encoder passes), same run, interleaved "
        f"intervals of {args.every} steps, {intervals} (trainer, floor) pairs after one warm-up interval. "
        "Ratio = median of the per-pair ratios (quartiles in brackets); min/min = fastest trainer interval "
        "over fastest floor interval, the least-disturbed estimate on a loaded machine. Goal: ratio <= 1.10. "
        + load_note(load),
        "",
        "| method | reference fwd | images/step | trainer ms/step | floor ms/step | ratio (quartiles) | min/min |",
        "|---|:-:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {'yes' if r['reference'] else 'no'} | {r['images']} | "
                     f"{fmt(r['step'] * 1e3, 1)} | {fmt(r['floor'] * 1e3, 1)} | **{fmt(r['ratio'])}** "
                     f"({fmt(r['spread'][0])}-{fmt(r['spread'][1])}) | {fmt(r['min_ratio'])} |")
    name = "step_time_gpu" if device.type == "cuda" else "step_time"
    write_section(name, "\n".join(lines))


if __name__ == "__main__":
    main()
