"""Integration with a real ComfyUI on CPU (skipped unless COMFYUI_DIR is set).

    /path/to/comfy-venv/bin/pip install -r requirements.txt   # what ComfyUI-Manager installs for the pack
    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy-venv/bin/python pytest tests/comfyui -v

The pack loads without errors; the workflows fit the live node definitions; their API-format versions run
to completion on tiny SD1.5- and SDXL-architecture checkpoints made by the test: curate (then marks through the
route), train (the LoRA lands in models/loras), compare; stock LoraLoader loads the file with no unmapped
keys and it changes the generated image; Cancel during training keeps a LoRA.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import time
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the integration tests")

HERE = Path(__file__).resolve().parent


cs = importlib.import_module("comfy_server")  # tests/comfyui is on the path of its own tests
wt = cs.workflow_tools()
STORE = "it_store"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = cs.ComfyServer.from_env(tmp_path_factory.mktemp("comfy"))  # PREFALIGN_CKPT_DIR saves ~40 s
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def info(server):
    return server.get("/object_info")


def workflow(name: str) -> dict:
    return json.loads((wt.WORKFLOW_DIR / name).read_text())


def api_of(name: str, info: dict) -> dict:
    return wt.to_api(workflow(name), info)


def nodes_of(api: dict, class_type: str) -> list[dict]:
    return [n for n in api.values() if n["class_type"] == class_type]


def small(api: dict, size: int = 64, steps: int = 3, ckpt: str = "tiny_sd15.safetensors") -> dict:
    """The same graph, sized for CPU: tiny checkpoint, small latents, few sampler steps."""
    for n in api.values():
        i = n["inputs"]
        if n["class_type"] == "CheckpointLoaderSimple":
            i["ckpt_name"] = ckpt
        if n["class_type"] == "EmptyLatentImage":
            i["width"] = i["height"] = size
        if n["class_type"] == "KSampler":
            i["steps"] = steps
    return api


def test_pack_loads(server, info):
    # by the pack's folder, not the word "prefalign" (the ComfyUI checkout's own failures may contain it)
    loaded, problems = cs.pack_import_report(server.log_text(), server.pack_dir)
    assert loaded and problems == []
    ours = {k for k in info if k.startswith("PrefAlign")}
    assert ours == {"PrefAlignPairsFromDataset", "PrefAlignAddPair", "PrefAlignLoadStore", "PrefAlignGalleryPicker",
                    "PrefAlignExportParquet", "PrefAlignImportParquet", "PrefAlignTrainLoRA", "PrefAlignLoadLoRA",
                    "PrefAlignLoadScorer", "PrefAlignScoreImages", "PrefAlignPairsFromScores",
                    "PrefAlignNegativeBranchLoRA"}
    assert all(info[k]["category"].startswith("preference/") for k in ours)
    assert "dpo" in server.get("/prefalign/methods")
    assert "dpo" in server.get("/api/prefalign/methods")
    js = server.get("/extensions/prefalign/prefalign.js")
    assert b"registerExtension" in js


def test_template_browser_lists_workflows_with_pictures(server):
    """The template browser titles the pack's workflows by file name and loads `<name>.jpg` beside each: no 404."""
    from urllib.parse import quote

    listed = server.get("/workflow_templates")[cs.PACK_FOLDER]
    assert sorted(listed) == sorted(Path(n).stem for n in wt.WORKFLOWS)
    for name in listed:
        picture = server.get(f"/api/workflow_templates/{cs.PACK_FOLDER}/{quote(name)}.jpg")
        assert picture[:3] == b"\xff\xd8\xff" and len(picture) > 5_000, name
        assert server.get(f"/api/workflow_templates/{cs.PACK_FOLDER}/{quote(name)}.json")["nodes"]


@pytest.mark.parametrize("name", list(wt.WORKFLOWS))
def test_workflows_fit_live_nodes(info, name):
    problems = [p for p in wt.validate(workflow(name), info) if "is not one of the choices" not in p]
    assert problems == []


