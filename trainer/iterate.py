"""`python -m trainer iterate`: online rounds of AI-feedback preference training.

Round r: generate K images per prompt with the LoRA of round r-1 (the base model in round 1), judge and
pair them (`trainer pairs`), continue training that LoRA on the new pairs (the reference stays the base
model: the trainer's reference is the model with the adapter switched off), then evaluate it against the
base model on a fixed evaluation set (the same prompts and seeds every round). Each round's seeds are new
(round r, prompt i, image k: seed + ((r-1)·P + i)·K + k for P prompts), so no image repeats across rounds.

The run folder holds `iterate.json` (settings and progress), `round-R/pairs/` (the round's dataset),
`round-R/train/` (its LoRA and checkpoints), `round-R/eval.json`, and the per-round table `rounds.md` /
`rounds.json`: for every judge, the mean score of the LoRA's samples, the win rate against the base model
over decided pairs (95% Wilson interval) with wins/ties/losses, and the pairs kept. Stop at any point (even
kill -9) and continue with `--resume latest`: finished rounds are kept, a round's pairs resume from the last
finished prompt and its training from the last checkpoint (`--checkpoint-every`).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
from pathlib import Path
from typing import Sequence

import torch

from .atomic import write_text
from .config import ConfigError, TrainConfig
from .owned_folder import OwnedFolder
from .pairs import PairsSettings, make_pairs
from .scorers import Scorer

STATE = "iterate.json"
FORMAT = "prefalign-iterate/1"
# train options that never change what a round computes, or that iterate sets per round
NOT_SETTINGS = ("output_dir", "resume", "data", "cache_dir", "num_workers", "log_every", "tensorboard")


@dataclasses.dataclass
class EvalSet:
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance_scale: float


class RunFolder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.owner = OwnedFolder(root, STATE, FORMAT, "an iterate run")

    def round_dir(self, r: int) -> Path:
        return self.root / f"round-{r}"

    def check(self, settings: dict, resume: bool) -> dict:
        """The run's state to continue, or a fresh one; refuses a folder another run owns."""
        state = self.owner.claim(settings, resume, lambda s: f"{len(s['rounds'])} rounds done", "--resume latest")
        return state or {"format": FORMAT, "settings": settings, "rounds": {}}

    def save(self, state: dict) -> None:
        self.owner.save(state)


