"""Assemble a headless run from a config: ranks, backend, data, loop; print a summary a person can act on."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import TrainConfig
from .data.records import PreferenceExample
from .distributed import Ranks
from .loop import TrainHooks, TrainResult, train
from .methods import build_method
from .models.factory import make_backend
from .models.tiny import cache_root


def open_config_examples(config: TrainConfig):
    """The dataset the config names (`tiny` is built in)."""
    from .data.sources import DataSpec, open_examples
    from .data.tiny import write_tiny_dataset

    source = str(write_tiny_dataset(cache_root() / "data" / "tiny")) if config.data == "tiny" else config.data
    spec = DataSpec(source=source, split=config.split, streaming=config.streaming, keep_ties=config.keep_ties,
                    skip_bad_rows=config.skip_bad_rows, limit=config.max_examples)
    return open_examples(spec)


def make_ranks() -> Ranks:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        return Ranks.from_environment(cpu=cpu or not torch.cuda.is_available())
    return Ranks.single("cuda" if torch.cuda.is_available() else "cpu")


def run(config: TrainConfig, hooks: TrainHooks | None = None, examples: list[PreferenceExample] | None = None) -> TrainResult:
    build_method(config.method, config.method_args)  # a bad method option stops before any model loads
    ranks = make_ranks()
    torch.manual_seed(config.seed)
    backend = make_backend(config, ranks.device)
    result = train(config, backend, examples if examples is not None else open_config_examples(config), hooks, ranks)
    if ranks.is_main:
        print(summary(result))
    return result


def summary(result: TrainResult) -> str:
    m = result.metrics
    shown = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss", "implicit_acc", "reward_margin") if k in m)
    lora = Path(result.lora_path).resolve() if result.lora_path else None
    lines = [
        f"{'Stopped' if result.stopped else 'Finished'} after {result.steps} steps ({shown}).",
        f"LoRA:        {lora}",
        f"Metrics:     {result.output_dir / 'metrics.jsonl'}",
        f"Checkpoint:  {result.checkpoint}  (continue with --resume latest)",
        "Use it:      ComfyUI: copy the file into models/loras and pick it in LoraLoader;",
        f"             diffusers: pipe.load_lora_weights('{lora}')",
    ]
    return "\n".join(lines)
