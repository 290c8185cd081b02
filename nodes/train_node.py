"""Train preference LoRA: the trainer's loop, in-process, on the graph's MODEL through `ComfyBackend`."""
from __future__ import annotations

import errno
import re
import shutil
import time
from pathlib import Path

from ..trainer.config import TIMESTEP_SAMPLINGS
from ..trainer.methods.args import format_args, method_table, parse_method_args
from . import comfy_env, live
from .comfy_families import presets_help
from .store_nodes import PAIRS

CATEGORY = "preference/train"
AUTO = "auto"  # target_modules / timestep_sampling: the model family's preset (comfy_families.py)
FAMILY_GUIDANCE = -1.0  # the guidance input's "the family's default"


LEARNING_RATES = (1e-8, 1.0)  # the range the learning_rate input accepts (paper full fine-tunes .. far too big)


def parse_learning_rate(value: str | float) -> float:
    """The learning_rate input: text such as `5e-7` (the widget), or a number (API graphs from before it was text)."""
    lo, hi = LEARNING_RATES
    try:
        rate = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"learning_rate {value!r} is not a number: write it like 1e-5 or 0.00001") from None
    if isinstance(value, bool) or not lo <= rate <= hi:  # NaN fails the comparison too
        raise ValueError(f"learning_rate {value!r} is outside {lo:g} .. {hi:g}")
    return rate


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
        "The LoRA weights, for ComfyUI's Load LoRA Model node (the file is already saved with its metadata).",
        "The training loss per step, over the whole run (earlier sessions of a resumed run included).",
        "The saved file's name inside models/loras (for LoraLoader).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        try:
            table = method_table()
        except Exception:  # the registry failed to import: show the error when the node runs
            table = {"dpo": {"defaults": {}, "paper": ""}}
        names = list(table)
        help_lines = "; ".join(f"{n}: {format_args(t['defaults'], t.get('per_model')).replace(chr(10), ', ') or 'no options'}"
                               for n, t in table.items())
        flow = [n for n, t in table.items() if "flow" in t.get("prediction_types", ("flow",))]
        lo, hi = LEARNING_RATES
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to align; it is not changed (the LoRA is trained beside it)."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP, to encode the prompts of the pairs."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to encode the images of the pairs."}),
            "pairs": (PAIRS, {"tooltip": "Preference pairs from a pair store or a dataset."}),
            "method": (names, {"default": "dpo" if "dpo" in names else names[0], "tooltip": "Alignment method. " + " | ".join(f"{n}: {t['paper']}" for n, t in table.items())
                               + f". SD1.5/SDXL (epsilon, v-prediction): every method. Flow models (SD3, Flux, Chroma, Qwen-Image, "
                                 f"HiDream, Lumina 2, Wan): {', '.join(flow)}; another one stops before encoding and says why."}),
            "method_args": ("STRING", {"multiline": True, "default": format_args(table.get("dpo", {}).get("defaults", {}),
                                                                                 table.get("dpo", {}).get("per_model")),
                                       "tooltip": "The method's hyper-parameters, one `name = value` per line; a missing name keeps the default. "
                                                  "Changing the method fills in its defaults. Defaults: " + help_lines}),
            "steps": ("INT", {"default": 200, "min": 1, "max": 1_000_000, "tooltip": "Optimiser steps."}),
            # text, not FLOAT: the frontend rounds FLOAT widgets to their display precision (5e-7 -> 1e-6)
            "learning_rate": ("STRING", {"default": "1e-4", "tooltip": f"Peak learning rate, as text: 1e-4, 5e-7, 0.00002 ({lo:g} to {hi:g}). "
                                                                        "LoRA DPO: 1e-5 to 1e-4; the papers' full fine-tunes use about 1e-8."}),
            "rank": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "LoRA rank."}),
            "alpha": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 1024.0, "step": 0.5, "tooltip": "LoRA alpha (the update is scaled by alpha / rank)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Pairs per step (before accumulation)."}),
            "gradient_accumulation_steps": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Micro-batches per optimiser step (effective batch = batch_size x this)."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Training resolution in pixels (square; images are resized and centre-cropped)."}),
            "training_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed for LoRA initialisation, data order, noise and timesteps."}),
            "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 1_000_000, "tooltip": "Save a resumable checkpoint every N steps (0: only at the end)."}),
            "target_modules": ("STRING", {"default": AUTO, "tooltip": "Comma-separated layer names that get a LoRA (suffixes of ComfyUI's diffusion_model paths), "
                                                                      "or auto: the model family's attention and MLP layers. " + presets_help()}),
            "lora_name": ("STRING", {"default": "prefalign", "tooltip": "Prefix of the saved file; method, steps and time are appended, so each run gets a new file."}),
        }, "optional": {  # optional: graphs saved before these inputs existed still run
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute the UNet's activations in the backward pass instead of keeping them: a fraction of the training memory (for SDXL at high resolution), for one more forward per step."}),
            "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue the latest run with this lora_name and method from its last checkpoint (after Cancel, an error or a restart); steps is the total to reach."}),
            "guidance": ("FLOAT", {"default": FAMILY_GUIDANCE, "min": FAMILY_GUIDANCE, "max": 100.0, "step": 0.1,
                                   "tooltip": "Guidance-distilled models (Flux.1-dev, Chroma): the guidance value the model is trained at (use the one you "
                                              "sample with). -1: the family's default (Flux 3.5, Chroma 0). Other models ignore it."}),
            "timestep_sampling": ([AUTO, *TIMESTEP_SAMPLINGS], {"default": AUTO, "tooltip": "How training timesteps are drawn on the model's own (shifted) "
                                                                                       "schedule. auto: as the family's reference training script (SD3: logit_normal; "
                                                                                       "the others: uniform)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, learning_rate):
        """Refuse a bad learning rate when the graph is queued, before anything runs."""
        try:
            parse_learning_rate(learning_rate)
        except ValueError as e:
            return str(e)
        return True

    def train(self, model, clip, vae, pairs, method, method_args, steps, learning_rate, rank, alpha, batch_size,
              gradient_accumulation_steps, resolution, training_seed, checkpoint_every, target_modules, lora_name,
              gradient_checkpointing=False, resume=False, guidance=FAMILY_GUIDANCE, timestep_sampling=AUTO):
        import torch
        from safetensors.torch import load_file

        from ..trainer.atomic import DiskFullError
        from ..trainer.config import make_config
        from ..trainer.loop import TrainHooks, train
        from ..trainer.methods import build_method, method_class
        from ..trainer.methods.fit import model_refusal
        from ..trainer.metrics import logged_losses
        from ..trainer.models.lora import LoraSpec
        from .comfy_backend import ComfyBackend, prediction_type_of
        from .comfy_families import default_targets, trained_guidance
        from .images import pil_to_tensor
        from .loss_plot import plot_loss
        from .model_probe import model_traits

        prompt_id, node_id = comfy_env.executing_context()
        # a new chart first: a run refused below must not leave the previous run's "done" showing
        state = live.start(node_id, prompt_id, steps, method)
        with live.ended_on_error(state):
            args = parse_method_args(method, method_args)
            base = model.model
            # a method that cannot train this model stops here, before it loads, with the trainer's message
            refusal = model_refusal(build_method(method, args),
                                    model_traits(base, prediction_type_of(model.get_model_object("model_sampling"))))
            if refusal:
                raise ValueError(refusal)
            targets = [t.strip() for t in target_modules.split(",") if t.strip()]
            if not targets:
                raise ValueError("target_modules is empty: write auto, or layer names such as to_q, to_k")
            if targets == [AUTO]:
                targets = list(default_targets(base))
            if len(pairs) == 0:
                raise ValueError("no preference pairs to train on")
            trained = trained_guidance(base, None if guidance == FAMILY_GUIDANCE else guidance)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            prefix = _slug(lora_name)
            root = comfy_env.output_dir() / "prefalign"
            runs = root / "runs"
            run_dir = latest_run(runs, f"{prefix}-{method}") if resume else runs / f"{prefix}-{method}-{stamp}"
            description = getattr(pairs, "description", "") or f"{len(pairs)} pairs"
            config = make_config({
                "model": "comfyui", "data": description, "method": method, "method_args": args, "rank": rank,
                "alpha": float(alpha), "target_modules": targets, "learning_rate": parse_learning_rate(learning_rate),
                "max_steps": steps, "batch_size": batch_size, "gradient_accumulation_steps": gradient_accumulation_steps,
                "resolution": resolution, "seed": training_seed, "output_dir": str(run_dir),
                "checkpoint_every": checkpoint_every,
                "cache_dir": str(root / "cache"), "lr_warmup_steps": 0,
                "log_every": 1,  # the live loss chart and progress bar move every step
                "resume": "latest" if resume else None,
                "timestep_sampling": None if timestep_sampling == AUTO else timestep_sampling,  # None: the family's
                **({} if trained is None else {"guidance": trained}),
            })
            metrics_file = run_dir / "metrics.jsonl"
            if resume:
                live.resume(state, logged_losses(metrics_file))
            pbar = comfy_env.progress_bar(steps, state["node"])
            cancel = {"requested": False}
            holder = {}

            def on_step(report):
                if "backend" in holder:
                    holder["backend"].cancel_while_encoding = False  # from now on Cancel stops at a step boundary
                live.step(state, report.step, report.metrics.get("loss"), report.metrics)
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
                lora = LoraSpec.from_config(config)  # the one description of the LoRA: the config's
                with torch.inference_mode(False), ComfyBackend(model, clip, vae, lora, seed=training_seed, model_name="comfyui",
                                                               gradient_checkpointing=gradient_checkpointing,
                                                               timestep_sampling=config.timestep_sampling,
                                                               guidance=config.guidance) as backend:
                    holder["backend"] = backend
                    result = train(config, backend, pairs, TrainHooks(on_step=on_step, should_stop=should_stop))
            except DiskFullError as e:
                raise DiskFullError(e.errno, f"{e.strerror} (here: turn resume on and queue again)") from None
            if result.steps == 0:  # cancelled before the first step: nothing worth saving
                live.finish(state, "stopped", message="cancelled before the first step")
                comfy_env.throw_if_interrupted()
                comfy_env.raise_interrupt()
            if result.lora_path is None:
                raise RuntimeError("the trainer wrote no LoRA file")
            rel = publish_lora(Path(result.lora_path), f"{prefix}_{method}_{result.steps}steps_{stamp}.safetensors")
            live.finish(state, "stopped" if result.stopped else "done", lora=rel,
                        message=f"saved {rel} after {result.steps} steps")
            if result.stopped:  # report the Cancel to ComfyUI (execution_interrupted); the file is already saved
                comfy_env.throw_if_interrupted()
                comfy_env.raise_interrupt()
            lora_sd = load_file(str(comfy_env.loras_dir() / rel))
            if method_class(method).negative_branch:  # an NPO LoRA belongs in the negative branch of CFG only
                from .npo_node import negative_branch_lora

                model_out = negative_branch_lora(model, lora_sd, 1.0)
            else:
                import comfy.sd

                model_out, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
            curve = pil_to_tensor(plot_loss(logged_losses(metrics_file), f"{method} loss"))
            ui = {"prefalign_train": [{"node": state["node"], "lora": rel, "steps": result.steps, "stopped": result.stopped,
                                       "metrics": {k: float(v) for k, v in result.metrics.items()}}],
                  "prefalign_text": [f"saved models/loras/{rel} ({result.steps} steps)"]}
            return {"ui": ui, "result": (model_out, lora_sd, curve, rel)}


def publish_lora(trained: Path, name: str) -> str:
    """Copy a run's LoRA into models/loras/prefalign/ atomically (fsynced; a full disk leaves no partial file);
    returns its name for LoraLoader."""
    from ..trainer.atomic import DiskFullError, atomic_path

    rel = f"prefalign/{name}"
    try:
        with atomic_path(comfy_env.loras_dir() / rel) as tmp:
            shutil.copyfile(trained, tmp)
    except DiskFullError:
        run = trained.parent
        raise DiskFullError(errno.ENOSPC, f"disk full while copying the LoRA into models/loras/{rel}; nothing was "
                                          f"written there, and the trained file is kept in output/prefalign/runs/"
                                          f"{run.name}/{trained.name}. Free some space and copy it, or queue again "
                                          "with resume on") from None
    return rel


NODES = {"PrefAlignTrainLoRA": (TrainPreferenceLoRA, "Train Preference LoRA (DPO and more)")}
