"""Train preference LoRA: the trainer's loop, in-process, on the graph's MODEL through `ComfyBackend`."""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from ..trainer.methods.args import format_args, method_table, parse_method_args
from . import comfy_env, live
from .store_nodes import PAIRS

CATEGORY = "preference/train"
DEFAULT_TARGETS = "to_q, to_k, to_v, to_out.0"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:48] or "prefalign"


def latest_run(runs: Path, prefix: str) -> Path:
    """The newest run folder `PREFIX-<time>` that holds a checkpoint to resume from."""
    from ..trainer.checkpoint import list_checkpoints

    stamped = re.compile(re.escape(prefix) + r"-\d{8}-\d{6}")
    found = sorted(d for d in runs.glob("*") if stamped.fullmatch(d.name) and list_checkpoints(d / "checkpoints"))
    if not found:
        raise ValueError(f"resume: no earlier run of {prefix!r} with a checkpoint in {runs}; "
                         "turn resume off to start a new one (lora_name and method must match the run to continue)")
    return found[-1]


class TrainPreferenceLoRA:
    DESCRIPTION = ("Train a LoRA on preference pairs with Diffusion-DPO or another method, in-process on the GPU "
                   "ComfyUI manages. Cancel stops at the next step boundary and still saves the LoRA and the last "
                   "checkpoint. The file goes to models/loras/prefalign/, where LoraLoader finds it.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("MODEL", "LORA_MODEL", "IMAGE", "STRING")
    RETURN_NAMES = ("model", "lora", "loss_curve", "lora_name")
    OUTPUT_TOOLTIPS = (
        "The input model with the trained LoRA applied (strength 1).",
        "The LoRA weights, for ComfyUI's Save LoRA / Load LoRA Model nodes.",
        "The training loss per step.",
        "The saved file's name inside models/loras (for LoraLoader).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        try:
            table = method_table()
        except Exception:  # the registry failed to import: show the error when the node runs
            table = {"dpo": {"defaults": {}, "paper": ""}}
        names = list(table)
        help_lines = "; ".join(f"{n}: {format_args(t['defaults']).replace(chr(10), ', ') or 'no options'}" for n, t in table.items())
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to align; it is not changed (the LoRA is trained beside it)."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP, to encode the prompts of the pairs."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to encode the images of the pairs."}),
            "pairs": (PAIRS, {"tooltip": "Preference pairs from a pair store or a dataset."}),
            "method": (names, {"default": "dpo" if "dpo" in names else names[0], "tooltip": "Alignment method. " + " | ".join(f"{n}: {t['paper']}" for n, t in table.items())}),
            "method_args": ("STRING", {"multiline": True, "default": format_args(table.get("dpo", {}).get("defaults", {})),
                                       "tooltip": "The method's hyper-parameters, one `name = value` per line; a missing name keeps the default. "
                                                  "Changing the method fills in its defaults. Defaults: " + help_lines}),
            "steps": ("INT", {"default": 200, "min": 1, "max": 1_000_000, "tooltip": "Optimiser steps."}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-9, "max": 1.0, "step": 1e-6, "round": False, "tooltip": "Peak learning rate (LoRA DPO: 1e-5 to 1e-4)."}),
            "rank": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "LoRA rank."}),
            "alpha": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 1024.0, "step": 0.5, "tooltip": "LoRA alpha (the update is scaled by alpha / rank)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Pairs per step (before accumulation)."}),
            "gradient_accumulation_steps": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Micro-batches per optimiser step (effective batch = batch_size x this)."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Training resolution in pixels (square; images are resized and centre-cropped)."}),
            "training_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed for LoRA initialisation, data order, noise and timesteps."}),
            "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 1_000_000, "tooltip": "Save a resumable checkpoint every N steps (0: only at the end)."}),
            "target_modules": ("STRING", {"default": DEFAULT_TARGETS, "tooltip": "Comma-separated layer names that get a LoRA (suffixes of ComfyUI's diffusion_model paths)."}),
            "lora_name": ("STRING", {"default": "prefalign", "tooltip": "Prefix of the saved file; method, steps and time are appended, so each run gets a new file."}),
        }, "optional": {  # optional: graphs saved before these inputs existed still run
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute the UNet's activations in the backward pass instead of keeping them: a fraction of the training memory (for SDXL at high resolution), for one more forward per step."}),
            "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue the latest run with this lora_name and method from its last checkpoint (after Cancel, an error or a restart); steps is the total to reach."}),
        }}

    def train(self, model, clip, vae, pairs, method, method_args, steps, learning_rate, rank, alpha, batch_size,
              gradient_accumulation_steps, resolution, training_seed, checkpoint_every, target_modules, lora_name,
              gradient_checkpointing=False, resume=False):
        seed = training_seed
        import torch
        from safetensors.torch import load_file

        from ..trainer.config import make_config
        from ..trainer.loop import TrainHooks, train
        from .comfy_backend import ComfyBackend
        from .images import pil_to_tensor
        from .loss_plot import plot_loss

        args = parse_method_args(method, method_args)
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
        if not targets:
            raise ValueError("target_modules is empty")
        if len(pairs) == 0:
            raise ValueError("no preference pairs to train on")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        prefix = _slug(lora_name)
        root = comfy_env.output_dir() / "prefalign"
        run_dir = latest_run(root / "runs", f"{prefix}-{method}") if resume else root / "runs" / f"{prefix}-{method}-{stamp}"
        description = getattr(pairs, "description", "") or f"{len(pairs)} pairs"
        config = make_config({
            "model": "comfyui", "data": description, "method": method, "method_args": args, "rank": rank,
            "alpha": float(alpha), "target_modules": targets, "learning_rate": float(learning_rate),
            "max_steps": steps, "batch_size": batch_size, "gradient_accumulation_steps": gradient_accumulation_steps,
            "resolution": resolution, "seed": seed, "output_dir": str(run_dir), "checkpoint_every": checkpoint_every,
            "cache_dir": str(root / "cache"), "lr_warmup_steps": 0,
            "log_every": 1,  # the live loss chart and progress bar move every step
            "resume": "latest" if resume else None,
        })
        prompt_id, node_id = comfy_env.executing_context()
        state = live.start(node_id, prompt_id, steps, method)
        pbar = comfy_env.progress_bar(steps, node_id)

        cancel = {"requested": False}

        holder = {}

        def on_step(report):
            if "backend" in holder:
                holder["backend"].cancel_while_encoding = False  # from now on Cancel stops at a step boundary
            loss = report.metrics.get("loss")
            live.step(state, report.step, loss, report.metrics)
            if pbar is not None:
                try:  # ComfyUI's progress hook raises on Cancel (and clears the flag): stop at this boundary instead
                    pbar.update_absolute(report.step, report.total)
                except Exception as e:
                    if not comfy_env.is_interrupt(e):
                        raise
                    cancel["requested"] = True

        def should_stop() -> bool:
            cancel["requested"] = cancel["requested"] or comfy_env.interrupted()
            return cancel["requested"]

        try:
            with torch.inference_mode(False), ComfyBackend(model, clip, vae, rank, alpha, targets, seed=seed, model_name="comfyui",
                                                           gradient_checkpointing=gradient_checkpointing) as backend:
                holder["backend"] = backend
                result = train(config, backend, pairs, TrainHooks(on_step=on_step, should_stop=should_stop))
        except Exception as e:
            interrupted = comfy_env.is_interrupt(e)
            live.finish(state, "stopped" if interrupted else "error",
                        message="cancelled before the first step" if interrupted else str(e))
            raise
        if result.steps == 0:  # cancelled before the first step: nothing worth saving
            live.finish(state, "stopped", message="cancelled before the first step")
            comfy_env.throw_if_interrupted()
            comfy_env.raise_interrupt()
        if result.lora_path is None:
            live.finish(state, "error", message="the trainer wrote no LoRA file")
            raise RuntimeError("the trainer wrote no LoRA file")
        name = f"{prefix}_{method}_{result.steps}steps_{stamp}.safetensors"
        dest = comfy_env.loras_dir() / "prefalign" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name("." + dest.name + ".tmp")
        shutil.copyfile(result.lora_path, tmp)
        tmp.replace(dest)
        rel = f"prefalign/{name}"
        live.finish(state, "stopped" if result.stopped else "done", lora=rel,
                    message=f"saved {rel} after {result.steps} steps")
        if result.stopped:  # report the Cancel to ComfyUI (execution_interrupted); the file is already saved
            comfy_env.throw_if_interrupted()
            comfy_env.raise_interrupt()
        lora_sd = load_file(str(dest))
        import comfy.sd

        model_out, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
        curve = pil_to_tensor(plot_loss(state["loss"], f"{method} loss"))
        ui = {"prefalign_train": [{"node": node_id, "lora": rel, "steps": result.steps, "stopped": result.stopped,
                                   "metrics": {k: float(v) for k, v in result.metrics.items()}}],
              "text": [f"saved models/loras/{rel} ({result.steps} steps)"]}
        return {"ui": ui, "result": (model_out, lora_sd, curve, rel)}


NODES = {"PrefAlignTrainLoRA": (TrainPreferenceLoRA, "Train Preference LoRA")}
