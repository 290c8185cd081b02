"""Load Scorer, Score Images, Pairs from Scores and the auto-mark / compare routes, with fake ComfyUI objects."""
from __future__ import annotations

import asyncio
import json
import sys
import multiprocessing
import shutil
import sqlite3
import time

import numpy as np
import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from safetensors.torch import save_file

import prefalign_pack


wt = sys.modules["prefalign_workflow_tools"]  # loaded by conftest.py

score_nodes = prefalign_pack.nodes.score_nodes
import prefalign_pack.nodes.score_routes as score_routes  # noqa: E402  (ComfyUI's server loads it through routes.register)
PairStore = prefalign_pack.nodes.pair_store.PairStore


@pytest.fixture
def scorer_dir(tmp_path, monkeypatch, comfy_folders, tiny_clip):
    root = tmp_path / "prefalign_scorers"
    shutil.copytree(tiny_clip, root / "tiny-pick")
    g = torch.Generator().manual_seed(0)
    save_file({"weight": torch.randn(1, 16, generator=g), "bias": torch.zeros(1)}, str(root / "head.safetensors"))
    monkeypatch.setenv("PREFALIGN_SCORER_DIR", str(root))
    monkeypatch.setenv("PREFALIGN_STORE_DIR", str(tmp_path / "stores"))
    return root


def toy_batch(prompt="a red circle", seeds=(1, 2, 3, 4, 5, 6)):
    from trainer.toy import sample_images

    ims = sample_images(None, prompt, list(seeds), steps=4)
    return torch.from_numpy(np.stack([np.asarray(im, np.float32) / 255 for im in ims])), ims


def node(key):
    return prefalign_pack.NODE_CLASS_MAPPINGS[key]()


def load(kind, clip_model="(none)", head="(none)", attribute="shaded", **kw):
    return node("PrefAlignLoadScorer").load(kind, clip_model, head, attribute, **kw)[0]


def test_load_scorer_lists_and_confines_the_scorer_folder(scorer_dir, tmp_path):
    spec = score_nodes.LoadScorer.INPUT_TYPES()["required"]
    assert spec["clip_model"][0] == ["(none)", "tiny-pick"] and spec["aesthetic_head"][0] == ["(none)", "head.safetensors"]
    assert load("clip", "tiny-pick").name == "clip:tiny-pick"  # no server path in names shown or stored
    assert load("aesthetic", "tiny-pick", "head.safetensors").name == "aesthetic:head.safetensors@tiny-pick"
    assert load("toy attribute", attribute="red").name == "attribute:red"
    outside = tmp_path / "elsewhere"
    shutil.copytree(scorer_dir / "tiny-pick", outside)
    (scorer_dir / "link").symlink_to(outside, target_is_directory=True)
    for name in ("../elsewhere", str(outside), "link", "(none)", "missing"):
        with pytest.raises(ValueError, match="is not in models/prefalign_scorers") as e:
            load("clip", name)
        assert str(outside) not in str(e.value) or name == str(outside)


def test_score_images_shows_scores_and_previews(scorer_dir, comfy_folders):
    from trainer.scorers import AttributeScorer

    batch, ims = toy_batch()
    out = node("PrefAlignScoreImages").score(batch, "a red circle", load("toy attribute"))
    images, scored, text = out["result"]
    assert images is batch
    expected = AttributeScorer("shaded").score(ims, ["a red circle"] * 6)
    assert scored.judgement.combined == expected and scored.prompt == "a red circle"
    assert out["ui"]["prefalign_text"] == text.splitlines() and len(out["ui"]["prefalign_text"]) == 7
    assert out["ui"]["prefalign_text"][1].startswith(f"image 1: {expected[0]:.4g} (#")
    for preview in out["ui"]["images"]:
        assert preview["type"] == "temp" and (comfy_folders["temp"] / preview["filename"]).is_file()


def test_score_images_converts_each_image_once(scorer_dir, comfy_folders, monkeypatch):
    """The batch becomes PIL images once: the scorer judges them and their PNGs are the previews and the batch's
    content addresses (it converted the tensor twice)."""
    import hashlib

    from PIL import Image

    batch, _ = toy_batch()
    pngs = prefalign_pack.nodes.images.tensor_to_pngs(batch)
    made = []
    fromarray = Image.fromarray
    monkeypatch.setattr(Image, "fromarray", lambda *a, **k: made.append(1) or fromarray(*a, **k))
    _, scored, _ = node("PrefAlignScoreImages").score(batch, "a red circle", load("toy attribute"))["result"]
    assert len(made) == len(batch) == 6
    assert scored.shas == tuple(hashlib.sha256(p).hexdigest() for p in pngs)


