"""Diffusion transformers in a real ComfyUI on CPU (skipped unless COMFYUI_DIR is set): SD3 and Flux end to end.

- SD3: a tiny SD3.5-medium-shaped checkpoint (MMDiT with RMS q/k norms and a second attention, CLIP-L + CLIP-G,
  a TAESD-shaped VAE) made by make_tiny_checkpoint.py, loaded by Load Checkpoint; the Train node trains it from an
  API graph with the family's preset; stock Load LoRA applies the file with every key mapped, the image changes at
  strength 1 and not at 0; a prompt longer than one CLIP chunk keeps all its tokens; Cancel keeps a LoRA and resume
  continues it; the file loads into a diffusers SD3 transformer of the same shape.
- Flux: a tiny Flux.1-dev-shaped diffusion model (ComfyUI's detection fixes Flux's width: one double and one single
  block of 3072) through Load Diffusion Model with fp8 weights, Load VAE, and a STAND-IN text encoder
  (tests/comfyui/standin_text_encoder: ComfyUI's real Flux tokenizer, a small random encoder with T5's and CLIP-L's
  output widths), because ComfyUI 0.3.64 always builds Flux's T5-XXL at full size, which a 2-core CPU cannot run.
  Everything past the text encoder is ComfyUI's and the pack's real code: training with gradient checkpointing,
  stock LoraLoaderModelOnly, FluxGuidance and the sampler.
- Every other family: tests/comfyui/family_probe.py trains ComfyUI's own model classes (tiny) one step and loads
  the file through ComfyUI's key map (`test_every_family_trains_and_loads_with_comfyuis_key_map`).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the integration tests")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SD3, FLUX, FLUX_VAE = "tiny_sd3.safetensors", "tiny_flux.safetensors", "tiny_flux_vae.safetensors"
MODELS = {"checkpoints": {SD3: "sd3"}, "diffusion_models": {FLUX: "flux"}, "vae": {FLUX_VAE: "flux-vae"}}
LONG = ("a watercolor painting of a small red fox sleeping under a tall old pine tree in deep fresh snow at dusk, "
        "soft blue light, falling snowflakes, a frozen river in the distance, mountains behind it, a few crows in "
        "the sky, warm light from a cabin window, long shadows on the snow, delicate brush strokes, muted colours, "
        "paper texture, quiet winter mood, highly detailed fur, gentle gradients, atmospheric perspective")


cs = importlib.import_module("comfy_server")  # tests/comfyui is on the path of its own tests


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = cs.ComfyServer.from_env(tmp_path_factory.mktemp("comfy_flow"), models=MODELS,
                                extra_packs=(HERE / "standin_text_encoder",))
    s.start()
    yield s
    s.stop()


def add_pairs(server, store: str, prompts: list[str]) -> None:
    """One pair per prompt through the Add Pair node (stock EmptyImage colours: warm chosen, cold rejected)."""
    for i, prompt in enumerate(prompts):
        add = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xCC3322 + i * 0x101010}},
            "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x2233CC + i * 0x080808}},
            "3": {"class_type": "PrefAlignAddPair", "inputs": {"chosen": ["1", 0], "rejected": ["2", 0], "prompt": prompt, "store": store}},
        }
        server.run(add)
    assert server.get(f"/prefalign/store?store={store}")["pairs"] == len(prompts)


def train_node(model, clip, vae, store: str, **kw) -> dict:
    """The Train node's API inputs: the family preset (auto), Flow-DPO with the flow beta left to the model."""
    inputs = {"model": model, "clip": clip, "vae": vae, "pairs": ["store", 0], "method": "dpo", "method_args": "",
              "steps": 3, "learning_rate": "0.05", "rank": 4, "alpha": 4.0, "batch_size": 2, "gradient_accumulation_steps": 1,
              "resolution": 64, "training_seed": 0, "checkpoint_every": 0, "target_modules": "auto", "lora_name": store,
              "gradient_checkpointing": False, "resume": False, "guidance": -1.0, "timestep_sampling": "auto"}
    inputs.update(kw)
    return {"store": {"class_type": "PrefAlignLoadStore", "inputs": {"store": store}},
            "train": {"class_type": "PrefAlignTrainLoRA", "inputs": inputs}}


def image(server, graph: dict, save: str):
    return server.image(server.run(graph, timeout=900), save)