def release_memory() -> None:
    """Hand freed models back (call after `del`-ing the last reference): generation and training alternate."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_round(config: TrainConfig, data: Path, output: Path, previous_lora: Path | None) -> Path:
    """Train (or finish training) one round's LoRA, starting from the previous round's; returns the file."""
    from .export import load_lora_into
    from .loop import train
    from .run import make_backend, make_ranks, open_config_examples

    summary = output / "summary.json"
    if summary.is_file():
        done = json.loads(summary.read_text())
        if done.get("steps") == config.max_steps and not done.get("stopped"):
            return output / "lora.safetensors"
    # "latest" continues from this round's last checkpoint, and starts afresh when there is none yet
    round_config = dataclasses.replace(config, data=str(data), output_dir=str(output), resume="latest",
                                       cache_dir=config.cache_dir or str(output.parent.parent / ".cache"))
    ranks = make_ranks()
    try:  # as run.run: the process group is left after each round, on an error too
        torch.manual_seed(round_config.seed)
        backend = make_backend(round_config, ranks.device)
        if previous_lora is not None:
            load_lora_into(backend, previous_lora)  # a checkpoint of this round, if any, replaces it in `train`
        result = train(round_config, backend, open_config_examples(round_config), None, ranks)
    finally:
        ranks.close()
    del backend
    release_memory()
    return Path(result.lora_path)


def judge_scores(judges: Sequence[Scorer], images, prompts: Sequence[str]) -> dict[str, list[float]]:
    return {j.name: j.score(images, prompts) for j in judges}


def round_row(r: int, pairs: int | None, scores: dict[str, list[float]], base: dict[str, list[float]],
              judges: Sequence[Scorer], labellers: list[dict]) -> dict:
    from .evaluate import judge_report, labelled_by

    return {"round": r, "pairs": pairs,
            "judges": [judge_report(j, base[j.name], scores[j.name], labelled_by(j, labellers)) for j in judges]}


def table(rows: Sequence[dict]) -> str:
    """Markdown: one line per round and judge."""
    from .evaluate import rate_text

    lines = ["| round | pairs kept | judge | mean score (LoRA) | win rate vs base, decided pairs [95% Wilson] "
             "| wins / ties / losses |", "|---|---|---|---|---|---|"]
    for row in rows:
        for j in row["judges"]:
            w = j["win_rate"]
            mark = " (labelled)" if j["labelled"] else ""
            if row["round"] == 0:
                lines.append(f"| 0 (base) | - | {j['name']}{mark} | {j['mean_base']:.4g} | - | - |")
                continue
            rate = "no decided pairs" if w["rate"] is None else rate_text(w)
            lines.append(f"| {row['round']} | {row['pairs']} | {j['name']}{mark} | {j['mean_lora']:.4g} | {rate} | "
                         f"{w['wins']} / {w['ties']} / {w['losses']} |")
    return "\n".join(lines) + "\n"


def iterate(config: TrainConfig, settings: PairsSettings, rounds: int, resume: bool = False,
            eval_samples: int = 96, eval_seed: int = 1_000_000, eval_prompts: str | None = None,
            eval_scorers: Sequence[str] = (), progress: bool = True) -> list[dict]:
    """Run (or continue) `rounds` online rounds in `config.output_dir`; returns the table's rows."""
    from .evaluate import prompt_seeds
    from .generate import cpu_threads, generate, load_pipeline
    from .prompts import read_prompts
    from .scorers import ClipModel, Ensemble, make_scorer, make_scorers

    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    if eval_samples < 1:
        raise ValueError(f"--eval-samples must be at least 1, got {eval_samples}")
    from .methods import build_method

    build_method(config.method, config.method_args)  # a bad method option stops before anything is generated
    settings.check()
    if settings.policy == "contrast":
        raise ValueError("--policy contrast makes the same pairs whatever the LoRA does; iterate needs a score policy")
    prompts = read_prompts(settings.prompts)
    evaluation_prompts = read_prompts(eval_prompts, "--eval-prompts") if eval_prompts else prompts
    folder = RunFolder(Path(config.output_dir))
    key = {**{k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_SETTINGS},
           "pairs": {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("lora", "seed")},
           "eval": {"samples": eval_samples, "seed": eval_seed, "prompts": eval_prompts, "scorers": list(eval_scorers)}}
    state = folder.check(json.loads(json.dumps(key)), resume)

    clips: dict[str, ClipModel] = {}  # a CLIP that the judge and an evaluation scorer both use is loaded once
    judge = make_scorer(settings.scorers, settings.vote, clip_model=settings.scorer_model, clips=clips)
    members = judge.members if isinstance(judge, Ensemble) else [judge]
    judges = members + make_scorers(eval_scorers, clip_model=settings.scorer_model, clips=clips)
    labellers = judge.identities()
    evaluation = EvalSet(*prompt_seeds(evaluation_prompts, eval_samples, eval_seed), settings.sample_steps,
                         settings.guidance)
    threads = cpu_threads(settings.model)

    base_path = folder.root / "eval-base.json"
    # one pipeline at a time: it serves the evaluation and the next round's pairs (a LoRA applied for sampling
    # is removed afterwards, leaving the model as it was) and is let go while a round trains
    pipe = load_pipeline(settings.model, settings.vae, settings.model_config)  # a bad model fails before any write
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.save(state)
    if base_path.is_file():
        base = json.loads(base_path.read_text())
    else:
        images = generate(pipe, evaluation.prompts, evaluation.seeds, evaluation.steps, evaluation.guidance_scale,
                          threads=threads)
        base = judge_scores(judges, images, evaluation.prompts)
        write_text(base_path, json.dumps(base))
        del images
    rows = [round_row(0, None, base, base, judges, labellers)]
    lora: Path | None = None
    for r in range(1, rounds + 1):
        where = folder.round_dir(r)
        if str(r) in state["rounds"]:
            rows.append(state["rounds"][str(r)])
            lora = where / "train" / "lora.safetensors"
            continue
        round_settings = dataclasses.replace(settings, lora=str(lora) if lora else None,
                                             seed=settings.seed + (r - 1) * len(prompts) * settings.images_per_prompt)
        made = make_pairs(round_settings, where / "pairs", resume=True, progress=progress, pipe=pipe, scorer=judge)
        del pipe
        release_memory()
        if made.pairs == 0:
            raise ValueError(f"round {r}: the judge kept no pairs (all images scored alike); lower --margin, raise "
                             "--images-per-prompt or use more prompts")
        lora = train_round(config, where / "pairs", where / "train", lora)
        pipe = load_pipeline(settings.model, settings.vae, settings.model_config)
        images = generate(pipe, evaluation.prompts, evaluation.seeds, evaluation.steps, evaluation.guidance_scale,
                          lora=str(lora), threads=threads)
        row = round_row(r, made.pairs, judge_scores(judges, images, evaluation.prompts), base, judges, labellers)
        del images
        write_text(where / "eval.json", json.dumps(row, indent=1))
        state["rounds"][str(r)] = row
        folder.save(state)
        rows.append(row)
        write_text(folder.root / "rounds.json", json.dumps(rows, indent=1))
        write_text(folder.root / "rounds.md", table(rows))
    del pipe
    release_memory()
    write_text(folder.root / "rounds.json", json.dumps(rows, indent=1))
    write_text(folder.root / "rounds.md", table(rows))
    return rows


