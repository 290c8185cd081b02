"""Per-step encoding (what the reference scripts do) vs cached latents and text embeddings (goal >= 1.5x).

The same `trainer.loop.train` run (DPO by default) with `cache = false` (decode, VAE-encode both images
and text-encode the prompt at every step) and with `cache = true` (the UNet only), at latents of 64 px:

  * `8x VAE`: tiny-sd's UNet with a small VAE of the standard 8x factor (channels 8/16/32/32, two
    layers per block, like SD's but narrower), on 512 px images;
  * `tiny VAE`: tiny-sd's own 2x VAE on 128 px images.

Runs alternate (cached, per-step, per-step with DataLoader workers, cached, ...) so a loaded machine
slows all alike; each run's first interval is a warm-up. The one-off cost of filling the cache is
reported with the break-even step count. What caching saves depends on the VAE encoder's cost
relative to the UNet's, so the table also gives FLOPs(VAE encode of one image) / FLOPs(UNet forward
of one latent) for the benchmark models and, for scale, for SD1.5 (1.4 at 512 px, random weights on
the meta device, counted by torch.utils.flop_counter).

    python benchmarks/encoding.py [--quick] [--batch 2] [--method dpo]

Results go to benchmarks/RESULTS.md, section `encoding` (`encoding_gpu` on CUDA).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from harness import load_note, InterleavedTimer, fmt, make_pairs

import torch

from benchmarks.results import write_section
from trainer.config import make_config
from trainer.loop import TrainHooks, train
from trainer.run import make_backend


def small_8x_vae(folder: Path) -> str:
    """A randomly initialised AutoencoderKL with SD's 8x downsampling and narrow channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16, 32, 32], layers_per_block=2, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        norm_num_groups=8, sample_size=512)
    vae.save_pretrained(folder)
    return str(folder)


def flop_ratio(unet, vae, resolution: int, factor: int, text_width: int) -> float:
    """FLOPs of one VAE encode at `resolution` over FLOPs of one UNet forward at its latent size."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> int:
        with FlopCounterMode(display=False) as mode, torch.no_grad():
            fn()
        return mode.get_total_flops()

    latent = resolution // factor
    device, dtype = unet.conv_in.weight.device, unet.conv_in.weight.dtype
    u = count(lambda: unet(torch.zeros(1, 4, latent, latent, device=device, dtype=dtype),
                           torch.tensor([10], device=device),
                           encoder_hidden_states=torch.zeros(1, 77, text_width, device=device, dtype=dtype)))
    v = count(lambda: vae.encode(torch.zeros(1, 3, resolution, resolution, device=device)))
    return v / u


def sd15_flop_ratio() -> float:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                    attention_head_dim=8, layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        return flop_ratio(unet, vae, 512, 8, 768)


def timed_run(backend, base: dict, examples, cache: bool, workers: int, every: int, intervals: int, out: Path) -> list[float]:
    config = make_config(dict(base, cache=cache, num_workers=workers, output_dir=str(out),
                              max_steps=every * (intervals + 1), log_every=every))
    timer = InterleavedTimer(None, every, 1, backend.device)
    train(config, backend, examples, TrainHooks(on_step=timer))
    return timer.trainer


def measure(variant: str, args, tmp: Path, device: torch.device) -> dict:
    if variant == "8x VAE":
        resolution, vae = 512, small_8x_vae(tmp / "vae8x")
    else:
        resolution, vae = 128, None
    examples = make_pairs(args.rows, resolution)
    base = dict(model="tiny-sd", data="synthetic pairs", vae=vae, resolution=resolution, batch_size=args.batch,
                method=args.method, learning_rate=1e-5, checkpoint_every=0, cache_dir=str(tmp / f"cache-{variant[:2]}"),
                seed=0, mixed_precision="bf16" if device.type == "cuda" else "no")
    torch.manual_seed(0)
    backend = make_backend(make_config(dict(base, output_dir=str(tmp))), device)
    flops = flop_ratio(backend.model, backend.parts.vae, resolution, 8 if vae else 2,
                       backend.model.config.cross_attention_dim)
    # the one-off cache fill: a run of one step on an empty cache, minus a run of one step on the full one
    start = time.perf_counter()
    train(make_config(dict(base, max_steps=1, output_dir=str(tmp / "fill"))), backend, examples)
    fill = time.perf_counter() - start
    start = time.perf_counter()
    train(make_config(dict(base, max_steps=1, output_dir=str(tmp / "fill2"))), backend, examples)
    fill -= time.perf_counter() - start
    times = {"cached": [], "per-step": [], "per-step, 2 workers": []}
    for r in range(args.rounds):
        for name, cache, workers in (("cached", True, 0), ("per-step", False, 0), ("per-step, 2 workers", False, 2)):
            if workers and args.quick:
                continue
            times[name] += timed_run(backend, base, examples, cache, workers, args.every, args.intervals,
                                     tmp / f"run-{r}-{cache}-{workers}")
    med = {k: statistics.median(v) for k, v in times.items() if v}
    row = {"variant": variant, "resolution": resolution, "latent": resolution // (8 if vae else 2),
           "fill": fill, "rows": args.rows, "flops": flops, **{f"t:{k}": v for k, v in med.items()}}
    row["speedup"] = med["per-step"] / med["cached"]
    if "per-step, 2 workers" in med:
        row["speedup_w"] = med["per-step, 2 workers"] / med["cached"]
    saved = med["per-step"] - med["cached"]
    row["break_even"] = fill / saved if saved > 0 else float("inf")
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8x VAE only, no worker runs, one round")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--method", default="dpo")
    parser.add_argument("--rows", type=int, default=16, help="dataset rows (all cached up front)")
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--intervals", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the trainer (0: torch's default)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="prefalign-bench-") as tmp:
        for variant in (["8x VAE"] if args.quick else ["8x VAE", "tiny VAE"]):
            rows.append(measure(variant, args, Path(tmp), device))
    if args.no_write:
        return
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} trainer thread(s)"
    lines = [
        f"`trainer.loop.train`, method {args.method}, batch {args.batch} pairs, tiny-sd UNet, on {where}. "
        "Per-step = `cache = false` (decode + VAE + text encoder every step, as the reference scripts do); "
        "cached = `cache = true` (UNet only). Median seconds per optimiser step over "
        f"{args.rounds} alternating round(s) of {args.intervals} x {args.every} steps after a warm-up. "
        "Goal: speed-up >= 1.5 at latents >= 64 px. Fill = one-off encoding of the whole dataset "
        f"({args.rows} pairs); break-even = fill / time saved per step. VAE/UNet FLOPs = one VAE encode "
        f"over one UNet forward (SD1.5 at 512 px: {sd15_flop_ratio():.2f}). " + load_note(load),
        "",
        "| VAE | images px | latents px | VAE/UNet FLOPs | per-step s/step | per-step, 2 workers s/step | cached s/step | speed-up | speed-up vs 2 workers | fill s | break-even steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        w = r.get("t:per-step, 2 workers")
        lines.append(f"| {r['variant']} | {r['resolution']} | {r['latent']} | {fmt(r['flops'])} | {fmt(r['t:per-step'], 3)} | "
                     f"{fmt(w, 3) if w else '-'} | {fmt(r['t:cached'], 3)} | **{fmt(r['speedup'])}x** | "
                     f"{fmt(r['speedup_w']) + 'x' if 'speedup_w' in r else '-'} | {fmt(r['fill'], 1)} | "
                     f"{fmt(r['break_even'], 1)} |")
    write_section("encoding_gpu" if device.type == "cuda" else "encoding", "\n".join(lines))


if __name__ == "__main__":
    main()
