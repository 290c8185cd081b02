"""An output folder belongs to one run: decide, before anything loads, whether this run may use it.

- An empty or new folder: the run starts there.
- A folder that holds a run (its config.toml, LoRA, metrics or checkpoints):
  - with `resume`: continued only if the recorded config.toml matches in every key that changes the
    result (`CHANGEABLE_ON_RESUME` may differ); `resume = "latest"` without a checkpoint trains from
    scratch and says so;
  - with `overwrite`: that run's files are deleted once the new run has started;
  - otherwise refused, naming the keys that differ (or, for the same config, pointing at
    `--resume latest` and `--overwrite`). A same-config run that never saved a checkpoint starts over.
Nothing is written here: `start_run_folder` writes config.toml only once the run has started, so a
run that fails to start leaves the folder as it was.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text
from .checkpoint import STEP_DIR, list_checkpoints, resolve_resume
from .config import CHANGEABLE_ON_RESUME, ConfigError, TrainConfig, config_differences, to_toml, tomllib

#: The files and folders a run writes into its output folder.
RUN_FILES = ("config.toml", "lora.safetensors", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard")


@dataclass
class FolderPlan:
    resume_from: Path | None = None  # the checkpoint to continue from
    clear: bool = False  # delete the previous run's files when this one starts
    notes: list[str] = field(default_factory=list)  # what a person should be told before the run


def _recorded_config(folder: Path) -> dict[str, Any] | None:
    try:
        return tomllib.loads((folder / "config.toml").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("output_dir", f"{folder / 'config.toml'} does not read ({e}); move that folder away or "
                                        "choose another --output-dir") from None


def plan_output_dir(config: TrainConfig) -> FolderPlan:
    """What this run will do with its output folder; refuses (ConfigError) a folder another run owns."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("output_dir", f"{out} is a file, not a folder")
    if config.resume and config.overwrite:
        raise ConfigError("overwrite", "cannot be combined with resume: resume continues the run in the folder, "
                                       "overwrite deletes it")
    if config.resume:
        return _plan_resume(config, out)
    held = [name for name in RUN_FILES if (out / name).exists()]
    if not held:
        return FolderPlan()
    if config.overwrite:
        return FolderPlan(clear=True, notes=[f"overwrite: the run in {out} is replaced once this one starts"])
    recorded = _recorded_config(out)
    if recorded is None:
        raise ConfigError("output_dir", f"{out} holds files of another run ({', '.join(held)}) without its "
                                        "config.toml; choose another --output-dir, or replace them with --overwrite")
    changed = config_differences(recorded, config)
    if changed:
        raise ConfigError("output_dir", f"{out} holds another run, whose config differs in {'; '.join(changed)}. "
                                        "Choose another --output-dir, or replace that run with --overwrite")
    found = list_checkpoints(out / "checkpoints")
    if found:
        raise ConfigError("output_dir", f"{out} already holds this run (checkpoint {found[-1].name}); continue it "
                                        "with --resume latest, or start it afresh with --overwrite")
    return FolderPlan(clear=True, notes=[f"{out} holds this run without a checkpoint: it starts over"])


def _plan_resume(config: TrainConfig, out: Path) -> FolderPlan:
    folder = resolve_resume(config.resume, out / "checkpoints")
    owner = folder.parent.parent if folder is not None else out  # the run folder the checkpoint belongs to
    recorded = _recorded_config(owner)
    if recorded is not None:
        changed = config_differences(recorded, config, ignore=CHANGEABLE_ON_RESUME)
        if changed:
            raise ConfigError("resume", f"the run in {owner} was trained with other values: {'; '.join(changed)}. "
                                        "Resume with the same values, or start a new run in another --output-dir")
    if folder is None:
        return FolderPlan(notes=[f"resume: no checkpoint in {out / 'checkpoints'}, so the run trains from scratch"])
    plan = FolderPlan(resume_from=folder, notes=[f"resuming from {folder}"])
    match = STEP_DIR.match(folder.name)
    step = int(match.group(1)) if match else 0
    if step >= config.max_steps:
        plan.notes.append(f"the run already reached step {step} (max_steps = {config.max_steps}): nothing to "
                          "train; raise --max-steps to train further")
    return plan


def start_run_folder(config: TrainConfig, plan: FolderPlan) -> None:
    """The run has started: the folder becomes this run's (a replaced run's files go) and config.toml is written."""
    out = Path(config.output_dir)
    if plan.clear:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.toml", to_toml(config))