def sampling_nodes(model: list, clip: list, vae: list, seed: int, prefix: str) -> dict:
    """Nodes s1..s6 of a 64 px, 3-step txt2img on `model` that end in a SaveImage (`s6`)."""
    return {
        "s1": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a watercolor fox"}},
        "s2": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "s3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "s4": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["s1", 0], "negative": ["s2", 0],
                                                    "latent_image": ["s3", 0], "seed": seed, "steps": 3, "cfg": 7.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "s5": {"class_type": "VAEDecode", "inputs": {"samples": ["s4", 0], "vae": vae}},
        "s6": {"class_type": "SaveImage", "inputs": {"images": ["s5", 0], "filename_prefix": prefix}},
    }


def sample(server, lora: str | None, seed: int = 7, strength: float = 1.0, ckpt: str = "tiny_sd15.safetensors"):
    """One image from the checkpoint, through stock LoraLoader when `lora` names a file."""
    g, model, clip, vae = cs.checkpoint_nodes(ckpt, lora, strength)
    g.update(sampling_nodes(model, clip, vae, seed, f"it_{ckpt[:-12]}_{'lora' if lora else 'base'}_{strength}"))
    return server.image(server.run(g), "s6")


def test_curate_train_compare(server, info):
    import numpy as np
    from safetensors import safe_open

    # 1. curate: generate a batch of 4, the gallery records it, marks go through the route
    api = small(api_of(wt.CURATE, info))
    gallery_id = next(k for k, n in api.items() if n["class_type"] == "PrefAlignGalleryPicker")
    api[gallery_id]["inputs"]["store"] = STORE
    nodes_of(api, "EmptyLatentImage")[0]["inputs"]["batch_size"] = 4
    entry = server.run(api)
    batch = entry["outputs"][gallery_id]["prefalign_batch"][0]
    assert batch["count"] == 4 and batch["store"] == STORE and "fox" in batch["prompt"]
    for idx, mark in [(0, "chosen"), (1, "chosen"), (2, "rejected"), (3, "rejected")]:
        state = server.post("/prefalign/mark", {"store": STORE, "batch": batch["batch"], "index": idx, "mark": mark})
    assert state["pairs"] == 4 and state["total_pairs"] == 4
    assert server.get("/prefalign/stores")["stores"] == [STORE]
    store_dir = server.base / "user" / "prefalign_stores" / STORE
    assert (store_dir / "pairs.sqlite").is_file()

    base_before = sample(server, None)

    # 2. train: store -> train -> save; a big learning rate so 3 steps visibly change the model
    api = small(api_of(wt.TRAIN, info))
    train_id = next(k for k, n in api.items() if n["class_type"] == "PrefAlignTrainLoRA")
    nodes_of(api, "PrefAlignLoadStore")[0]["inputs"]["store"] = STORE
    api[train_id]["inputs"].update(steps=3, resolution=64, learning_rate="0", checkpoint_every=0, lora_name="it",
                                   gradient_accumulation_steps=1, method_args="beta = 5000")
    with pytest.raises(AssertionError, match=r"learning_rate '0' is outside 1e-08 \.\. 1"):  # refused when queued
        server.queue(api)
    api[train_id]["inputs"]["learning_rate"] = 0.05  # a number, as API graphs saved before it was text send it
    t0 = time.time()
    entry = server.run(api, timeout=600)
    train_s = time.time() - t0
    info_out = entry["outputs"][train_id]["prefalign_train"][0]
    lora_name = info_out["lora"]
    assert info_out["steps"] == 3 and not info_out["stopped"]
    path = server.base / "models" / "loras" / lora_name
    assert path.is_file(), lora_name
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["prefalign.method"] == "dpo" and meta["prefalign.steps"] == "3" and meta["prefalign.dataset"] == f"store:{STORE}"
    assert entry["outputs"][train_id]["prefalign_text"] == [f"saved models/loras/{lora_name} (3 steps)"]
    # saved once: no second copy without metadata in output/loras/, which LoRA menus list too
    assert not (server.base / "output" / "loras").exists()
    menu = server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert lora_name in menu and [n for n in menu if n.startswith(("it_", "prefalign/it_"))] == [lora_name]
    print(f"\ntrain workflow (3 DPO steps, 4 pairs at 64 px, tiny SD1.5) took {train_s:.1f} s on CPU")

    # 3. stock LoraLoader: every key maps, and the image changes at the same seed
    log_before = len(server.log_text())
    base, tuned = sample(server, lora_name, strength=0.0), sample(server, lora_name)
    # strength 0 returns the untouched model through a new node chain (no cache hit): nothing of the
    # training (weight wrappers on the shared UNet) may linger
    assert np.array_equal(base, base_before), "training left the base model changed"
    assert "lora key not loaded" not in server.log_text()[log_before:]
    diff = np.abs(base - tuned).mean()
    assert diff > 0.5, f"the LoRA did not change the image (mean abs diff {diff:.3f})"

    # 3b. the node's LORA_MODEL output through ComfyUI's own LoraModelLoader gives the same image
    (ckpt_id,) = [k for k, n in api.items() if n["class_type"] == "CheckpointLoaderSimple"]
    api["lm"] = {"class_type": "LoraModelLoader", "inputs": {"model": [ckpt_id, 0], "lora": [train_id, 1],
                                                             "strength_model": 1.0}}
    api.update(sampling_nodes(["lm", 0], [ckpt_id, 1], [ckpt_id, 2], 7, "it_lora_model"))
    from_lora_model = server.image(server.run(api, timeout=600), "s6")
    assert np.abs(from_lora_model - tuned).mean() < 0.5

    # 4. compare workflow: our loader, same seed, side by side
    api = small(api_of(wt.COMPARE, info))
    nodes_of(api, "PrefAlignLoadLoRA")[0]["inputs"]["lora_name"] = lora_name
    save_id = next(k for k, n in api.items() if n["class_type"] == "SaveImage")
    loader_id = next(k for k, n in api.items() if n["class_type"] == "PrefAlignLoadLoRA")
    entry = server.run(api)
    arr = server.image(entry, save_id)
    h, w = arr.shape[:2]
    assert w > h  # two images side by side
    half = (w - 8) // 2
    assert np.abs(arr[:, :half] - arr[:, -half:]).mean() > 0.5
    (text,) = entry["outputs"][loader_id]["prefalign_text"]
    assert "method: dpo" in text and "steps: 3" in text and f"dataset: store:{STORE}" in text


