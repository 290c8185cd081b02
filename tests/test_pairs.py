"""`python -m trainer pairs` on the toy world: judged pairs, prompt contrast, ensembles, resume, bad input."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from trainer.cli import main
from trainer.data.parquet import ParquetSource
from trainer.pairs import PairsFolder, PairsSettings, make_pairs, read_labellers
from trainer.scorers import AttributeScorer
from trainer.toy import has_attribute, sample_images

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow square"]


def image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def rows(folder) -> list[dict]:
    return [r for f in sorted(folder.glob("pairs-*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("judged")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    code = main(["pairs", "--model", "toy", "--prompts", str(tmp / "prompts.txt"), "--scorer", "attribute:shaded",
                 "--images-per-prompt", "6", "--policy", "all-pairs", "--sample-steps", "6", "--seed", "7",
                 "--output-dir", str(tmp / "out")])
    assert code == 0
    return tmp / "out"


def test_every_chosen_image_scores_above_its_rejected_one(judged):
    table = rows(judged)
    assert table, "the toy model makes both shaded and flat images: some pairs must be kept"
    for r in table:
        assert has_attribute(image(r["jpg_0"]), "shaded") and not has_attribute(image(r["jpg_1"]), "shaded")
        assert (r["score_0"], r["score_1"], r["scores_0"], r["scores_1"]) == (1.0, 0.0, [1.0], [0.0])
        assert (r["label_0"], r["label_1"]) == (1.0, 0.0) and r["caption"] == r["prompt_0"] == r["prompt_1"]
    # regenerate every prompt's 6 images from the recorded seeds: the kept pairs are exactly shaded x flat
    for index, prompt in enumerate(PROMPTS):
        seeds = [7 + index * 6 + k for k in range(6)]
        shaded = [has_attribute(im, "shaded") for im in sample_images(None, prompt, seeds, steps=6)]
        expected = {(seeds[a], seeds[b]) for a in range(6) for b in range(6) if shaded[a] and not shaded[b]}
        assert {(r["seed_0"], r["seed_1"]) for r in table if r["prompt_index"] == index} == expected
    first = table[0]
    seeds = [7 + first["prompt_index"] * 6 + k for k in range(6)]  # drawn as one batch, as `pairs` draws them
    again = sample_images(None, first["prompt_0"], seeds, steps=6)[seeds.index(first["seed_0"])]
    assert np.array_equal(np.asarray(again), np.asarray(image(first["jpg_0"])))  # PNG keeps the image exactly


def test_shards_name_the_judge_and_train_reads_them(judged, tmp_path):
    meta = pq.read_schema(sorted(judged.glob("pairs-*.parquet"))[0]).metadata
    assert meta[b"prefalign.scorer"] == b"attribute:shaded"
    assert meta[b"prefalign.scorer_fingerprint"].decode() == AttributeScorer("shaded").fingerprint
    recorded = json.loads(meta[b"prefalign.pairs"])
    assert recorded["scorers"] == AttributeScorer("shaded").identities() and recorded["policy"] == "all-pairs"
    manifest = json.loads((judged / "pairs.json").read_text())
    assert manifest["done"] and manifest["pairs"] == len(rows(judged)) and manifest["images"] == 24
    assert len(ParquetSource(judged)) == len(rows(judged))
    assert main(["train", "--model", "toy", "--data", str(judged), "--resolution", "32", "--batch-size", "2",
                 "--max-steps", "1", "--checkpoint-every", "0", "--output-dir", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert (tmp_path / "run" / "lora.safetensors").is_file()


def test_read_labellers_reads_the_shards_train_reads(judged, tmp_path):
    import pyarrow as pa

    shard = sorted(judged.glob("pairs-*.parquet"))[0]
    expected = AttributeScorer("shaded").identities()
    assert read_labellers(judged) == read_labellers(shard) == expected
    assert read_labellers(tmp_path / "missing") is None and read_labellers(tmp_path) is None  # no parquet there
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "plain.parquet")
    assert read_labellers(tmp_path / "plain.parquet") is None  # parquet that `trainer pairs` did not write
    mixed = tmp_path / "mixed"
    (mixed / "a.parquet").mkdir(parents=True)  # a folder named like a shard is not one (train skips it too)
    shutil.copy(shard, mixed / "pairs-00000.parquet")
    assert read_labellers(mixed) == expected


def test_prompt_contrast_shares_seeds_and_stores_the_plain_prompt(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "red circle"}\n\n{"prompt": "blue square"}\n')
    common = ["pairs", "--model", "toy", "--prompts", str(prompts), "--policy", "contrast", "--images-per-prompt", "3",
              "--chosen-template", "a shaded {}", "--rejected-template", "a flat {}", "--sample-steps", "5"]
    assert main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    table = rows(tmp_path / "plain")
    assert len(table) == 6  # no judge: every contrast pair is kept
    for r in table:
        plain = ["red circle", "blue square"][r["prompt_index"]]
        assert r["caption"] == plain
        assert (r["prompt_0"], r["prompt_1"]) == (f"a shaded {plain}", f"a flat {plain}")
        assert r["seed_0"] == r["seed_1"] and r["score_0"] is None
        chosen, rejected = sample_images(None, [r["prompt_0"], r["prompt_1"]], [r["seed_0"]] * 2, steps=5)
        assert np.array_equal(np.asarray(chosen), np.asarray(image(r["jpg_0"])))
        assert np.array_equal(np.asarray(rejected), np.asarray(image(r["jpg_1"])))
    assert main([*common, "--scorer", "attribute:shaded", "--output-dir", str(tmp_path / "judged")]) == 0
    kept = rows(tmp_path / "judged")
    agreed = [r for r in table if has_attribute(image(r["jpg_0"]), "shaded") and not has_attribute(image(r["jpg_1"]), "shaded")]
    assert [(r["caption"], r["seed_0"]) for r in kept] == [(r["caption"], r["seed_0"]) for r in agreed]


def test_an_ensemble_keeps_only_pairs_its_members_agree_on(tmp_path):
    (tmp_path / "p.txt").write_text("a circle\na square\na triangle\n")
    assert main(["pairs", "--model", "toy", "--prompts", str(tmp_path / "p.txt"), "--scorer", "attribute:shaded",
                 "--scorer", "attribute:red", "--images-per-prompt", "8", "--policy", "all-pairs",
                 "--sample-steps", "5", "--output-dir", str(tmp_path / "out")]) == 0
    table = rows(tmp_path / "out")
    for r in table:  # mean-rank ensembles need every member to prefer the chosen image
        a, b = image(r["jpg_0"]), image(r["jpg_1"])
        assert has_attribute(a, "shaded") and has_attribute(a, "red")
        assert not has_attribute(b, "shaded") and not has_attribute(b, "red")
        assert r["scores_0"] == [1.0, 1.0] and r["scores_1"] == [0.0, 0.0]
    candidates = 0
    for index, prompt in enumerate(["a circle", "a square", "a triangle"]):
        ims = sample_images(None, prompt, [index * 8 + k for k in range(8)], steps=5)
        both = [has_attribute(im, "shaded") and has_attribute(im, "red") for im in ims]
        neither = [not has_attribute(im, "shaded") and not has_attribute(im, "red") for im in ims]
        candidates += sum(both) * sum(neither)
    assert len(table) == candidates


def small_settings(prompts_file, **kw) -> PairsSettings:
    return PairsSettings(model="toy", prompts=str(prompts_file), scorers=["attribute:shaded"], images_per_prompt=3,
                         policy="all-pairs", sample_steps=3, **kw)


@pytest.mark.parametrize("crash_at", [(2, "before"), (3, "before"), (3, "after"), (5, "before"), (6, "after")])
def test_resume_after_a_crash_writes_exactly_the_uninterrupted_rows(tmp_path, monkeypatch, crash_at):
    """The run dies just before or after its N-th manifest write: a prompt's rows on disk but not recorded, a
    shard written but not recorded, or a shard recorded with its merged rows still on disk. --resume then
    finishes with exactly the rows of a run that never stopped, and leaves no stray files."""
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    settings = small_settings(tmp_path / "p.txt")
    make_pairs(settings, tmp_path / "whole", progress=False, shard_mb=1e-4)  # a shard for every prompt with pairs
    calls = {"n": 0}
    original = PairsFolder.save
    number, when = crash_at

    def dying_save(self):
        calls["n"] += 1
        if calls["n"] == number and when == "before":
            raise KeyboardInterrupt
        original(self)
        if calls["n"] == number:
            raise KeyboardInterrupt

    monkeypatch.setattr(PairsFolder, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        make_pairs(settings, tmp_path / "cut", progress=False, shard_mb=1e-4)
    monkeypatch.setattr(PairsFolder, "save", original)
    with pytest.raises(ValueError, match="add --resume"):
        make_pairs(settings, tmp_path / "cut", progress=False, shard_mb=1e-4)
    make_pairs(settings, tmp_path / "cut", resume=True, progress=False, shard_mb=1e-4)
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")
    manifest = json.loads((tmp_path / "cut" / "pairs.json").read_text())
    assert sorted(p.name for p in (tmp_path / "cut").glob("pairs-*")) == [s["file"] for s in manifest["shards"]]
    assert not (tmp_path / "cut" / ".pending").exists()  # no stray pending rows


def test_a_lora_is_loaded_once_per_run_and_applies_to_every_prompt(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from trainer.config import make_config
    from trainer.demo import DEMO_TRAINING
    from trainer.run import run
    from trainer.toy import write_preference_dataset

    data = write_preference_dataset(tmp_path / "data", "shaded", 8, seed=0)
    lora = str(run(make_config({**DEMO_TRAINING, "data": str(data), "max_steps": 3, "batch_size": 4,
                                "learning_rate": 5e-2, "output_dir": str(tmp_path / "run"),
                                "cache_dir": str(tmp_path / "cache")})).lora_path)
    loads = []
    original = StableDiffusionPipeline.load_lora_weights

    def counted(self, *args, **kwargs):
        loads.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "load_lora_weights", counted)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    make_pairs(small_settings(tmp_path / "p.txt", lora=lora), tmp_path / "out", progress=False)
    assert loads == [lora]  # once for the run, not once per prompt
    table = rows(tmp_path / "out")
    assert table
    moved = False
    for index in sorted({r["prompt_index"] for r in table}):  # each prompt's 3 images, drawn as one batch
        seeds = [index * 3 + k for k in range(3)]
        tuned = sample_images(None, PROMPTS[index], seeds, steps=3, lora=lora)
        plain = sample_images(None, PROMPTS[index], seeds, steps=3)
        moved |= any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(tuned, plain))
        for r in (r for r in table if r["prompt_index"] == index):
            for side in ("0", "1"):
                drawn = tuned[seeds.index(r[f"seed_{side}"])]
                assert np.array_equal(np.asarray(drawn), np.asarray(image(r[f"jpg_{side}"])))
    assert moved  # the LoRA changed the images the rows hold


def test_a_second_run_on_a_locked_folder_stops(tmp_path, capsys):
    import fcntl

    (tmp_path / "p.txt").write_text("a red circle\n")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["pairs", "--model", "toy", "--prompts", str(tmp_path / "p.txt"), "--scorer", "attribute:shaded",
                     "--sample-steps", "2", "--output-dir", str(out)]) == 2
    assert "another pairs run is writing there" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [".lock"]


def bad_cases(tmp_path):
    good = tmp_path / "prompts.txt"
    good.write_text("a red circle\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    base = ["--model", "toy", "--sample-steps", "2"]
    judge = ["--scorer", "attribute:shaded"]
    return [
        ([*base, *judge, "--prompts", str(tmp_path / "missing.txt")], "--prompts"),
        ([*base, *judge, "--prompts", str(tmp_path / "empty.txt")], "no prompts"),
        ([*base, *judge, "--prompts", str(tmp_path / "bad.jsonl")], "bad.jsonl line 2"),
        ([*base, "--prompts", str(good), "--scorer", "pickscore"], "unknown kind 'pickscore'"),
        ([*base, "--prompts", str(good)], "needs a judge"),
        ([*base, *judge, "--prompts", str(good), "--images-per-prompt", "1"], "--images-per-prompt"),
        ([*base, *judge, "--prompts", str(good), "--margin", "-1"], "--margin"),
        ([*base, *judge, "--prompts", str(good), "--sample-steps", "0"], "--sample-steps"),
        ([*base, *judge, "--prompts", str(good), "--image-size", "12"], "--image-size"),
        ([*base, "--prompts", str(good), "--policy", "contrast"], "--chosen-template"),
        ([*base, "--prompts", str(good), "--policy", "contrast", "--chosen-template", "cartoon",
          "--rejected-template", "{}"], "--chosen-template 'cartoon'"),
        ([*base, *judge, "--prompts", str(good), "--chosen-template", "{}, cartoon", "--rejected-template", "{}"],
         "--policy contrast"),
        ([*base, *judge, "--prompts", str(good), "--lora", str(tmp_path / "none.safetensors")], "--lora"),
        ([*base, "--prompts", str(good), "--scorer", f"clip:{tmp_path / 'no-clip'}"], "no such file or folder"),
        (["--model", str(tmp_path / "no-model"), *judge, "--prompts", str(good)], "no-model"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    for args, needle in bad_cases(tmp_path):
        out = tmp_path / "out"
        assert main(["pairs", *args, "--output-dir", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (args, err)
        assert not out.exists(), args


def test_a_folder_belongs_to_one_run(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n")
    args = ["pairs", "--model", "toy", "--prompts", str(tmp_path / "p.txt"), "--scorer", "attribute:shaded",
            "--sample-steps", "2", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert main([*args, "--margin", "0.5", "--images-per-prompt", "3"]) == 2
    assert "other settings (images_per_prompt, margin)" in capsys.readouterr().err
    assert main(args) == 0  # the same finished run again: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main([*args[:-1], str(tmp_path / "other")]) == 2
    assert "not empty and not the folder of a pairs run" in capsys.readouterr().err