def add_iterate_parser(sub) -> None:
    from .cli import _option, add_train_arguments
    from .pairs import add_pairs_arguments

    it = sub.add_parser("iterate", help="online rounds: generate with the current LoRA, judge, pair, train, evaluate",
                        description="Online preference rounds. Every train option applies to each round's training "
                                    "(--max-steps is per round); the pairs options say how each round's data is made.")
    add_train_arguments(it)
    add_pairs_arguments(it, model=False)
    it.add_argument("--rounds", type=int, default=2, help="rounds to run (default: 2)")
    _option(it, "eval_samples", type=int, default=96,
            help="(prompt, seed) pairs of the evaluation set, the same every round (default: 96)")
    _option(it, "eval_seed", type=int, default=1_000_000,
            help="first seed of the evaluation set (default: 1000000, apart from the training seeds)")
    _option(it, "eval_prompts", default=None, help="prompt file for evaluation (default: --prompts)")
    _option(it, "eval_scorer", action="append", default=[], metavar="SPEC",
            help="another judge for the table, one that did not label (recommended), e.g. clip:MODEL")
    it.set_defaults(handler=run_iterate)


def run_iterate(args: argparse.Namespace) -> int:
    from .cli import config_from_args
    from .pairs import settings_from_args

    if getattr(args, "data", None) is not None:
        raise ConfigError("data", "iterate makes each round's data itself; leave --data out")
    if getattr(args, "output_dir", None) is None:
        raise ConfigError("output_dir", "iterate needs --output-dir (the run folder)")
    resume = getattr(args, "resume", None)
    if resume not in (None, "latest"):
        raise ConfigError("resume", "iterate continues a run with --resume latest")
    args.data = str(Path(args.output_dir) / "round-1" / "pairs")  # replaced per round
    config = dataclasses.replace(config_from_args(args), resume=None)
    settings = settings_from_args(args, model=config.model, vae=config.vae, model_config=config.model_config,
                                  seed=config.seed)
    rows = iterate(config, settings, args.rounds, resume == "latest", args.eval_samples, args.eval_seed,
                   args.eval_prompts, args.eval_scorer)
    print(table(rows), end="")
    print(f"Table: {Path(config.output_dir) / 'rounds.md'}\nLoRA of the last round: "
          f"{Path(config.output_dir) / f'round-{len(rows) - 1}' / 'train' / 'lora.safetensors'}")
    return 0