def add_colour_pairs(server, store: str, prompt: str = "a red square") -> None:
    """Two pairs through the Add Pair node (stock EmptyImage colours: red chosen, blue rejected)."""
    add = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0xCC3322}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x2233CC}},
        "3": {"class_type": "PrefAlignAddPair", "inputs": {"chosen": ["1", 0], "rejected": ["2", 0], "prompt": prompt, "store": store}},
    }
    entry = server.run(add)
    assert entry["outputs"]["3"]["prefalign_text"][0].endswith("holds 2")
    assert server.get(f"/prefalign/store?store={store}")["pairs"] == 2


def test_sdxl_train_and_load(server, info):
    """The SDXL family end to end: the train workflow on an SDXL checkpoint (CLIP-L + CLIP-G, ADM size
    conditioning), then stock LoraLoader on the same checkpoint maps every key and changes the image."""
    import numpy as np
    from safetensors import safe_open

    ckpt = "tiny_sdxl.safetensors"
    add_colour_pairs(server, "sdxl_store")
    base_before = sample(server, None, ckpt=ckpt)
    api = small(api_of(wt.TRAIN, info), ckpt=ckpt)
    train_id = next(k for k, n in api.items() if n["class_type"] == "PrefAlignTrainLoRA")
    nodes_of(api, "PrefAlignLoadStore")[0]["inputs"]["store"] = "sdxl_store"
    api[train_id]["inputs"].update(steps=3, resolution=64, learning_rate=0.05, checkpoint_every=0, lora_name="sdxl",
                                   gradient_accumulation_steps=1, method_args="beta = 5000", gradient_checkpointing=True)
    t0 = time.time()
    entry = server.run(api, timeout=900)
    print(f"\ntrain workflow (3 DPO steps, 2 pairs at 64 px, tiny SDXL) took {time.time() - t0:.1f} s on CPU")
    out = entry["outputs"][train_id]["prefalign_train"][0]
    assert out["steps"] == 3 and not out["stopped"]
    with safe_open(str(server.base / "models" / "loras" / out["lora"]), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["prefalign.architecture"] == "sdxl" and meta["prefalign.method"] == "dpo"
    # the targets sit in the transformer blocks of SDXL's input, middle and output levels
    assert any("input_blocks" in k for k in keys) and any("output_blocks" in k for k in keys)
    assert all(k.startswith("lora_unet_") for k in keys)
    log_before = len(server.log_text())
    base, tuned = sample(server, out["lora"], strength=0.0, ckpt=ckpt), sample(server, out["lora"], ckpt=ckpt)
    assert np.array_equal(base, base_before), "training left the base model changed"
    assert "lora key not loaded" not in server.log_text()[log_before:]
    diff = np.abs(base - tuned).mean()
    assert diff > 0.5, f"the LoRA did not change the SDXL image (mean abs diff {diff:.3f})"

    # the SDXL LoRA on an SD1.5 model: Load Preference LoRA names the modules that do not fit (ComfyUI's key map)
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
         "2": {"class_type": "PrefAlignLoadLoRA", "inputs": {"model": ["1", 0], "lora_name": out["lora"], "strength_model": 1.0}}}
    g.update(sampling_nodes(["2", 0], ["1", 1], ["1", 2], 7, "it_sdxl_on_sd15"))
    message = server.failure(g)
    assert "does not fit this model (its metadata says it was trained for sdxl)" in message, message


