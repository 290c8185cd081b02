"""Does every method align the toy model without collateral damage? Preference, prompt fidelity, guardrails.

Every registered method trains on the same toy preference dataset (chosen = "shaded", rejected = the
same object "flat"; prompts name colour and shape), with the same seed and the toy recipe
(`trainer.demo.toy_training`: DEMO_TRAINING and the method's toy learning rate, plus TOY_METHOD_ARGS
and TOY_STEPS below); then one row per guardrail (GUARDRAIL_ROWS, on dpo). On the same prompts and seeds:

- attribute rate of base and base+LoRA samples (npo: its LoRA in the negative branch of guidance),
  95% Wilson intervals; "moved" when the intervals do not overlap;
- prompt fidelity: for colour and shape, the share of samples that keep what the prompt names, with
  its interval and its change from the base; "kept" when neither fell more than 5 points;
- winner's error rose: share of training steps whose chosen-image error was above the reference's
  (`win_err_rose`; methods with a reference pass only);
- reward accuracy on held-out pairs (a second dataset, other seed): the DPO implicit reward margin
  (e_ref_w - e_w) - (e_ref_l - e_l) of the trained LoRA against the base model, averaged over
  `--draws` fixed noise/timestep draws; accuracy = fraction of pairs with a positive mean margin, in the
  MSE error space for every method so the numbers compare (for npo it says the LoRA leans the other way).

    python -m benchmarks.alignment            # a few minutes on a loaded 2-core machine
    python -m benchmarks.alignment --quick    # fewer samples and held-out pairs, a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import publish  # noqa: E402

#: Method options other than the defaults, found on the toy world (64 pairs, 40 steps, batch 8). Cal-DPO's
#: calibration pulls each implicit reward to +-1/(2 beta_cal), an error change of 1/(beta beta_cal); at beta 5000
#: that is 4e-4, which keeps the LoRA close to the base: 'shaded' 37% -> 52% [45%, 59%] after 40 steps, its
#: interval barely clear of the base's. beta 200 allows a 0.01 change (98%).
TOY_METHOD_ARGS: dict[str, dict] = {"cal-dpo": {"beta": 200.0}}
#: Step budgets other than STEPS: npo trains at lr 1e-4 (trainer.demo.DEMO_LEARNING_RATE) and needs more
#: steps to move: 49% after 40 steps, 76% after 120 (colour and shape kept).
STEPS = 40
TOY_STEPS: dict[str, int] = {"npo": 120}
#: One row per guardrail, on Diffusion-DPO (trainer/methods/guardrails.py).
GUARDRAIL_ROWS: list[tuple[str, dict]] = [("dpo", {"safeguard": True}), ("dpo", {"adaptive_beta": True}),
                                          ("dpo", {"sft_weight": 1.0})]
#: The prompted attributes whose fidelity is measured (the toy prompts leaving the style open name these).
FIDELITY_KINDS = ("colour", "shape")


class HeldOutPairs:
    """Held-out toy pairs encoded once; `accuracy(lora)` loads a LoRA into the same backend and scores it."""

    def __init__(self, data: Path, draws: int = 4, batch_pairs: int = 16, seed: int = 1234) -> None:
        from trainer.config import make_config
        from trainer.data.dataset import collate
        from trainer.data.transforms import ImageTransform
        from trainer.demo import DEMO_TRAINING
        from trainer.encoding import encode_collated
        from trainer.methods import build_method
        from trainer.run import make_backend, open_config_examples

        with tempfile.TemporaryDirectory() as tmp:
            config = make_config({**DEMO_TRAINING, "data": str(data), "output_dir": tmp, "cache_dir": tmp})
            self.backend = make_backend(config, torch.device("cpu"))
            examples = list(open_config_examples(config))
        self.method = build_method("dpo")
        transform = ImageTransform(config.resolution)
        with torch.no_grad():
            self.batches = [encode_collated(self.backend, collate([transform(e, False, None) for e in
                                                                   examples[i:i + batch_pairs]]))
                            for i in range(0, len(examples), batch_pairs)]
        self.draws, self.seed = draws, seed

    def margins(self, lora_path: Path) -> torch.Tensor:
        """Per pair: (e_ref_w - e_w) - (e_ref_l - e_l), mean over the fixed noise draws."""
        from trainer.export import load_lora_into
        from trainer.step import compute_outputs, draw_noise

        load_lora_into(self.backend, lora_path)
        out_margins = []
        with torch.no_grad():
            for batch in self.batches:
                n = batch.latents.shape[0] // 2  # chosen-first layout: rows [0, n) chosen, [n, 2n) rejected
                total = torch.zeros(n)
                for d in range(self.draws):
                    noise = draw_noise(self.method, batch.latents.shape, batch.paired,
                                       self.backend.timestep_sampling, torch.Generator().manual_seed(self.seed + d))
                    out = compute_outputs(self.backend, self.method, batch, noise)
                    total += ((out.ref_err[:n] - out.err[:n]) - (out.ref_err[n:] - out.err[n:])).float().cpu()
                out_margins.append(total / self.draws)
        return torch.cat(out_margins)

    def accuracy(self, lora_path: Path) -> float:
        """Fraction of held-out pairs whose mean implicit margin is positive (the LoRA prefers the chosen image)."""
        return float((self.margins(lora_path) > 0).float().mean())


def options_of(method: str, extra: dict | None = None) -> dict:
    """The method options a row trains with: the toy ones, then the row's own (a guardrail)."""
    return {**TOY_METHOD_ARGS.get(method, {}), **(extra or {})}


