"""Gradient checkpointing in the ComfyUI backend, in a real ComfyUI: training memory and step time, off vs on.

Run with ComfyUI's Python (the pack's requirements installed there) on a checkpoint ComfyUI loads:

    COMFY_VENV/bin/python benchmarks/comfy_checkpointing.py COMFYUI_DIR CHECKPOINT [--resolution 1024]

A first process loads the checkpoint with ComfyUI's loader and fills the encoding cache (4 synthetic
pairs), so the measured runs never touch the VAE or CLIP. Then one fresh process per setting trains
DPO (batch 1 pair, rank 8) through `ComfyBackend` and the trainer's loop. Memory: on CUDA the peak
allocated during training minus what was allocated before it; on CPU the same for RSS (the kernel's
peak mark, reset before training). Time: mean seconds per step after the first. Writes RESULTS.md section `comfy_checkpointing`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(comfy_dir: str, checkpoint: str, work: Path, resolution: int, steps: int, checkpointing: bool) -> dict:
    """Load the checkpoint in ComfyUI, train, and measure (runs in its own process)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness import peak_memory

    sys.path.insert(0, comfy_dir)
    if not torch.cuda.is_available():
        sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sd

    pack = types.ModuleType("prefalign_pack")  # the pack's modules, without registering its nodes
    pack.__path__ = [str(ROOT)]
    sys.modules["prefalign_pack"] = pack
    ComfyBackend = importlib.import_module("prefalign_pack.nodes.comfy_backend").ComfyBackend
    make_config = importlib.import_module("prefalign_pack.trainer.config").make_config
    data = importlib.import_module("prefalign_pack.trainer.data")
    loop = importlib.import_module("prefalign_pack.trainer.loop")

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
    config = make_config({"model": "comfyui", "data": str(work / "pairs.parquet"), "method": "dpo", "rank": 8,
                          "alpha": 8.0, "max_steps": steps, "batch_size": 1, "resolution": resolution,
                          "output_dir": str(work / f"out-{checkpointing}"), "cache_dir": str(work / "cache"),
                          "checkpoint_every": 0, "log_every": 1, "lr_warmup_steps": 0})
    examples = data.open_examples(data.DataSpec(config.data))
    times: list[float] = []
    lora = importlib.import_module("prefalign_pack.trainer.models.lora").LoraSpec.from_config(config)
    with torch.inference_mode(False), ComfyBackend(model, clip, vae, lora, gradient_checkpointing=checkpointing) as backend:
        with peak_memory(backend.device) as memory:
            hooks = loop.TrainHooks(on_step=lambda report: times.append(time.perf_counter()))
            loop.train(config, backend, examples, hooks)
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    unet_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    return {"checkpointing": checkpointing, "train_mib": memory["peak"] - memory["before"], "s_per_step": per_step,
            "device": backend.device.type, "unet_params": unet_params, "family": type(model.model.model_config).__name__}


def run_child(args, work: Path, steps: int, checkpointing: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, args.comfy_dir, args.checkpoint, "--child", str(work),
                          "--resolution", str(args.resolution), "--steps", str(steps),
                          *(["--checkpointing"] if checkpointing else [])],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comfy_dir")
    parser.add_argument("checkpoint")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="print the table without updating RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.comfy_dir, args.checkpoint, Path(args.child), args.resolution, args.steps, args.checkpointing)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(ROOT))
    from benchmarks.results import publish
    from trainer.data.synthetic import pickapic_rows, write_parquet

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_parquet(work / "pairs.parquet", pickapic_rows(4, size=args.resolution))
        run_child(args, work, 1, False)  # fills the encoding cache: the measured runs load it
        rows = [run_child(args, work, args.steps, flag) for flag in (False, True)]
    off, on = rows
    lines = [
        f"ComfyUI backend, `{Path(args.checkpoint).name}` ({off['family']}, UNet {off['unet_params'] / 1e6:.0f} M params) "
        f"loaded by ComfyUI's checkpoint loader, DPO, batch 1 pair, "
        f"{args.resolution} px, rank 8 on to_q/to_k/to_v/to_out.0, fp32 on {off['device']}; encodings cached "
        f"beforehand. Training memory: peak during training minus before it "
        f"({'CUDA allocated' if off['device'] == 'cuda' else 'RSS'}).",
        "",
        "| gradient checkpointing | training memory MiB | s/step | memory ratio | time ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {'on' if r['checkpointing'] else 'off'} | {r['train_mib']:.0f} | {r['s_per_step']:.2f} | "
                     f"{r['train_mib'] / off['train_mib']:.2f} | {r['s_per_step'] / off['s_per_step']:.2f} |")
    table = "\n".join(lines)
    publish("comfy_checkpointing", table, write=not args.no_write)


if __name__ == "__main__":
    main()