def test_pairs_from_scores_select_and_fill_a_store(scorer_dir):
    from trainer.pairs import select_pairs

    batch, _ = toy_batch(seeds=(3, 4, 5, 6, 7, 8))
    clip = load("clip", "tiny-pick")
    _, scored, _ = node("PrefAlignScoreImages").score(batch, "a red circle", clip)["result"]
    s = scored.judgement.combined
    out = node("PrefAlignPairsFromScores").pairs(batch, scored, "all-pairs", 0.05, "judged")
    pairs, count = out["result"]
    expected = [(a, b) for a in range(6) for b in range(6) if s[a] - s[b] >= 0.05]
    assert count == len(expected) == len(pairs) and expected == select_pairs(scored.judgement, "all-pairs", 0.05)
    pngs = prefalign_pack.nodes.images.tensor_to_pngs(batch)
    assert [p.images for p in pairs] == [(pngs[a], pngs[b]) for a, b in expected]
    assert PairStore(scorer_dir.parent / "stores", "judged", create=False).count() == count
    assert out["ui"]["prefalign_text"][-1] == f"store 'judged' holds {count} pairs"
    best_worst = node("PrefAlignPairsFromScores").pairs(batch, scored, "best-worst", 0.0, "")["result"][0]
    assert [p.images for p in best_worst] == [(pngs[int(np.argmax(s))], pngs[int(np.argmin(s))])]
    with pytest.raises(ValueError, match="not the 6 that Score Images for Preference judged"):
        node("PrefAlignPairsFromScores").pairs(batch[:5], scored, "all-pairs", 0.0, "")


def test_pairs_from_scores_adds_all_or_none_and_shows_no_server_path(scorer_dir, monkeypatch):
    """The pairs go into the store in one write: a failure on the second pair leaves none of them (each pair was its
    own write), and the error names the store's folder as ComfyUI shows it, not the server's path."""
    batch, _ = toy_batch(seeds=(3, 4, 5, 6, 7, 8))
    _, scored, _ = node("PrefAlignScoreImages").score(batch, "a red circle", load("clip", "tiny-pick"))["result"]
    stores = scorer_dir.parent / "stores"
    save, saved = PairStore._save_file, []

    def failing(self, image):
        saved.append(image.sha)
        if len(saved) == 3:  # the second pair's chosen image
            raise prefalign_pack.nodes.pair_store.StoreError(f"cannot write {self.images_dir}")
        save(self, image)

    monkeypatch.setattr(PairStore, "_save_file", failing)
    with pytest.raises(ValueError) as e:
        node("PrefAlignPairsFromScores").pairs(batch, scored, "all-pairs", 0.0, "judged")
    assert str(e.value) == "cannot write stores/judged/images"
    assert PairStore(stores, "judged", create=False).count() == 0
    node("PrefAlignPairsFromScores").pairs(batch, scored, "all-pairs", 1e6, "none_kept")  # no pair: no store made
    assert not (stores / "none_kept").exists()


def test_chained_loaders_vote_and_keep_only_agreed_pairs(scorer_dir):
    from trainer.toy import has_attribute

    batch, ims = toy_batch("a circle", seeds=tuple(range(10, 20)))
    both = load("toy attribute", attribute="red", ensemble_with=load("toy attribute"))
    assert [m.name for m in both.members] == ["attribute:shaded", "attribute:red"]
    _, scored, _ = node("PrefAlignScoreImages").score(batch, "a circle", both)["result"]
    pairs = node("PrefAlignPairsFromScores").pairs(batch, scored, "all-pairs", 0.0, "")["result"][0]
    flags = [(has_attribute(im, "shaded"), has_attribute(im, "red")) for im in ims]
    expected = [(a, b) for a in range(10) for b in range(10) if all(flags[a]) and not any(flags[b])]
    pngs = prefalign_pack.nodes.images.tensor_to_pngs(batch)
    assert [p.images for p in pairs] == [(pngs[a], pngs[b]) for a, b in expected]


# ------------------------------------------------------------------------------------------------ routes
def run(base, scenario, busy_timeout=2.0):
    async def main():
        app = web.Application()
        app.add_routes(score_routes.make_score_routes(lambda: base, busy_timeout))
        async with TestClient(TestServer(app)) as client:
            return await scenario(client)

    return asyncio.run(main())