def sample_nodes(model, clip, vae, seed: int, prefix: str, cfg: float, flux: bool = False) -> dict:
    positive = ["pos", 0]
    g = {"pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a red square"}},
         "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
         "lat": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    if flux:
        g["fg"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": 3.5}}
        positive = ["fg", 0]
    g["ks"] = {"class_type": "KSampler", "inputs": {"model": model, "positive": positive, "negative": ["neg", 0],
                                                   "latent_image": ["lat", 0], "seed": seed, "steps": 2 if flux else 3,
                                                   "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    g["dec"] = {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": vae}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": prefix}}
    return g


def sd3_image(server, lora: str | None, strength: float = 1.0, seed: int = 7):
    g, model, clip, vae = cs.checkpoint_nodes(SD3, lora, strength)
    g.update(sample_nodes(model, clip, vae, seed, f"sd3_{'lora' if lora else 'base'}_{strength}", cfg=2.0))
    return image(server, g, "save")


def lora_file(server, name: str) -> tuple[list[str], dict]:
    from safetensors import safe_open

    with safe_open(str(server.base / "models" / "loras" / name), "pt") as f:
        return list(f.keys()), f.metadata()


def trained(server, graph: dict, architecture: str, steps: int, what: str) -> tuple[dict, list[str], dict]:
    """Run a graph with the Train node `train`: its result, the saved file's keys and metadata (flow, `architecture`)."""
    t0 = time.time()
    out = server.run(graph, timeout=900)["outputs"]["train"]["prefalign_train"][0]
    print(f"\n{architecture}: {steps} Flow-DPO steps, {what}: {time.time() - t0:.1f} s on CPU")
    assert out["steps"] == steps and not out["stopped"]
    keys, meta = lora_file(server, out["lora"])
    assert meta["prefalign.architecture"] == architecture and meta["prefalign.prediction_type"] == "flow"
    return out, keys, meta


def cached_token_lengths(server) -> set[int]:
    """Token lengths of every prompt in the trainer's encoding cache (the `size.prompt_embeds` it stores per row)."""
    from safetensors import safe_open

    lengths = set()
    for shard in (server.base / "output" / "prefalign" / "cache").rglob("shard-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            lengths |= {int(f.get_tensor(k)[0, 0]) for k in f.keys() if k.endswith("/text.size.prompt_embeds")}
    return lengths


def test_the_train_node_knows_the_methods_of_a_loaders_file_before_a_run(server):
    """ComfyUI's own detection on the file's header (nothing loaded): a Load Checkpoint SD3 and a Load Diffusion
    Model Flux are flow models that MaPO and DSPO do not train; a graph's sampling patch is honoured."""
    from urllib.parse import urlencode

    def methods(folder: str, name: str, sampling: str = "") -> dict:
        return server.get("/prefalign/model_methods?" + urlencode({"folder": folder, "name": name, "sampling": sampling}))

    for folder, name, family in [("checkpoints", SD3, "sd3"), ("diffusion_models", FLUX, "flux")]:
        answer = methods(folder, name)
        assert answer["family"] == family and answer["prediction_type"] == "flow", answer
        assert {m for m, why in answer["methods"].items() if why} == {"mapo", "dspo"}
        assert "does not train" in answer["methods"]["mapo"]
    assert not any(methods("checkpoints", SD3, "epsilon")["methods"].values())  # ModelSamplingDiscrete eps
    with pytest.raises(Exception, match="400"):
        methods("checkpoints", "../" + SD3)


def test_sd3_trains_and_stock_load_lora_applies_it(server):
    import numpy as np

    add_pairs(server, "sd3_pairs", ["a red square", LONG])
    base_before = sd3_image(server, None)
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD3}},
             **train_node(["ckpt", 0], ["ckpt", 1], ["ckpt", 2], "sd3_pairs")}
    out, keys, meta = trained(server, graph, "sd3", 3, "2 pairs at 64 px, tiny SD3.5-shaped checkpoint")
    assert '"beta": 1000.0' in meta["prefalign.method_args"]
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert any(".attn2.to_q." in k for k in keys) and any(".attn.add_k_proj." in k for k in keys)
    # the long prompt keeps both CLIP chunks (77 + 77 tokens): no cut to one chunk
    assert cached_token_lengths(server) == {77, 154}

    log_before = len(server.log_text())
    base, tuned = sd3_image(server, out["lora"], strength=0.0), sd3_image(server, out["lora"])
    assert "lora key not loaded" not in server.log_text()[log_before:]
    assert np.array_equal(base, base_before), "training left the base model changed"
    diff = np.abs(base - tuned).mean()
    assert diff > 0.5, f"the LoRA did not change the SD3 image (mean abs diff {diff:.3f})"

    # the node's LORA_MODEL output through ComfyUI's LoraModelLoader: the same image as stock Load LoRA
    graph["lm"] = {"class_type": "LoraModelLoader", "inputs": {"model": ["ckpt", 0], "lora": ["train", 1], "strength_model": 1.0}}
    graph.update(sample_nodes(["lm", 0], ["ckpt", 1], ["ckpt", 2], 7, "sd3_lora_model", cfg=2.0))
    assert np.abs(image(server, graph, "save") - tuned).mean() < 0.5

    # the same file loads into diffusers' SD3 transformer: every key is a LoRA layer of it, none left over
    report = diffusers_load(server.base / "models" / "loras" / out["lora"], "sd3")
    assert report["layers"] == sum(k.endswith("lora_A.weight") for k in keys) and report["problems"] == []


