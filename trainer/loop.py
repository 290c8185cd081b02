"""The training loop: generic over methods (it reads only their declared needs) and over backends.

nanoGPT-style: everything a step does is readable in `train`. The CLI and the ComfyUI node both
drive it; they pass hooks for progress and for a stop request.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .atomic import write_text
from .batches import BatchStream
from .checkpoint import TrainingState, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data.records import PreferenceExample
from .distributed import Ranks
from .export import lora_metadata, write_lora
from .methods import EMBEDDINGS, Method, build_method
from .methods.fit import ModelTraits, model_refusal
from .metrics import MetricsLog, MetricsMeter, Progress
from .models.backend import Backend
from .optim import make_lr_scheduler, make_optimizer
from .run_folder import plan_output_dir, start_run_folder
from .step import compute_outputs, draw_noise


@dataclass
class StepReport:
    step: int
    total: int
    metrics: dict[str, float]


@dataclass
class TrainHooks:
    on_step: Callable[[StepReport], None] | None = None  # after each logged optimiser step
    should_stop: Callable[[], bool] | None = None  # checked at every step boundary
    on_start: Callable[[int], None] | None = None  # the run has started (its folder is written), at this step


@dataclass
class TrainResult:
    steps: int
    metrics: dict[str, float]
    output_dir: Path
    lora_path: Path | None
    stopped: bool
    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)  # what the output folder check found (see run_folder.py)
    data: dict[str, int] = field(default_factory=dict)  # rows read, ties dropped, bad rows skipped


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_compatible(method: Method, examples: Sequence[PreferenceExample], backend: Backend,
                     embedder: str | None = None) -> Method:
    """Refuse, before any encoding, a method that cannot train on this data or model; else the method configured
    for the model (flow defaults)."""
    model = ModelTraits(backend.prediction_type, backend.model_info().get("architecture", "this"),
                        backend.embeddings, backend.alphas_cumprod is not None)
    refusal = model_refusal(method, model, embedder)
    if refusal:
        raise ValueError(refusal)
    if hasattr(examples, "__len__") and len(examples) == 0:
        raise ValueError("the dataset is empty")
    paired = getattr(examples, "paired", None)
    if paired is None:
        paired = examples[0].is_pair
    if method.paired and not paired:
        raise ValueError(f"method {method.name!r} trains on chosen/rejected pairs, but the dataset holds single "
                         "labelled images; use a pairwise dataset or an unpaired method such as kto")
    return method.for_model(model.prediction_type, model.architecture)


def train(config: TrainConfig, backend: Backend, examples: Sequence[PreferenceExample],
          hooks: TrainHooks | None = None, ranks: Ranks | None = None) -> TrainResult:
    """Train the backend's adapter on `examples` with `config.method`; write the LoRA and checkpoints."""
    hooks = hooks or TrainHooks()
    ranks = ranks or Ranks.single()
    method = check_compatible(build_method(config.method, config.method_args), examples, backend, config.embedder)
    config = dataclasses.replace(config, method_args=method.options())  # model-dependent defaults as used (flow betas)
    plan = plan_output_dir(config)  # refuses a folder that another run owns, before any work
    if EMBEDDINGS in method.needs and config.embedder:
        from .models.embedder import EmbeddingBackend

        backend = EmbeddingBackend(backend, config.embedder)
    out = Path(config.output_dir)
    ckpt_root = out / "checkpoints"

    params = backend.trainable_parameters()
    optimizer = make_optimizer(config, params)
    lr_scheduler = make_lr_scheduler(config, optimizer)
    generator = torch.Generator().manual_seed(config.seed)
    stream = BatchStream(config, backend, examples, method, ranks)
    step, metrics = 0, {}
    if plan.resume_from is not None:
        state = load_checkpoint(plan.resume_from)
        backend.load_adapter_state_dict(state.adapter)
        optimizer.load_state_dict(state.optimizer)
        lr_scheduler.load_state_dict(state.lr_scheduler)
        generator.set_state(state.generator)
        stream.load_state_dict(state.data)
        method.load_state_dict(state.extra.get("method", {}))
        step, metrics = state.step, state.extra.get("metrics", {})
    if config.resume:
        ranks.check_agree(step, "the step to resume from (every rank must see the checkpoints rank 0 writes: "
                                "put output_dir on storage that all machines share)")
    if ranks.is_main:  # the run has started: only now does the folder become this run's
        start_run_folder(config, plan)
    log = MetricsLog(out / "metrics.jsonl", enabled=ranks.is_main, after_step=step, tensorboard=config.tensorboard)
    meter = MetricsMeter()
    progress = Progress(config.max_steps, step, ranks.is_main)
    autocast = _autocast(config.mixed_precision, backend.device)
    scaler = torch.amp.GradScaler(backend.device.type, enabled=config.mixed_precision == "fp16")
    accum = config.gradient_accumulation_steps
    # resume latest: the plan's checkpoint is the newest good one (load_checkpoint checked its tensors again)
    last_good = plan.resume_from if config.resume == "latest" else latest_checkpoint(ckpt_root)
    stopped = False

    def checkpoint() -> Path | None:
        if not ranks.is_main:
            return None
        state = TrainingState(step, backend.adapter_state_dict(), optimizer.state_dict(), lr_scheduler.state_dict(),
                              generator.get_state(), stream.state_dict(),
                              extra={"metrics": metrics, "method": method.state_dict()})
        return save_checkpoint(ckpt_root, state, config.keep_checkpoints)

    def log_step() -> dict[str, float]:
        logged = ranks.average_metrics(meter.read())
        logged["lr"] = lr_scheduler.get_last_lr()[0]
        if not math.isfinite(logged["loss"]):
            raise NonFiniteLossError(_stopped(f"loss is {logged['loss']} at step {step}", last_good))
        log.write(step, logged)
        progress.update(step, logged)
        if hooks.on_step is not None:
            hooks.on_step(StepReport(step, config.max_steps, logged))
        return logged

    if hooks.on_start is not None:
        hooks.on_start(step)
    backend.model.train()
    try:
        while step < config.max_steps:
            if hooks.should_stop is not None and ranks.any(hooks.should_stop()):  # every rank stops at the same step
                stopped = True
                if meter.sums:  # steps since the last log: the summary and the final checkpoint show where it stopped
                    metrics = log_step()
                break
            for _ in range(accum):
                batch = stream.next_batch()
                noise = draw_noise(method, batch.global_shape, batch.local.paired, backend.timestep_sampling, generator)
                with autocast:
                    outputs = compute_outputs(backend, method, batch.local, noise.take(batch.rows))
                    loss, step_metrics = method.loss(outputs)
                scaler.scale(loss / accum).backward()
                meter.add(step_metrics)
            ranks.average_gradients(params)
            scaler.unscale_(optimizer)
            if config.max_grad_norm > 0:
                meter.add({"grad_norm": torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)})
            scaler.step(optimizer)
            scaler.update()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            save_now = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            if step % config.log_every == 0 or step == config.max_steps or save_now:  # a checkpoint needs a finite check
                metrics = log_step()
                if save_now:
                    _check_finite_adapter(params, step, last_good)
                    last_good = checkpoint() or last_good
    finally:  # on an error too: the bar ends its line (the message prints below it), decoding workers stop
        progress.close()
        stream.close()
        log.close()
    result = TrainResult(step, metrics, out, None, stopped, notes=plan.notes, data=stream.stats.as_dict())
    if step > 0:
        _check_finite_adapter(params, step, last_good)  # every rank: they hold the same weights
    if ranks.is_main:
        if step > 0 and (last_good is None or not last_good.name.endswith(f"-{step}")):
            last_good = checkpoint()
        result.checkpoint = last_good
        meta = lora_metadata(config, backend.model_info(), step, metrics)
        result.lora_path = write_lora(out / "lora.safetensors", backend.export_lora(), meta)
        write_text(out / "summary.json", json.dumps({"steps": step, "stopped": stopped, "metrics": metrics,
                                                     "data": result.data, "lora": str(result.lora_path)}, indent=2))
    ranks.barrier()
    return result


def _check_finite_adapter(params: list[torch.nn.Parameter], step: int, last_good: Path | None) -> None:
    """Never save NaN/inf weights (a finite loss can still come with non-finite gradients)."""
    if not bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
        raise NonFiniteLossError(_stopped(f"the LoRA weights became NaN or infinite at step {step}", last_good))


def _stopped(problem: str, last_good: Path | None) -> str:
    return (f"{problem}; stopped. Last good checkpoint: {last_good or 'none'}. "
            "Lower the learning rate or beta, or use bf16/fp32 instead of fp16.")


def _autocast(mixed_precision: str, device: torch.device) -> torch.autocast:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
