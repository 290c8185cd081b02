"""`python -m trainer pairs`: a preference dataset from a model and a prompt list, labelled by scorers.

For every prompt, K images are generated with recorded seeds (prompt i, image k: seed + i*K + k) and judged;
a pairing policy turns the judgement into pairs:

- ``best-worst``: the best-scored image against the worst, one pair per prompt (Diffusion-DPO's AI-feedback
  pairs, Curriculum-DPO's widest rank gap);
- ``all-pairs``: every pair whose scores differ by at least the margin;
- ``contrast``: prompt contrast, as MaPO's Pick-Style data was made: the same seed once with
  ``--chosen-template`` and once with ``--rejected-template`` (``"{}, cartoon style"`` / ``"{}"``); the stored
  caption is the plain prompt. Without a scorer every contrast pair is kept.

A pair is kept only when the judge prefers its chosen image (an ensemble: when its members agree) and the
combined scores differ by at least ``--margin``. The output folder holds Pick-a-Pic-schema parquet shards
(``caption, jpg_0, jpg_1, label_0, label_1``, chosen first, plus ``score_*``, ``scores_*`` (each scorer),
``seed_*``, ``prompt_*`` (the generation prompts) and ``prompt_index``) that ``train --data FOLDER`` reads,
with the scorers' names and weight fingerprints in every shard's key-value metadata (``prefalign.pairs``).

Resumable from the last finished prompt: each finished prompt's rows go to ``.pending/NNNNNN.rows`` and the
manifest ``pairs.json`` (both written atomically) before the next prompt starts; pending rows are merged
into a shard (streamed, one prompt's rows in memory at a time) once they pass ``--shard-mb``. Generation
holds one prompt's images at a time, so memory does not grow with the prompt list.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from .atomic import atomic_path
from .data.images import png_bytes
from .owned_folder import OwnedFolder, differing
from .scorers import Judgement, Scorer

POLICIES = ("best-worst", "all-pairs", "contrast")
MANIFEST = "pairs.json"
PENDING = ".pending"
LOCK = ".lock"
FORMAT = "prefalign-pairs/1"
METADATA_KEY = b"prefalign.pairs"


# ----------------------------------------------------------------------------------------------- pairing
def select_pairs(judgement: Judgement, policy: str, margin: float = 0.0) -> list[tuple[int, int]]:
    """(chosen, rejected) indices among the judged images of one prompt under a score policy."""
    s = judgement.combined
    if policy == "best-worst":
        best = max(range(len(s)), key=lambda i: (s[i], -i))  # ties go to the lower index
        worst = min(range(len(s)), key=lambda i: (s[i], i))
        candidates = [(best, worst)]
    elif policy == "all-pairs":
        candidates = [(a, b) for a in range(len(s)) for b in range(len(s)) if a != b]
    else:
        raise ValueError(f"unknown policy {policy!r}; score policies are best-worst and all-pairs")
    return [(a, b) for a, b in candidates if judgement.keeps(a, b, margin)]


def suggest_marks(judgement: Judgement, margin: float = 0.0, per_side: int = 1) -> list[str]:
    """Gallery marks from a judgement: the `per_side` best chosen and worst rejected, fewer while any
    chosen x rejected pairing (what the gallery stores) is not preferred by the margin; "none" elsewhere."""
    s = judgement.combined
    best_first = sorted(range(len(s)), key=lambda i: (-s[i], i))  # ties go to the lower index, as in select_pairs
    worst_first = sorted(range(len(s)), key=lambda i: (s[i], i))
    for n in range(min(per_side, len(s) // 2), 0, -1):
        chosen, rejected = best_first[:n], worst_first[:n]
        if all(judgement.keeps(c, r, margin) for c in chosen for r in rejected):
            return ["chosen" if i in chosen else "rejected" if i in rejected else "none" for i in range(len(s))]
    return ["none"] * len(s)


def apply_template(template: str, prompt: str, option: str) -> str:
    if template.count("{}") != 1:
        raise ValueError(f"{option} {template!r}: must contain {{}} exactly once (where the prompt goes)")
    return template.replace("{}", prompt)


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class PairsSettings:
    """Everything that decides the rows a pairs run writes (two runs with different settings never mix)."""

    model: str
    prompts: str
    scorers: list[str] = field(default_factory=list)
    vote: str = "mean-rank"
    scorer_model: str | None = None
    images_per_prompt: int = 4
    policy: str = "best-worst"
    margin: float = 0.0
    chosen_template: str | None = None
    rejected_template: str | None = None
    seed: int = 0
    sample_steps: int = 30
    guidance_scale: float | None = None
    image_size: int | None = None
    lora: str | None = None
    vae: str | None = None
    model_config: str | None = None

    def check(self) -> None:
        """Refuse bad settings before anything loads or is written; each message names the option."""
        from .scorers import VOTES, check_spec

        for option, value in (("--model", self.model), ("--prompts", self.prompts)):
            if not value:
                raise ValueError(f"{option} is required")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        if self.vote not in VOTES:
            raise ValueError(f"--vote {self.vote!r}: choose one of {', '.join(VOTES)}")
        for spec in self.scorers:
            check_spec(spec)
        contrast = self.policy == "contrast"
        if contrast and (self.chosen_template is None or self.rejected_template is None):
            raise ValueError("--policy contrast needs --chosen-template and --rejected-template, e.g. "
                             "\"{}, cartoon style\" and \"{}\"")
        if not contrast and (self.chosen_template is not None or self.rejected_template is not None):
            raise ValueError("--chosen-template / --rejected-template make prompt-contrast pairs: add --policy contrast")
        if contrast:
            apply_template(self.chosen_template, "", "--chosen-template")
            apply_template(self.rejected_template, "", "--rejected-template")
            if self.chosen_template == self.rejected_template:
                raise ValueError("--chosen-template and --rejected-template are the same: the pairs would not differ")
        elif not self.scorers:
            raise ValueError(f"--policy {self.policy} needs a judge: give --scorer (e.g. clip:yuvalkirstain/PickScore_v1)")
        least = 1 if contrast else 2
        if self.images_per_prompt < least:
            raise ValueError(f"--images-per-prompt must be at least {least} for --policy {self.policy}, "
                             f"got {self.images_per_prompt}")
        if self.margin < 0:
            raise ValueError(f"--margin must be at least 0, got {self.margin}")
        if self.sample_steps < 1:
            raise ValueError(f"--sample-steps must be at least 1, got {self.sample_steps}")
        if self.image_size is not None and (self.image_size < 8 or self.image_size % 8):
            raise ValueError(f"--image-size must be a positive multiple of 8, got {self.image_size}")
        if self.lora is not None and not Path(self.lora).is_file():
            raise ValueError(f"--lora {self.lora}: no such file")

    @property
    def guidance(self) -> float:
        from .generate import default_guidance

        return default_guidance(self.model) if self.guidance_scale is None else self.guidance_scale


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def identity(settings: PairsSettings, prompts: Sequence[str], model_hash: str, scorer: Scorer | None) -> dict:
    """What the rows depend on beyond the settings: prompt list, model and LoRA content, scorer weights."""
    from .fingerprint import file_fingerprint

    return {"prompts_sha": _sha("\n".join(prompts).encode()), "model_hash": model_hash,
            "lora_hash": file_fingerprint(settings.lora) if settings.lora else None,
            "scorers": scorer.identities() if scorer is not None else []}


def _progress(manifest: dict) -> str | None:
    return None if manifest.get("done") else f"{manifest['next_prompt']} of {manifest['prompt_count']} prompts done"


# ----------------------------------------------------------------------------------------------- rows
def _schema():
    import pyarrow as pa

    image = pa.binary()
    return pa.schema([
        ("caption", pa.string()), ("jpg_0", image), ("jpg_1", image), ("label_0", pa.float64()),
        ("label_1", pa.float64()), ("score_0", pa.float64()), ("score_1", pa.float64()),
        ("scores_0", pa.list_(pa.float64())), ("scores_1", pa.list_(pa.float64())), ("seed_0", pa.int64()),
        ("seed_1", pa.int64()), ("prompt_0", pa.string()), ("prompt_1", pa.string()), ("prompt_index", pa.int64()),
    ])


def pair_rows(index: int, caption: str, images: Sequence[Image.Image], seeds: Sequence[int],
              prompts: Sequence[str], pairs: Sequence[tuple[int, int]], judgement: Judgement | None) -> dict:
    """Column lists for the kept pairs of one prompt, chosen first (label_0 = 1)."""
    def score(i: int) -> float | None:
        return None if judgement is None else float(judgement.combined[i])

    def member_scores(i: int) -> list[float]:
        return [] if judgement is None else [float(column[i]) for column in judgement.columns]

    encoded: dict[int, bytes] = {}

    def png(i: int) -> bytes:  # an image may sit in several pairs: encode it once
        if i not in encoded:
            encoded[i] = png_bytes(images[i])
        return encoded[i]

    return {"caption": [caption] * len(pairs), "jpg_0": [png(a) for a, _ in pairs], "jpg_1": [png(b) for _, b in pairs],
            "label_0": [1.0] * len(pairs), "label_1": [0.0] * len(pairs),
            "score_0": [score(a) for a, _ in pairs], "score_1": [score(b) for _, b in pairs],
            "scores_0": [member_scores(a) for a, _ in pairs], "scores_1": [member_scores(b) for _, b in pairs],
            "seed_0": [seeds[a] for a, _ in pairs], "seed_1": [seeds[b] for _, b in pairs],
            "prompt_0": [prompts[a] for a, _ in pairs], "prompt_1": [prompts[b] for _, b in pairs],
            "prompt_index": [index] * len(pairs)}


# ----------------------------------------------------------------------------------------------- the folder
class PairsFolder:
    """The output folder: manifest, pending rows of finished prompts, shards. Every write is atomic."""

    def __init__(self, root: Path, shard_bytes: int) -> None:
        self.root, self.shard_bytes = root, shard_bytes
        self.owner = OwnedFolder(root, MANIFEST, FORMAT, "a pairs run", ignore=(LOCK,))
        self.manifest: dict = {}
        self._lock = None

    def check(self, settings: dict, resume: bool) -> dict | None:
        """The manifest to continue from, or None for a fresh run; refuses a folder another run owns."""
        return self.owner.claim(settings, resume, _progress, "--resume")

    def lock(self) -> None:
        """Hold an exclusive lock on the folder until the process ends: a second run on it stops at once."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / LOCK, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"--output-dir {self.root}: another pairs run is writing there") from None

    def start(self, manifest: dict | None, fresh: dict) -> None:
        """Adopt the manifest (dropping files a crash left unrecorded) or begin `fresh`."""
        self.lock()
        if self.owner.read() != manifest:
            raise ValueError(f"--output-dir {self.root}: another run changed it meanwhile; run again")
        if manifest is not None and manifest["identity"] != fresh["identity"]:
            keys = differing(manifest["identity"], fresh["identity"])
            raise ValueError(f"--output-dir {self.root} holds pairs from other inputs (changed: {', '.join(keys)}); "
                             "use another folder")
        self.manifest = manifest or fresh
        recorded = {f"{p['index']:06d}.rows" for p in self.manifest["pending"]}
        pending = self.root / PENDING
        for path in sorted(pending.glob("*.rows")) if pending.is_dir() else []:
            if path.name not in recorded:  # written, then killed before the manifest named it: redone
                path.unlink()
        for p in self.manifest["pending"]:
            if not (pending / f"{p['index']:06d}.rows").is_file():
                raise ValueError(f"{self.root}: pending rows of prompt {p['index']} are missing; use another folder")
        if manifest is None:
            self.save()

    def save(self) -> None:
        self.owner.save(self.manifest)

    def add_prompt(self, index: int, rows: dict, candidates: int, images: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        m = self.manifest
        kept = len(rows["caption"])
        if kept:
            path = self.root / PENDING / f"{index:06d}.rows"
            with atomic_path(path) as tmp:
                pq.write_table(pa.table(rows, schema=_schema()), str(tmp))
            m["pending"].append({"index": index, "rows": kept, "bytes": path.stat().st_size})
        m["next_prompt"] = index + 1
        m["pairs"] += kept
        m["candidates"] += candidates
        m["images"] += images
        m["prompts_without_pairs"] += kept == 0
        self.save()
        if sum(p["bytes"] for p in m["pending"]) >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Merge the pending rows into the next shard, then forget them."""
        import pyarrow.parquet as pq

        m = self.manifest
        if not m["pending"]:
            return
        name = f"pairs-{len(m['shards']):05d}.parquet"  # a shard a crash left unrecorded had this name: replaced
        schema = _schema().with_metadata({METADATA_KEY: json.dumps(m["metadata"]).encode(),
                                          b"prefalign.scorer": m["metadata"]["scorer"].encode(),
                                          b"prefalign.scorer_fingerprint": m["metadata"]["scorer_fingerprint"].encode()})
        with atomic_path(self.root / name) as tmp:
            with pq.ParquetWriter(str(tmp), schema) as writer:
                for p in m["pending"]:  # one prompt's rows in memory at a time
                    writer.write_table(pq.read_table(self.root / PENDING / f"{p['index']:06d}.rows").cast(schema))
        done = m["pending"]
        m["shards"].append({"file": name, "first_prompt": done[0]["index"], "last_prompt": done[-1]["index"],
                            "rows": sum(p["rows"] for p in done)})
        m["pending"] = []
        self.save()
        for p in done:
            (self.root / PENDING / f"{p['index']:06d}.rows").unlink(missing_ok=True)

    def finish(self) -> None:
        self.flush()
        self.manifest["done"] = True
        self.save()
        pending = self.root / PENDING
        if pending.is_dir() and not any(pending.iterdir()):
            pending.rmdir()
        if self._lock is not None:
            self._lock.close()


def read_labellers(data: str | os.PathLike) -> list[dict] | None:
    """Names and fingerprints of the scorers that labelled a parquet file or folder `trainer pairs` wrote (read
    from the first shard `train` reads); None when `data` is not such a dataset (or not here)."""
    import pyarrow.parquet as pq

    from .data.errors import DataError
    from .data.parquet import parquet_files

    try:
        meta = pq.read_schema(parquet_files(Path(data))[0]).metadata or {}
        return list(json.loads(meta[METADATA_KEY])["scorers"])
    except (DataError, KeyError, ValueError, OSError):  # DataError: no parquet file there
        return None


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class PairsResult:
    output_dir: Path
    prompts: int
    pairs: int
    candidates: int
    images: int
    shards: list[str]

    def text(self) -> str:
        return (f"{self.pairs} pairs kept from {self.images} images of {self.prompts} prompts "
                f"({self.candidates} candidate pairs judged) in {len(self.shards)} shard(s)\n"
                f"Dataset: {self.output_dir}  (train on it: python -m trainer train --data {self.output_dir} ...)")


def make_pairs(settings: PairsSettings, output_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
               shard_mb: float = 256, batch_size: int | None = None, pipe=None, scorer: Scorer | None = None
               ) -> PairsResult:
    """Generate, judge and pair every prompt into `output_dir`; `pipe`/`scorer` may be passed in already loaded."""
    from tqdm.auto import tqdm

    from .generate import cpu_threads, generate, sampling
    from .prompts import read_prompts
    from .scorers import make_scorer

    settings.check()
    prompts = read_prompts(settings.prompts)
    folder = PairsFolder(Path(output_dir), int(shard_mb * 2**20))
    manifest = folder.check(asdict(settings), resume)  # before anything loads: a wrong folder fails fast
    if manifest is not None and manifest.get("done"):
        return _result(folder.root, manifest)
    if scorer is None and settings.scorers:
        scorer = make_scorer(settings.scorers, settings.vote, clip_model=settings.scorer_model)
    if pipe is None:
        pipe = _load(settings)
    model_hash = _model_hash(settings)
    fresh = {"format": FORMAT, "settings": asdict(settings),
             "identity": identity(settings, prompts, model_hash, scorer), "prompt_count": len(prompts),
             "next_prompt": 0, "pairs": 0, "candidates": 0, "images": 0, "prompts_without_pairs": 0,
             "pending": [], "shards": [], "done": False,
             "metadata": {"scorer": scorer.name if scorer else "", "scorer_fingerprint": scorer.fingerprint if scorer else "",
                          "scorers": scorer.identities() if scorer else [], "policy": settings.policy,
                          "margin": settings.margin, "vote": settings.vote, "model": settings.model,
                          "model_hash": model_hash, "lora": settings.lora, "seed": settings.seed,
                          "images_per_prompt": settings.images_per_prompt, "sample_steps": settings.sample_steps,
                          "guidance_scale": settings.guidance, "chosen_template": settings.chosen_template,
                          "rejected_template": settings.rejected_template}}
    folder.start(manifest, fresh)
    k, start = settings.images_per_prompt, folder.manifest["next_prompt"]
    sample = dict(steps=settings.sample_steps, guidance_scale=settings.guidance, batch_size=batch_size or k,
                  threads=cpu_threads(settings.model), size=settings.image_size)
    bar = tqdm(total=len(prompts), initial=start, disable=not progress, desc="pairs", unit="prompt")
    with sampling(pipe, settings.lora):  # the LoRA is loaded once for the run; each `generate` keeps it
        for index in range(start, len(prompts)):
            prompt = prompts[index]
            seeds = [settings.seed + index * k + j for j in range(k)]
            if settings.policy == "contrast":
                shown = [apply_template(settings.chosen_template, prompt, "--chosen-template"),
                         apply_template(settings.rejected_template, prompt, "--rejected-template")]
                images = generate(pipe, [shown[0]] * k, seeds, **sample) + generate(pipe, [shown[1]] * k, seeds, **sample)
                judgement = scorer.judge(images, [prompt] * 2 * k) if scorer else None
                candidates = [(j, k + j) for j in range(k)]  # chosen image j against rejected image j: same seed
                pairs = [(a, b) for a, b in candidates if judgement is None or judgement.keeps(a, b, settings.margin)]
                rows = pair_rows(index, prompt, images, seeds * 2, [shown[0]] * k + [shown[1]] * k, pairs, judgement)
            else:
                images = generate(pipe, [prompt] * k, seeds, **sample)
                judgement = scorer.judge(images, [prompt] * k)
                pairs = select_pairs(judgement, settings.policy, settings.margin)
                rows = pair_rows(index, prompt, images, seeds, [prompt] * k, pairs, judgement)
            judged = {"best-worst": 1, "all-pairs": k * (k - 1) // 2, "contrast": k}[settings.policy]
            folder.add_prompt(index, rows, judged, len(images))
            bar.set_postfix(pairs=folder.manifest["pairs"], refresh=False)
            bar.update(1)
    bar.close()
    folder.finish()
    return _result(folder.root, folder.manifest)


def _result(root: Path, m: dict) -> PairsResult:
    return PairsResult(root, m["prompt_count"], m["pairs"], m["candidates"], m["images"], [s["file"] for s in m["shards"]])


def _load(settings: PairsSettings):
    from .generate import load_pipeline

    try:
        return load_pipeline(settings.model, settings.vae, settings.model_config)
    except OSError as e:  # diffusers/transformers' messages can span lines: the CLI prints one
        raise ValueError(f"--model {settings.model}: cannot load it ({' '.join(str(e).split())})") from None


def _model_hash(settings: PairsSettings) -> str:
    from .fingerprint import file_fingerprint
    from .models.loading import resolve_model

    return file_fingerprint(resolve_model(settings.model))


# ----------------------------------------------------------------------------------------------- CLI
def add_pairs_arguments(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """Generation, judging and pairing options (shared by `pairs` and `iterate`)."""
    from .cli import _option
    from .scorers import KINDS, VOTES

    if model:
        parser.add_argument("--model", default=None, help="anything `train --model` takes (folder, hub id, "
                                                          "single file, toy) (required)")
        parser.add_argument("--vae", default=None, help="optional VAE folder or hub id")
        _option(parser, "model_config", default=None,
                help="diffusers folder describing a single-file checkpoint's architecture")
    parser.add_argument("--prompts", default=None,
                        help="prompt file: .txt (one a line) or .jsonl ({\"prompt\": ...}) (required)")
    parser.add_argument("--scorer", action="append", default=[], metavar="SPEC",
                        help=f"judge, repeat for an ensemble: {', '.join(KINDS)} with :ARGUMENT, e.g. "
                             "clip:yuvalkirstain/PickScore_v1, aesthetic:HEAD.safetensors,CLIP, attribute:shaded")
    _option(parser, "scorer_model", default=None,
            help="default CLIP folder or hub id for clip/aesthetic judges given without one")
    parser.add_argument("--vote", default="mean-rank", choices=VOTES,
                        help="how an ensemble decides: mean-rank (all must agree) or majority (default: mean-rank)")
    _option(parser, "images_per_prompt", type=int, default=4,
            help="images generated per prompt (default: 4; contrast: pairs per prompt)")
    parser.add_argument("--policy", default="best-worst", choices=POLICIES,
                        help="best-worst: one pair per prompt; all-pairs: every pair above the margin; "
                             "contrast: --chosen-template vs --rejected-template on the same seed (default: best-worst)")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="keep a pair only when the judge's scores differ by at least this (an ensemble: in mean "
                             "normalised rank, 0..1) (default: 0)")
    _option(parser, "chosen_template", default=None,
            help="contrast: the chosen image's prompt, {} standing for the prompt, e.g. \"{}, cartoon style\"")
    _option(parser, "rejected_template", default=None,
            help="contrast: the rejected image's prompt, e.g. \"{}\"")
    _option(parser, "sample_steps", type=int, default=30, help="sampling steps (default: 30)")
    _option(parser, "guidance_scale", type=float, default=None,
            help="classifier-free guidance (default: 3 for the toy model, 7.5 otherwise)")
    _option(parser, "image_size", type=int, default=None,
            help="generated image side in pixels (default: the model's native size)")
    _option(parser, "shard_mb", type=float, default=256, help="parquet shard size (default: 256 MB)")


def settings_from_args(args: argparse.Namespace, **overrides) -> PairsSettings:
    values = dict(model=getattr(args, "model", None), prompts=args.prompts, scorers=args.scorer, vote=args.vote,
                  scorer_model=args.scorer_model, images_per_prompt=args.images_per_prompt, policy=args.policy,
                  margin=args.margin, chosen_template=args.chosen_template, rejected_template=args.rejected_template,
                  seed=getattr(args, "seed", 0), sample_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                  image_size=args.image_size, vae=getattr(args, "vae", None),
                  model_config=getattr(args, "model_config", None))
    values.update(overrides)
    return PairsSettings(**values)


def add_pairs_parser(sub) -> None:
    from .cli import _option

    p = sub.add_parser("pairs", help="generate images for a prompt list, judge them and write preference pairs",
                       description="Generate K images per prompt (recorded seeds), judge them with scorers and write a "
                                   "Pick-a-Pic-schema parquet dataset that `train --data` reads. Resumable.")
    add_pairs_arguments(p)
    p.add_argument("--lora", default=None, help="generate with this LoRA applied (e.g. the last round's)")
    p.add_argument("--seed", type=int, default=0, help="first seed: prompt i, image k uses seed + i*K + k (default: 0)")
    _option(p, "batch_size", type=int, default=None,
            help="images per pipeline call (default: --images-per-prompt)")
    _option(p, "output_dir", default=None, help="folder for the parquet shards and pairs.json (required)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --output-dir")
    p.set_defaults(handler=run_pairs)


def run_pairs(args: argparse.Namespace) -> int:
    if args.output_dir is None:
        raise ValueError("--output-dir is required: the folder for the parquet shards")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    result = make_pairs(settings_from_args(args, lora=args.lora), args.output_dir, args.resume,
                        shard_mb=args.shard_mb, batch_size=args.batch_size)
    print(result.text())
    return 0