@pytest.fixture
def picked(scorer_dir):
    """A batch the Score Images node judged, then shown by the Gallery Picker."""
    batch, _ = toy_batch(seeds=(21, 22, 23, 24))
    _, scored, _ = node("PrefAlignScoreImages").score(batch, "a red circle", load("clip", "tiny-pick"))["result"]
    shown = node("PrefAlignGalleryPicker").show(batch, "a red circle", "art")["ui"]["prefalign_batch"][0]
    return scorer_dir.parent / "stores", shown["batch"], scored


def test_automark_suggests_from_the_batch_scores(picked):
    from trainer.pairs import suggest_marks

    base, batch, scored = picked
    art = PairStore(base, "art")
    other = art.add_batch("never scored", [art.batch_image(batch, 1), art.batch_image(batch, 0)])

    async def scenario(client):
        r = await client.get("/prefalign/automark", params={"store": "art", "batch": batch})
        assert r.status == 200, await r.text()
        answer = await r.json()
        assert answer["marks"] == suggest_marks(scored.judgement) and answer["scorer"] == scored.scorer
        assert answer["marks"].count("chosen") == 1 and answer["marks"].count("rejected") == 1
        r = await client.get("/prefalign/automark", params={"store": "art", "batch": batch, "per_side": "2"})
        assert (await r.json())["marks"] == suggest_marks(scored.judgement, per_side=2)
        r = await client.get("/prefalign/automark", params={"store": "art", "batch": other})
        assert r.status == 404 and "Score Images" in (await r.json())["error"]
        for params in ({"store": "../x", "batch": batch}, {"store": "art", "batch": "../../etc"},
                       {"store": "art", "batch": batch, "margin": "nan"}):
            r = await client.get("/prefalign/automark", params=params)
            assert r.status == 400, params

    run(base, scenario)
    assert PairStore(base, "art").count() == 0  # suggestions mark nothing by themselves


def test_compare_records_each_judgement_as_a_pair(picked):
    base, batch, _ = picked
    store = PairStore(base, "art")
    manual = store.add_pair("by hand", store.batch_image(batch, 0), store.batch_image(batch, 1))

    async def scenario(client):
        r = await client.post("/prefalign/compare", json={"store": "art", "batch": batch, "winner": 2, "loser": 0})
        assert r.status == 200, await r.text()
        first = await r.json()
        r = await client.post("/prefalign/compare", json={"store": "art", "batch": batch, "winner": 3, "loser": 1})
        assert (await r.json())["total_pairs"] == 3
        r = await client.post("/prefalign/compare/undo", json={"store": "art", "pair": first["pair"]})
        assert (await r.json()) == {"deleted": first["pair"], "total_pairs": 2}
        bad = [{"store": "art", "pair": manual},  # only comparison judgements can be taken back here
               {"store": "art", "batch": batch, "winner": 1, "loser": 1},
               {"store": "art", "batch": batch, "winner": 9, "loser": 0},
               {"store": "art", "batch": batch, "winner": True, "loser": 0},
               {"store": "art", "batch": batch, "winner": "1", "loser": 0},
               {"store": "art", "batch": batch, "winner": 1, "loser": 0, "path": "/etc/passwd"},
               {"store": "../x", "batch": batch, "winner": 1, "loser": 0}]
        for body in bad:
            path = "/prefalign/compare/undo" if "pair" in body else "/prefalign/compare"
            r = await client.post(path, json=body)
            assert r.status == 400, body
        r = await client.post("/prefalign/compare", data=b"{" + b" " * 5000 + b"}",
                              headers={"Content-Type": "application/json"})
        assert r.status == 400
        raw = b"[" * 1000  # under the size limit, nested deeper than Python's stack: RecursionError (was a 500)
        assert len(raw) <= score_routes.MAX_BODY
        r = await client.post("/prefalign/compare", data=raw, headers={"Content-Type": "application/json"})
        assert r.status == 400 and (await r.json())["error"] == "body is not JSON"

    run(base, scenario)
    kept = [p for p in store.pairs() if p["source"] == "compare"]
    assert len(kept) == 1 and kept[0]["prompt"] == "a red circle"
    assert store.image_path(kept[0]["chosen"]).read_bytes() == store.batch_image(batch, 3)
    assert store.image_path(kept[0]["rejected"]).read_bytes() == store.batch_image(batch, 1)