def diffusers_load(path: Path, family: str) -> dict:
    """Load a LoRA file into a diffusers transformer shaped like the tiny test model (ComfyUI's Python has diffusers)."""
    configs = {"sd3": ("SD3Transformer2DModel", "StableDiffusion3Pipeline",
                       dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                            num_attention_heads=2, joint_attention_dim=4096, caption_projection_dim=128,
                            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=32, dual_attention_layers=[0],
                            qk_norm="rms_norm"))}
    model, pipeline, config = configs[family]
    code = f"""
import json, sys, diffusers
sys.path.insert(0, {str(HERE)!r})
from comfy_server import caught_logs
with caught_logs("diffusers") as messages:
    model = diffusers.{model}(**{config!r})
    state = diffusers.{pipeline}.lora_state_dict({str(path)!r})
    state = state[0] if isinstance(state, tuple) else state
    model.load_lora_adapter(state, prefix="transformer", adapter_name="prefalign")
layers = [n for n, m in model.named_modules() if "prefalign" in getattr(m, "lora_A", {{}})]
print(json.dumps({{"layers": len(layers), "problems": [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()]}}))
"""
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sd3_cancel_keeps_a_lora_and_resume_continues(server):
    add_pairs(server, "sd3_cancel", ["a blue circle"])
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD3}},
             **train_node(["ckpt", 0], ["ckpt", 1], ["ckpt", 2], "sd3_cancel", steps=500, batch_size=1)}
    pid = server.queue(graph)
    t = server.interrupt_at_step(pid, step=2)
    entry = server.wait(pid, timeout=600)
    t.join()
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    saved = sorted((server.base / "models" / "loras" / "prefalign").glob("sd3_cancel_dpo_*steps_*.safetensors"))
    assert len(saved) == 1 and "_500steps_" not in saved[0].name
    done = int(re.search(r"_(\d+)steps_", saved[0].name).group(1))
    graph["train"]["inputs"].update(steps=done + 2, resume=True)
    out = server.run(graph, timeout=600)["outputs"]["train"]["prefalign_train"][0]
    assert out["steps"] == done + 2 and not out["stopped"]
    keys, meta = lora_file(server, out["lora"])
    assert meta["prefalign.steps"] == str(done + 2) and meta["prefalign.architecture"] == "sd3"
    run = server.get("/prefalign/train/status")["runs"]["train"]
    assert [p[0] for p in run["loss"]] == list(range(1, done + 3))