@pytest.mark.parametrize("patch, inputs, prediction", [
    ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": False}, "v_prediction"),
    ("ModelSamplingSD3", {"shift": 3.0}, "flow"),  # rectified flow (CONST), as SD3 and Flux sample
])
def test_other_model_samplings_train(server, info, patch, inputs, prediction):
    """The MODEL as ComfyUI's stock sampling nodes patch it (v-prediction; rectified flow): the Train node
    trains in that parameterisation, records it, and the LoRA changes images sampled the same way."""
    import numpy as np
    from safetensors import safe_open

    store = f"{prediction}_store"
    add_colour_pairs(server, store)
    api = small(api_of(wt.TRAIN, info))
    (ckpt_id,) = [k for k, n in api.items() if n["class_type"] == "CheckpointLoaderSimple"]
    train_id = next(k for k, n in api.items() if n["class_type"] == "PrefAlignTrainLoRA")
    api["patch"] = {"class_type": patch, "inputs": {"model": [ckpt_id, 0], **inputs}}
    api[train_id]["inputs"]["model"] = ["patch", 0]
    nodes_of(api, "PrefAlignLoadStore")[0]["inputs"]["store"] = store
    api[train_id]["inputs"].update(steps=3, resolution=64, learning_rate=0.05, checkpoint_every=0, lora_name=prediction,
                                   gradient_accumulation_steps=1, method_args="beta = 5000")
    out = server.run(api, timeout=600)["outputs"][train_id]["prefalign_train"][0]
    assert out["steps"] == 3 and not out["stopped"] and all(np.isfinite(v) for v in out["metrics"].values())
    with safe_open(str(server.base / "models" / "loras" / out["lora"]), "pt") as f:
        assert f.metadata()["prefalign.prediction_type"] == prediction

    def image(strength: float):
        g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
             "2": {"class_type": patch, "inputs": {"model": ["1", 0], **inputs}},
             "3": {"class_type": "LoraLoader", "inputs": {"model": ["2", 0], "clip": ["1", 1], "lora_name": out["lora"],
                                                          "strength_model": strength, "strength_clip": strength}}}
        g.update(sampling_nodes(["3", 0], ["3", 1], ["1", 2], 7, f"it_{prediction}_{strength}"))
        return server.image(server.run(g), "s6")

    diff = np.abs(image(0.0) - image(1.0)).mean()
    assert diff > 0.5, f"the {prediction} LoRA did not change the image (mean abs diff {diff:.3f})"