def test_routes_take_the_batch_images_by_their_recorded_address(picked, monkeypatch):
    """Suggestions and judgements use the content addresses the batch records: no image is read back, decoded or
    hashed again (a batch of 4 took 4 file reads and hashes per suggestion, 2 reads and decodes per judgement)."""
    base, batch, scored = picked
    store_mod = prefalign_pack.nodes.pair_store
    monkeypatch.setattr(PairStore, "batch_image", lambda *a: pytest.fail("an image was read back"))
    monkeypatch.setattr(store_mod, "check_image", lambda data: pytest.fail("an image was decoded again"))

    async def scenario(client):
        r = await client.get("/prefalign/automark", params={"store": "art", "batch": batch})
        assert r.status == 200 and (await r.json())["scorer"] == scored.scorer
        r = await client.post("/prefalign/compare", json={"store": "art", "batch": batch, "winner": 1, "loser": 3})
        assert r.status == 200, await r.text()
        return (await r.json())["pair"]

    pair = run(base, scenario)
    shas = PairStore(base, "art").batch_shas(batch)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in PairStore(base, "art").pairs()] == [(pair, shas[1], shas[3])]


def test_undo_deletes_one_judgement_without_reading_the_store(picked, monkeypatch):
    """Undo deletes the judgement by id and source in one statement; it used to load every pair of the store."""
    base, batch, _ = picked
    store = PairStore(base, "art")
    manual = store.add_pair("by hand", store.batch_image(batch, 0), store.batch_image(batch, 1))
    judged = store.add_batch_pair(batch, 2, 0, source=score_routes.COMPARE_SOURCE)
    monkeypatch.setattr(PairStore, "pairs", lambda self: pytest.fail("every pair was read"))

    async def scenario(client):
        r = await client.post("/prefalign/compare/undo", json={"store": "art", "pair": manual})
        assert r.status == 400 and (await r.json())["error"] == f"pair {manual} is not a comparison judgement in store 'art'"
        r = await client.post("/prefalign/compare/undo", json={"store": "art", "pair": judged})
        assert (await r.json()) == {"deleted": judged, "total_pairs": 1}

    run(base, scenario)
    monkeypatch.undo()
    assert [p["id"] for p in store.pairs()] == [manual]


def _hold_lock(db, seconds, ready):
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    ready.set()
    time.sleep(seconds)
    con.execute("ROLLBACK")


def test_a_judgement_waiting_on_the_store_lock_does_not_block_other_requests(picked):
    """Another process holds the store's write lock for 6 s: the judgement waits off the event loop (then answers
    503 "store busy"), and meanwhile another request is answered at once."""
    base, batch, _ = picked
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(str(base / "art" / "pairs.sqlite"), 6.0, ready))
    holder.start()
    assert ready.wait(30)

    async def scenario(client):
        waiting = asyncio.ensure_future(client.post("/prefalign/compare", json={"store": "art", "batch": batch,
                                                                                 "winner": 1, "loser": 0}))
        await asyncio.sleep(0.3)
        start = time.monotonic()
        r = await client.get("/prefalign/automark", params={"store": "../x", "batch": batch})
        answered = time.monotonic() - start
        assert r.status == 400 and answered < 1.0  # the event loop is free while the store is locked
        assert not waiting.done()
        r = await waiting
        assert r.status == 503 and "busy" in (await r.json())["error"]

    try:
        run(base, scenario, busy_timeout=2.0)
    finally:
        holder.join()


def test_generate_score_train_workflow_chains_score_pairs_train(comfy_folders):
    """The shipped graph (built in workflow_tools.py, compared with the file by test_nodes_workflows.py) feeds the
    scored images to the pairs node and to the gallery, and the pairs to the Train node."""
    info = wt.object_info(prefalign_pack)
    ui = json.loads((wt.WORKFLOW_DIR / wt.SCORED).read_text())
    assert ui == json.loads(json.dumps(wt.WORKFLOWS[wt.SCORED](info)))
    assert [p for p in wt.validate(ui, info) if "is not one of the choices" not in p] == []
    api = wt.to_api(ui, info)
    by_type = {n["class_type"]: (key, n) for key, n in api.items()}
    score_key, score = by_type["PrefAlignScoreImages"]
    pairs_key, pairs = by_type["PrefAlignPairsFromScores"]
    assert score["inputs"]["scorer"][0] == by_type["PrefAlignLoadScorer"][0]
    assert pairs["inputs"]["scores"] == [score_key, 1] and pairs["inputs"]["images"] == [score_key, 0]
    assert by_type["PrefAlignTrainLoRA"][1]["inputs"]["pairs"] == [pairs_key, 0]
    assert by_type["PrefAlignGalleryPicker"][1]["inputs"]["images"] == [score_key, 0]
