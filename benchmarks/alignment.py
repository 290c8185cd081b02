"""Does every method align the toy model? Attribute rate before/after and held-out reward accuracy.

Every registered method trains on the same toy preference dataset (chosen = "shaded", rejected =
the same object "flat"), with the same step budget, seed and toy-scale training settings
(`trainer.demo.DEMO_TRAINING`, plus `TOY_METHOD_ARGS` below). Then, on the same prompts and seeds:

- attribute rate of base and base+LoRA samples, with 95% Wilson intervals ("moved" when the
  intervals do not overlap);
- reward accuracy on held-out pairs (a second dataset, other seed): the DPO implicit reward
  margin (e_ref_w - e_w) - (e_ref_l - e_l) of the trained LoRA against the base model, averaged over
  `--draws` fixed noise/timestep draws; accuracy = fraction of pairs with a positive mean margin.
  It is measured in the MSE error space for every method, so the numbers are comparable.

    python -m benchmarks.alignment            # ~10 minutes on a loaded 2-core machine
    python -m benchmarks.alignment --quick    # fewer steps/samples, a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import write_section  # noqa: E402

#: Toy-scale method options (the defaults are tuned for SD-scale errors; see tests/test_alignment.py).
TOY_METHOD_ARGS: dict[str, dict] = {}


def reward_accuracy(lora_path: Path, data: Path, draws: int = 4, batch_pairs: int = 16, seed: int = 1234) -> float:
    """Fraction of `data`'s pairs where the LoRA's mean DPO implicit margin (over `draws` noise draws) is positive."""
    from trainer.config import make_config
    from trainer.data.dataset import collate
    from trainer.data.transforms import ImageTransform
    from trainer.demo import DEMO_TRAINING
    from trainer.encoding import encode_collated
    from trainer.export import load_lora_into
    from trainer.methods import build_method
    from trainer.run import make_backend, open_config_examples
    from trainer.step import compute_outputs, draw_noise

    with tempfile.TemporaryDirectory() as tmp:
        config = make_config({**DEMO_TRAINING, "data": str(data), "output_dir": tmp, "cache_dir": tmp})
        backend = make_backend(config, torch.device("cpu"))
        load_lora_into(backend, lora_path)
        examples = list(open_config_examples(config))
    method = build_method("dpo")
    transform = ImageTransform(config.resolution)
    margins = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_pairs):
            chunk = examples[start:start + batch_pairs]
            batch = encode_collated(backend, collate([transform(e, False, None) for e in chunk]))
            total = torch.zeros(len(chunk))
            for d in range(draws):
                noise = draw_noise(method, batch.latents.shape, batch.paired, backend.num_train_timesteps,
                                   torch.Generator().manual_seed(seed + d))
                out = compute_outputs(backend, method, batch, noise)
                n = len(chunk)  # chosen-first layout: rows [0, n) chosen, [n, 2n) rejected
                total += ((out.ref_err[:n] - out.err[:n]) - (out.ref_err[n:] - out.err[n:])).float().cpu()
            margins.append(total / draws)
    return float((torch.cat(margins) > 0).float().mean())


def align(method: str, data: Path, work: Path, steps: int, seed: int = 0) -> tuple[Path, float]:
    """Train `method` on `data` with the toy settings; (LoRA path, seconds)."""
    from trainer.config import make_config
    from trainer.demo import DEMO_TRAINING
    from trainer.run import run

    config = make_config({**DEMO_TRAINING, "data": str(data), "method": method, "max_steps": steps, "seed": seed,
                          "method_args": TOY_METHOD_ARGS.get(method, {}), "output_dir": str(work / method),
                          "cache_dir": str(work / "cache"), "log_every": 10_000})
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = run(config)
    return Path(result.lora_path), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    from trainer.demo import attribute_report, evaluation_set
    from trainer.methods import method_names
    from trainer.toy import sample_images, write_preference_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--attribute", default="shaded")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help="20 steps, 48 samples, 32 held-out pairs")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.samples, args.heldout = 20, 48, 32
    methods = args.methods or method_names()

    with tempfile.TemporaryDirectory(prefix="prefalign-alignment-") as tmp:
        work = Path(tmp)
        data = write_preference_dataset(work / "train", args.attribute, args.pairs, seed=0)
        heldout = write_preference_dataset(work / "heldout", args.attribute, args.heldout, seed=1)
        prompts, seeds = evaluation_set(args.attribute, args.samples, seed=10_000)
        before = attribute_report(sample_images(None, prompts, seeds, steps=args.sample_steps), args.attribute)
        print(f"base: {before}", flush=True)
        rows = []
        for method in methods:
            lora, seconds = align(method, data, work, args.steps)
            after = attribute_report(sample_images(None, prompts, seeds, steps=args.sample_steps, lora=str(lora)),
                                     args.attribute)
            acc = reward_accuracy(lora, heldout, args.draws)
            moved = after.low > before.high
            print(f"{method}: {before} -> {after} moved={moved} held-out acc {acc:.1%} train {seconds:.0f}s", flush=True)
            options = ", ".join(f"{k}={v}" for k, v in TOY_METHOD_ARGS.get(method, {}).items()) or "defaults"
            rows.append(f"| {method} | {options} | {before} | {after} | {'yes' if moved else 'no'} | {acc:.1%} | "
                        f"{seconds:.0f} |")

    body = (f"Toy world, preferring '{args.attribute}': {args.pairs} training pairs, {args.steps} steps "
            f"(batch {8}, lr 1e-3, rank 8, seed 0) for every method; attribute rate over {args.samples} samples "
            f"(same prompts and seeds, {args.sample_steps} DDIM steps) with 95% Wilson intervals; reward accuracy = "
            f"DPO implicit margin > 0 on {args.heldout} held-out pairs, mean over {args.draws} fixed noise draws.\n\n"
            "| method | options | base rate | LoRA rate | moved | held-out reward acc | train s |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(body)
    if not args.no_write:
        write_section("alignment", body)


if __name__ == "__main__":
    main()