def test_cancel_keeps_lora(server, info):
    """Cancel (POST /interrupt) during training: execution_interrupted, and a LoRA with fewer steps is saved."""
    add_colour_pairs(server, "cancel_store")
    api = small(api_of(wt.TRAIN, info))
    train_id = next(k for k, n in api.items() if n["class_type"] == "PrefAlignTrainLoRA")
    nodes_of(api, "PrefAlignLoadStore")[0]["inputs"]["store"] = "cancel_store"
    api[train_id]["inputs"].update(steps=500, resolution=64, checkpoint_every=0, lora_name="cancelled",
                                   gradient_accumulation_steps=1)
    loras = server.base / "models" / "loras" / "prefalign"
    pid = server.queue(api)
    t = server.interrupt_at_step(pid, step=2, timeout=240)
    entry = server.wait(pid, timeout=300)
    t.join()
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    saved = sorted(loras.glob("cancelled_dpo_*steps_*.safetensors"))
    assert len(saved) == 1 and "_500steps_" not in saved[0].name
    runs = server.get("/prefalign/train/status")["runs"]
    assert any(r["prompt_id"] == pid and r["status"] == "stopped" for r in runs.values())

    # resume: the same graph continues from the cancelled run's last checkpoint up to `steps`
    done = int(re.search(r"_(\d+)steps_", saved[0].name).group(1))
    api[train_id]["inputs"].update(steps=done + 2, resume=True)
    entry = server.run(api)
    out = entry["outputs"][train_id]["prefalign_train"][0]
    assert out["steps"] == done + 2 and not out["stopped"]
    assert len(list((server.base / "output" / "prefalign" / "runs").glob("cancelled-dpo-*"))) == 1
    # the chart (and the loss_curve drawn from the same file) covers the whole run, not only the resumed steps
    run = server.get("/prefalign/train/status")["runs"][train_id]
    assert [p[0] for p in run["loss"]] == list(range(1, done + 3))


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.mark.skipif(not Path(CHROMIUM).exists() or not (HERE / "node_modules" / "playwright-core").is_dir(),
                    reason="needs Debian's chromium (apt-get install chromium) and `npm install` in tests/comfyui")