def flux_graph(strength: float | None, lora: str | None = None, seed: int = 3) -> dict:
    g = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX, "weight_dtype": "fp8_e4m3fn"}},
         "te": {"class_type": "StandInFluxTextEncoder", "inputs": {"t5_min_length": 1}},
         "vae": {"class_type": "VAELoader", "inputs": {"vae_name": FLUX_VAE}}}
    model = ["unet", 0]
    if lora:
        g["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora, "strength_model": strength}}
        model = ["lora", 0]
    g.update(sample_nodes(model, ["te", 0], ["vae", 0], seed, f"flux_{lora is not None}_{strength}", cfg=1.0, flux=True))
    return g


def test_flux_from_load_diffusion_model_with_fp8_weights(server):
    """Flux through stock loaders (Load Diffusion Model in fp8, Load VAE; a stand-in text encoder, see the module
    docstring): the node trains it with checkpointed blocks, the file is Flux's diffusers names and stock
    LoraLoaderModelOnly applies every key; the image changes with the LoRA and not at strength 0."""
    import numpy as np

    add_pairs(server, "flux_pairs", ["a red square", "a tall red square on a white table"])
    base_before = image(server, flux_graph(None), "save")
    graph = flux_graph(None)
    graph.update(train_node(["unet", 0], ["te", 0], ["vae", 0], "flux_pairs", steps=2, batch_size=1,
                            gradient_checkpointing=True))
    out, keys, meta = trained(server, graph, "flux", 2, "64 px, one double + one single 3072-wide block in fp8")
    assert keys and all(k.startswith(("transformer.transformer_blocks.0.", "transformer.single_transformer_blocks.0."))
                        for k in keys)
    assert any(".proj_mlp." in k for k in keys) and any(".attn.add_q_proj." in k for k in keys)
    log_before = len(server.log_text())
    base = image(server, flux_graph(0.0, out["lora"]), "save")
    tuned = image(server, flux_graph(1.0, out["lora"]), "save")
    assert "lora key not loaded" not in server.log_text()[log_before:]
    assert np.array_equal(base, base_before), "training left the base model changed"
    diff = np.abs(base - tuned).mean()
    assert diff > 0.5, f"the LoRA did not change the Flux image (mean abs diff {diff:.3f})"


def test_every_family_trains_and_loads_with_comfyuis_key_map(tmp_path):
    """ComfyUI's own model class of every family (tiny, random, built under inference mode and sampled once as a
    graph would), stand-in encoders of the family's output shapes: the preset finds layers, conditioning reaches the
    model at the prompt's length with the family's extras, one training step's gradient is finite (and the same with
    checkpointed blocks), the adapter switched off is the base model, and the file maps through ComfyUI's key map with
    every key loaded and the patched weights equal to the trained update. SD3 and Flux files load in diffusers too;
    for Flux and Chroma (in-place model code) the gradient matches a finite difference in float64."""
    out = tmp_path / "families.json"
    run = subprocess.run([PYTHON, str(HERE / "family_probe.py"), COMFYUI_DIR, str(ROOT), str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"sd3", "flux", "chroma", "qwen_image", "hidream", "lumina2", "wan"}
    for name, r in results.items():
        assert "error" not in r, (name, r.get("traceback"))
        assert r["architecture"] == name and r["prediction_type"] == "flow"
        assert r["targets"] >= 10, name
        assert r["cond_tokens"] == [4, 18]  # as many tokens as each prompt has words (+ end), never cut
        assert {c["cross_attn"][1] for c in r["received"]} == {4, 18}, name
        assert r["grad_finite"] and r["grad_nonzero"] >= r["targets"], name
        assert r["grad_diff_checkpointed"] < 1e-6, name
        assert r["reference_is_base"], name
        assert r["unloaded"] == [] and r["patched_modules"] == r["targets"], name
        assert r["max_patch_diff"] < 1e-5, name
        assert r["key_prefixes"] == (["transformer"] if name in ("sd3", "flux") else ["lora"]), name
    for name in ("sd3", "flux"):
        d = results[name]["diffusers"]
        assert d["problems"] == [] and d["layers"] > results[name]["targets"] and d["max_diff"] < 1e-6
    for name in ("flux", "chroma"):  # ComfyUI's in-place code: autograd alone refuses, the snapshots are exact
        assert "inplace" in results[name]["grad_diff_snapshots_toggled"]
        slope = results[name]["slope"]
        assert abs(slope["snapshots"] - slope["numeric"]) < 1e-3 * abs(slope["numeric"])
        assert abs(slope["checkpointed"] - slope["snapshots"]) < 1e-9 * abs(slope["numeric"])
    assert results["hidream"]["received"][0]["conditioning_llama3"][2] == 4
    assert results["lumina2"]["received"][0]["attention_mask"] == [1, 4]
    assert results["wan"]["received"][0]["noise"] == [1, 16, 1, 4, 4]
