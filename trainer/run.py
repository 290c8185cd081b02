"""Assemble a headless run from a config: ranks, backend, data, loop; print a summary a person can act on."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig
from .data.errors import DataError
from .data.records import PreferenceExample
from .distributed import Ranks
from .loop import TrainHooks, TrainResult, train
from .models.factory import make_backend
from .models.tiny import cache_root
from .run_folder import plan_output_dir

def open_config_examples(config: TrainConfig):
    """The dataset the config names (`tiny` is built in)."""
    from .data.sources import DataSpec, open_examples
    from .data.tiny import write_tiny_dataset

    source = str(write_tiny_dataset(cache_root() / "data" / "tiny")) if config.data == "tiny" else config.data
    spec = DataSpec(source=source, split=config.split, streaming=config.streaming, keep_ties=config.keep_ties,
                    skip_bad_rows=config.skip_bad_rows, limit=config.max_examples,
                    max_cell_bytes=config.max_cell_bytes, allow_outside_paths=config.allow_outside_paths)
    return open_examples(spec)


def make_ranks() -> Ranks:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        return Ranks.from_environment(cpu=cpu or not torch.cuda.is_available())
    return Ranks.single("cuda" if torch.cuda.is_available() else "cpu")


def check_runtime(config: TrainConfig) -> None:
    """Refuse, before anything loads, options whose packages are missing and models that cannot load."""
    import importlib.util

    from .models.loading import check_model_source

    extras = {"tensorboard": ("tensorboard", 'pip install "prefalign[tensorboard]"'),
              "use_8bit_adam": ("bitsandbytes", 'pip install "prefalign[bnb]"')}
    for key, (package, fix) in extras.items():
        if getattr(config, key) and importlib.util.find_spec(package) is None:
            raise ConfigError(key, f"needs the {package} package, which is not installed: {fix}")
    for key in ("model", "vae", "model_config", "embedder"):
        if getattr(config, key) is not None:
            check_model_source(getattr(config, key), f"config key {key!r}")


def run(config: TrainConfig, hooks: TrainHooks | None = None, examples: list[PreferenceExample] | None = None,
        resume_hint: str | None = None) -> TrainResult:
    """Check everything that can be checked, open the data, load the model, train, print the summary.
    `resume_hint`: the command that continues this run (shown in the summary)."""
    check_runtime(config)
    if examples is None:
        try:
            examples = open_config_examples(config)
        except DataError as e:
            raise ConfigError("data", str(e)) from None
    ranks = make_ranks()
    try:
        for note in plan_output_dir(config).notes if ranks.is_main else ():  # refuses a folder another run owns
            print(note, file=sys.stderr)
        torch.manual_seed(config.seed)
        backend = make_backend(config, ranks.device)
        result = train(config, backend, examples, hooks, ranks)
    finally:
        ranks.close()
    if ranks.is_main:
        print(summary(result, resume_hint))
        if result.stopped and resume_hint:
            print(f"stopped at step {result.steps}; continue with: {resume_hint}", file=sys.stderr)
    return result


def summary(result: TrainResult, resume_hint: str | None = None) -> str:
    m = result.metrics
    shown = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss", "implicit_acc", "reward_margin") if k in m)
    lora = Path(result.lora_path).resolve() if result.lora_path else None
    d = result.data
    lines = [
        f"{'Stopped' if result.stopped else 'Finished'} after {result.steps} steps ({shown}).",
        f"Data:        rows read {d.get('rows_read', 0)}, ties dropped {d.get('ties_dropped', 0)}, "
        f"bad rows skipped {d.get('bad_rows_skipped', 0)}",
        f"LoRA:        {lora}",
        f"Metrics:     {result.output_dir / 'metrics.jsonl'}",
        f"Checkpoint:  {result.checkpoint}" + (f"  (continue with: {resume_hint})" if resume_hint else ""),
        "Use it:      ComfyUI: copy the file into models/loras and pick it in LoraLoader;",
        f"             diffusers: pipe.load_lora_weights('{lora}')",
    ]
    return "\n".join(lines)