def align(method: str, data: Path, work: Path, steps: int | None = None, options: dict | None = None,
          seed: int = 0) -> tuple[Path, float, float | None]:
    """Train `method` on `data` with its toy recipe; (LoRA path, seconds, share of steps whose winner's error
    rose above the reference's, or None without a reference)."""
    from trainer.config import make_config
    from trainer.demo import toy_training
    from trainer.run import run

    name = "-".join([method, *(f"{k}={v}" for k, v in (options or {}).items())])
    config = make_config({**toy_training(method), "data": str(data), "max_steps": steps or TOY_STEPS.get(method, STEPS),
                          "seed": seed, "method_args": options_of(method, options), "output_dir": str(work / name),
                          "cache_dir": str(work / "cache"), "log_every": 1, "overwrite": True})
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # summary, progress bar
        result = run(config)
    seconds = time.perf_counter() - start
    lines = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    rose = [line["win_err_rose"] for line in lines if "win_err_rose" in line]
    return Path(result.lora_path), seconds, (sum(rose) / len(rose) if rose else None)


def fidelity_cells(before: dict, after: dict) -> list[str]:
    """'LoRA rate [interval] (change)' for each measured prompted attribute."""
    return [f"{after[k]} ({(after[k].rate - before[k].rate) * 100:+.1f})" for k in FIDELITY_KINDS]


def main(argv: list[str] | None = None) -> None:
    from trainer.demo import (attribute_report, evaluation_set, fidelity_falls, fidelity_report, sample_with_lora,
                              toy_training)
    from trainer.methods import method_names
    from trainer.toy import sample_images, write_preference_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--attribute", default="shaded")
    parser.add_argument("--methods", nargs="+", default=None, help="methods to run (default: all, then the guardrail rows)")
    parser.add_argument("--quick", action="store_true", help="96 samples, 16 held-out pairs")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.heldout = 96, 16
    rows_to_run = [(m, {}) for m in (args.methods or method_names())] + ([] if args.methods else GUARDRAIL_ROWS)

    with tempfile.TemporaryDirectory(prefix="prefalign-alignment-") as tmp:
        work = Path(tmp)
        data = write_preference_dataset(work / "train", args.attribute, args.pairs, seed=0)
        heldout = write_preference_dataset(work / "heldout", args.attribute, args.heldout, seed=1)
        prompts, seeds = evaluation_set(args.attribute, args.samples, seed=10_000)
        base_images = sample_images(None, prompts, seeds, steps=args.sample_steps)
        before, fid_before = attribute_report(base_images, args.attribute), fidelity_report(base_images, prompts)
        print(f"base: {before}; " + ", ".join(f"{k} {fid_before[k]}" for k in FIDELITY_KINDS), flush=True)
        scorer = HeldOutPairs(heldout, args.draws)
        rows = []
        for method, extra in rows_to_run:
            lora, seconds, rose = align(method, data, work, options=extra)
            images = sample_with_lora(method, lora, prompts, seeds, steps=args.sample_steps)
            after, fid_after = attribute_report(images, args.attribute), fidelity_report(images, prompts)
            acc = scorer.accuracy(lora)
            moved, kept = after.low > before.high, not fidelity_falls(fid_before, fid_after)
            print(f"{method} {extra or ''}: {before} -> {after} moved={moved} kept={kept} "
                  + ", ".join(f"{k} {fid_after[k]}" for k in FIDELITY_KINDS)
                  + f" rose={rose} held-out acc {acc:.1%} train {seconds:.0f}s", flush=True)
            lr = toy_training(method)["learning_rate"]
            options = [f"lr={lr:g}"] if lr != toy_training("dpo")["learning_rate"] else []
            options += [f"steps={TOY_STEPS[method]}"] if method in TOY_STEPS else []
            options += [f"{k}={v:g}" if isinstance(v, float) else f"{k}={str(v).lower()}"
                        for k, v in options_of(method, extra).items()]
            rows.append(f"| {method} | {', '.join(options) or 'defaults'} | {after} | {'yes' if moved else 'no'} | "
                        + " | ".join(fidelity_cells(fid_before, fid_after)) + f" | {'yes' if kept else 'no'} | "
                        f"{'-' if rose is None else f'{rose:.0%}'} | {acc:.1%} | {seconds:.0f} |")

    body = (f"Toy world, preferring '{args.attribute}': {args.pairs} training pairs, {STEPS} steps unless listed "
            f"(batch 8, rank 8, seed 0, lr 1e-3 unless listed) for every method, then one row per guardrail on dpo; "
            f"rates over {args.samples} samples (same prompts and seeds, {args.sample_steps} DDIM steps) with 95% "
            f"Wilson intervals. npo samples with its LoRA in the negative branch of guidance only.\n\n"
            f"Base model: '{args.attribute}' {before}; colour as prompted {fid_before['colour']}; shape as prompted "
            f"{fid_before['shape']}.\n\n"
            "Moved: the LoRA's interval lies above the base's. Colour / shape kept: share of samples showing the "
            "prompted attribute (change from the base in points); kept: neither fell more than 5 points. Winner's "
            "error rose: share of training steps whose chosen-image error was above the reference's (methods with "
            f"a reference). Held-out reward acc: DPO implicit margin > 0 on {args.heldout} held-out pairs, mean over "
            f"{args.draws} fixed noise draws (npo learns the reverse preference). Train s: wall seconds on a shared "
            "machine; the first row's include encoding the dataset (cached for the others).\n\n"
            "| method | options | LoRA rate | moved | colour kept | shape kept | fidelity kept | winner's error rose "
            "| held-out reward acc | train s |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    publish("alignment", body, write=not args.no_write)


if __name__ == "__main__":
    main()