def test_browser_gallery_and_loss_chart(server, tmp_path):
    """The real frontend: curate (Run again, marks, growing thumbnails, full-size view, reload, a crafted workflow),
    train (typed learning rate, live chart, result text, argument errors), compare (the LoRA's metadata on the
    node), node search, template browser. The screenshots are for a person to look at."""
    import subprocess

    shots = Path(os.environ.get("PREFALIGN_SCREENSHOTS", tmp_path / "shots"))
    out = subprocess.run(["node", str(HERE / "browser_test.mjs"), server.url, str(shots), "browser_store",
                          wt.CURATE, wt.TRAIN, wt.COMPARE],
                         capture_output=True, text=True, timeout=1200, env={**os.environ, "CHROMIUM": CHROMIUM})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nbrowser saw: {json.dumps(seen)}\nscreenshots: {shots}")
    assert seen["curate"]["missing"] == [] and seen["train"]["missing"] == [] and seen["compare"]["missing"] == []
    # no page error raised in our extension's code (the frontend itself logs a settings error on a first start)
    assert [e for e in seen["errors"] if "extensions/prefalign" in e or "prefalign" in e.split("|")[0].lower()] == []
    # Run again makes a new batch: the seed is randomized after each run
    run_again = seen["runAgain"]
    assert run_again["second"] != run_again["first"] and len(set(run_again["seeds"])) == 3
    assert seen["tiles"] == 4
    assert "2 chosen, 2 rejected → 4 pairs" in seen["status"] and seen["status"].endswith("saved")
    # thumbnails grow with the node; V shows one full size; Ctrl+hover shows it while Ctrl is held
    assert seen["growth"]["after"] > 1.5 * seen["growth"]["before"], seen["growth"]  # auto-fill 96 px columns: ~1.0
    assert seen["preview"]["natural"] == 64 and seen["preview"]["shown"] > seen["growth"]["after"]
    assert seen["preview"]["caption"].startswith("2 / 4 · rejected")
    assert seen["previewClosed"] and seen["ctrlHover"] and seen["ctrlReleased"]
    assert seen["restored"], seen.get("restoredStatus")
    # a crafted workflow claiming 3000 images: the page asks the server how many there are
    assert seen["crafted"]["tiles"] == 4 and seen["crafted"]["requests"] <= 4, seen["crafted"]  # cached images: no request
    # training: the typed rate reaches the graph unrounded; the chart and the node's text show the result
    assert seen["learningRate"] == "5e-7"
    # before the run the node said which methods train the connected SD1.5 checkpoint: all of them
    assert seen["fit"].startswith("SD1.5 (epsilon): ") and seen["fit"].endswith(" train it"), seen["fit"]
    assert "mapo" in seen["fit"] and "do not" not in seen["fit"]
    assert seen["trained"] and "step 4/4" in seen["chart"]
    text = seen["trainText"]
    assert re.fullmatch(r"saved models/loras/prefalign/browser_dpo_4steps_\d{8}-\d{6}\.safetensors \(4 steps\)", text["text"])
    assert text["width"] > 100 and text["height"] > 10 and text["onTop"] and text["fits"]
    assert "lambda_d = 1.0" in seen["methodArgs"]["kto"] and "beta = 5000.0" in seen["methodArgs"]["dpo"]
    # an argument error, then a learning rate refused at queue time: the chart no longer says "done"
    assert "(error: method_args.gamma: dpo has no hyper-parameter gamma" in seen["argumentError"] and "done" not in seen["argumentError"]
    assert "(error: " in seen["refused"] and "learning_rate '0' is outside" in seen["refused"] and "done" not in seen["refused"]
    assert seen["staleText"]  # the earlier run's "saved ..." text is dimmed, not shown as this run's result
    # Load Preference LoRA shows the file's metadata on the node
    lora_text = seen["loraText"]
    assert "method: dpo" in lora_text["text"] and "steps: 4" in lora_text["text"] and "dataset: store:browser_store" in lora_text["text"]
    assert lora_text["onTop"] and lora_text["fits"]  # every line visible, none scrolled away
    # node search: "dpo" finds the Train node, "preference" every node of the pack
    assert any(o.startswith("Train Preference LoRA (DPO and more)") for o in seen["search"]["dpo"])
    displays = [d["display_name"] for k, d in server.get("/object_info").items() if k.startswith("PrefAlign")]
    assert all(any(o.startswith(d) for o in seen["search"]["preference"]) for d in displays), seen["search"]["preference"]
    # template browser: readable titles, every picture loads
    titles = {t["title"]: t["images"] for t in seen["templates"]}
    assert set(titles) == {Path(n).stem for n in wt.WORKFLOWS}
    assert all(images and all(i["loaded"] for i in images) for images in titles.values()), titles
    # the picks are in the store: every chosen x rejected pairing, right away
    assert server.get("/prefalign/store?store=browser_store")["pairs"] == 4
    for name in ("gallery.png", "gallery_preview.png", "gallery_grown.png", "gallery_after_reload.png", "train.png",
                 "train_refused.png", "compare.png", "search.png", "templates.png"):
        assert (shots / name).stat().st_size > 10_000
