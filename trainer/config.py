"""The training configuration: one dataclass, loaded from TOML, overridden by command-line flags."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .limits import MAX_CELL_BYTES, MAX_IMAGE_BYTES, MAX_PIXELS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")  # trainer/forward_process.py
QUANTIZE = ("no", "nf4", "int8")  # trainer/models/flow_loading.py


@dataclass(kw_only=True)
class TrainConfig:
    """Every option of a training run. Each field is also a `--flag` of `python -m trainer train`.
    `model` and `data` have no default: a run names what it trains (the toy world is `model = "toy"`,
    or `python -m trainer demo`)."""

    # model
    model: str = field(metadata={"help": "diffusers folder, hub id (owner/name), single-file .safetensors, or toy (the built-in toy model; tiny-sd / tiny-sdxl: untrained test models)"})
    vae: str | None = field(default=None, metadata={"help": "optional VAE folder or hub id (e.g. an fp16-fixed SDXL VAE)"})
    model_config: str | None = field(default=None, metadata={"help": "diffusers folder or hub id describing a single-file checkpoint's architecture (default: inferred; the standard SD1.5/SDXL configs need the hub once); required for a single-file SD3/Flux transformer, whose VAE, text encoders and scheduler it provides"})
    drop_t5: bool = field(default=False, metadata={"help": "SD3/SD3.5: train without the T5 text encoder (zeros in its place, as the pipeline without text_encoder_3): ~9.5 GB less to load, shorter prompts understood"})
    guidance: float = field(default=3.5, metadata={"help": "Flux.1-dev: the guidance-embedding value during training (diffusers' flux training default; use the value you sample with); ignored by models without one (schnell, SD3)"})
    quantize: str = field(default="no", metadata={"help": f"SD3/Flux: load the frozen transformer quantised ({', '.join(QUANTIZE)}; bitsandbytes, CUDA, extra 'prefalign[bnb]'); NF4 stores Flux.1's 12B weights in about 6 GB"})
    # data
    data: str = field(metadata={"help": "parquet file or folder, images folder with pairs.jsonl, Hugging Face dataset id (owner/name, or hf:NAME), or tiny (8 built-in test pairs)"})
    split: str = field(default="train", metadata={"help": "dataset split (HF datasets)"})
    streaming: bool = field(default=False, metadata={"help": "stream a HF dataset instead of downloading it whole"})
    keep_ties: bool = field(default=False, metadata={"help": "keep tied pairs (label 0.5) with jpg_0 first; dropped by default"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "skip and count rows whose images do not decode instead of stopping"})
    max_examples: int | None = field(default=None, metadata={"help": "use at most this many rows"})
    max_pixels: int = field(default=MAX_PIXELS, metadata={"help": "refuse images with more pixels, from their header (decompression bombs); see docs/security.md"})
    max_image_bytes: int = field(default=MAX_IMAGE_BYTES, metadata={"help": "refuse images whose decoded samples (width x height x bands x bytes per sample) exceed this many bytes, e.g. a huge 16-bit PNG"})
    max_cell_bytes: int = field(default=MAX_CELL_BYTES, metadata={"help": "refuse parquet pages (each holds one or more cells) above this many bytes before reading them; memory per read is about this much"})
    allow_outside_paths: bool = field(default=False, metadata={"help": "let image paths in a dataset (pairs.jsonl, parquet or HF path cells) point outside its folder"})
    resolution: int = field(default=512, metadata={"help": "training resolution in pixels (square)"})
    center_crop: bool = field(default=True, metadata={"help": "centre crop (else random crop)"})
    random_flip: bool = field(default=False, metadata={"help": "flip both images of a pair horizontally at random"})
    # method
    method: str = field(default="dpo", metadata={"help": "alignment method; see `python -m trainer methods`"})
    method_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "method hyper-parameters, e.g. beta=2500 (TOML table [method_args])"})
    embedder: str | None = field(default=None, metadata={"help": "CLIP model (path or hub id) for methods that need embeddings; default: the pipeline's text encoder"})
    # LoRA
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=8.0, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    target_modules: list[str] | None = field(default=None, metadata={"help": "denoiser modules that get a LoRA (name suffixes); default per family: SD1.5/SDXL to_q to_k to_v to_out.0; SD3 and Flux attention q/k/v/out of image and text streams (to_* and add_*_proj, to_add_out) and both MLPs (ff.net.0.proj ff.net.2 ff_context.net.0.proj ff_context.net.2); Flux also proj_mlp proj_out (single blocks)"})
    # optimisation
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (LoRA DPO: 1e-5..1e-4)"})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": f"one of {', '.join(LR_SCHEDULERS)}"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    use_8bit_adam: bool = field(default=False, metadata={"help": "8-bit AdamW (needs bitsandbytes)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clipping (0 disables)"})
    batch_size: int = field(default=1, metadata={"help": "pairs per device per micro-step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimiser step"})
    max_steps: int = field(default=1000, metadata={"help": "optimiser steps"})
    mixed_precision: str = field(default="no", metadata={"help": f"one of {', '.join(MIXED_PRECISION)}"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations to save memory (UNet blocks / transformer blocks)"})
    timestep_sampling: str | None = field(default=None, metadata={"help": f"how training timesteps are drawn: {', '.join(TIMESTEP_SAMPLINGS)}; default per family: uniform (SD1.5, SDXL, Flux), logit_normal (SD3), as diffusers' training scripts"})
    logit_mean: float = field(default=0.0, metadata={"help": "timestep_sampling logit_normal: mean of the normal (SD3 paper: 0)"})
    logit_std: float = field(default=1.0, metadata={"help": "timestep_sampling logit_normal: standard deviation (SD3 paper: 1)"})
    mode_scale: float = field(default=1.29, metadata={"help": "timestep_sampling mode: scale (SD3 paper: 1.29)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet (faster steps after a warm-up)"})
    seed: int = field(default=0, metadata={"help": "seed for data order, noise and timesteps"})
    # output
    output_dir: str = field(default="out", metadata={"help": "where lora.safetensors, metrics.jsonl, config.toml and checkpoints/ go"})
    checkpoint_every: int = field(default=500, metadata={"help": "save a resumable checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "keep the newest N checkpoints"})
    resume: str | None = field(default=None, metadata={"help": "latest (the newest checkpoint in OUTPUT/checkpoints; none: train from scratch), or a checkpoint folder; the run's other options must match the folder's config.toml"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh in an output folder that holds another run: its LoRA, metrics and checkpoints are deleted once the new run starts"})
    log_every: int = field(default=10, metadata={"help": "read metrics from the device (a host sync) and log them every N steps"})
    tensorboard: bool = field(default=False, metadata={"help": 'also log to TensorBoard under OUTPUT/tensorboard (pip install "prefalign[tensorboard]")'})
    cache_dir: str | None = field(default=None, metadata={"help": "on-disk cache of latents and text embeddings, shared by runs (default: $PREFALIGN_CACHE/encodings, else ~/.cache/prefalign/encodings)"})
    cache: bool = field(default=True, metadata={"help": "encode images and prompts once and reuse them (then the VAE and text encoders leave the GPU); off: encode every step"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})

    def __post_init__(self) -> None:
        """Every value is checked here, before anything loads or is written; errors name the key."""
        choices = {"mixed_precision": MIXED_PRECISION, "lr_scheduler": LR_SCHEDULERS, "quantize": QUANTIZE,
                   "timestep_sampling": TIMESTEP_SAMPLINGS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed and not (key == "timestep_sampling" and self.timestep_sampling is None):
                raise ConfigError(key, f"{getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("rank", "batch_size", "gradient_accumulation_steps", "max_steps", "resolution", "log_every",
                    "max_pixels", "max_image_bytes", "max_cell_bytes"):
            _check(key, getattr(self, key) >= 1, "must be at least 1", getattr(self, key))
        for key in ("lr_warmup_steps", "checkpoint_every", "keep_checkpoints", "num_workers", "seed"):
            _check(key, getattr(self, key) >= 0, "must be 0 or more", getattr(self, key))
        for key in ("learning_rate", "adam_epsilon", "weight_decay", "max_grad_norm"):
            _check(key, math.isfinite(getattr(self, key)) and getattr(self, key) >= 0, "must be a finite number, 0 or more",
                   getattr(self, key))
        for key in ("adam_beta1", "adam_beta2"):
            _check(key, 0 <= getattr(self, key) < 1, "must be in [0, 1)", getattr(self, key))
        _check("alpha", math.isfinite(self.alpha) and self.alpha > 0, "must be a finite number above 0", self.alpha)
        _check("resolution", self.resolution % 8 == 0, "must be a multiple of 8", self.resolution)
        _check("seed", self.seed < 2**63, "must be below 2**63", self.seed)
        if self.max_examples is not None:
            _check("max_examples", self.max_examples >= 1, "must be at least 1", self.max_examples)
        _check("target_modules", self.target_modules is None or (bool(self.target_modules) and all(
            t.strip() for t in self.target_modules)), "needs at least one module name, none empty", self.target_modules)
        _check("logit_std", math.isfinite(self.logit_std) and self.logit_std > 0, "must be a finite number above 0",
               self.logit_std)
        for key in ("model", "data", "split", "output_dir", "method"):
            _check(key, bool(getattr(self, key).strip()), "may not be empty", getattr(self, key))
        for key in ("vae", "model_config", "embedder", "cache_dir", "resume"):
            _check(key, getattr(self, key) is None or bool(getattr(self, key).strip()), "may not be empty", getattr(self, key))
        from .methods.args import resolve_method_args  # imports torch: only once the plain values are fine

        self.method_args = resolve_method_args(self.method, self.method_args)  # defaults recorded too


def _check(key: str, ok: bool, problem: str, value: Any) -> None:
    if not ok:
        raise ConfigError(key, f"{problem}, got {value!r}")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key {key!r}: {problem}")
        self.key = key


def config_fields() -> dict[str, tuple[dataclasses.Field, Any]]:
    """Field objects with their resolved types, in declaration order."""
    hints = get_type_hints(TrainConfig)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(TrainConfig)}


def field_default(f: dataclasses.Field) -> Any:
    """A config field's default (a fresh one from its factory), or `dataclasses.MISSING` when the field is required."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check (and widen int -> float) one value against its annotated type; errors name the key."""
    text = str(annotation)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(key, "may not be empty")
    if annotation is bool or text.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if annotation is float or text.startswith("float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if annotation is int or text.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if annotation is str or text.startswith("str"):
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    if text.startswith("list"):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    if text.startswith("dict"):
        if isinstance(value, dict):
            return value
        raise ConfigError(key, f"expected a table, got {value!r}")
    raise ConfigError(key, f"unsupported type {annotation}")  # pragma: no cover


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Build a config from plain values; unknown keys and wrong types name the key."""
    fields = config_fields()
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(key, "unknown option (see `python -m trainer train --help`)")
        checked[key] = coerce(key, value, fields[key][1])
    for key, (f, _) in fields.items():
        if key not in checked and field_default(f) is dataclasses.MISSING:
            raise ConfigError(key, f"required (--{key.replace('_', '-')}, or {key} = ... in the --config file): "
                                   f"{f.metadata['help']}. `python -m trainer demo` shows the toy world end to end")
    return TrainConfig(**checked)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path}: {e}") from None


#: What a run does once rather than what it is: not recorded in config.toml, never compared.
ACTIONS = ("resume", "overwrite")
#: Keys a resumed run may change: where files go, how often they are written, how fast it runs, how far it
#: trains, and how each global batch is split (a resume on another number of processes changes batch_size or
#: gradient_accumulation_steps; see docs/distributed.md). Any other difference changes what is trained, so a
#: resume with it is refused.
CHANGEABLE_ON_RESUME = ("output_dir", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "tensorboard",
                        "cache_dir", "cache", "num_workers", "compile", "gradient_checkpointing", "batch_size",
                        "gradient_accumulation_steps", "max_pixels", "max_image_bytes", "max_cell_bytes")


def to_toml(config: TrainConfig) -> str:
    """The resolved configuration as TOML (written to OUTPUT/config.toml), without the one-off actions."""
    lines, tables = [], []
    for key, value in dataclasses.asdict(config).items():
        if value is None or key in ACTIONS:
            continue
        if isinstance(value, dict):
            tables.append(f"\n[{key}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in value.items() if v is not None))
        else:
            lines.append(f"{key} = {_toml_value(value)}\n")
    return "".join(lines) + "".join(tables)


def config_differences(recorded: dict[str, Any], config: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: recorded -> now` for each key whose value in `config` differs from a recorded config.toml's
    (a key the file lacks counts as its default: unset, or written by a version without it)."""
    from .methods.args import resolve_method_args

    now, before = tomllib.loads(to_toml(config)), dict(recorded)
    try:  # an older config.toml records only the method options that were set
        before["method_args"] = resolve_method_args(before.get("method", config.method), before.get("method_args", {}))
    except (ValueError, TypeError):
        pass  # compared as written
    changes = []
    for key, (f, _) in config_fields().items():
        if key in ACTIONS or key in ignore:
            continue
        default = field_default(f)
        old, new = before.get(key, None if default is dataclasses.MISSING else default), now.get(key)
        if key == "method_args" and before.get("method", config.method) != config.method:
            continue  # another method: its options differ as a whole, and `method` already says so
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key}.{k}: {_shown(old.get(k))} -> {_shown(new.get(k))}"  # a hyper-parameter left to the
                        for k in sorted(set(old) | set(new)) if k in new and old.get(k) != new.get(k)]  # model: absent
        elif old != new:
            changes.append(f"{key}: {_shown(old)} -> {_shown(new)}")
    return changes


def _shown(value: Any) -> str:
    return "unset" if value is None else _toml_value(value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
