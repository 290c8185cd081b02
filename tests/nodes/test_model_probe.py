"""Which methods fit the model a graph connects, before it runs: the file check, the header reader, the answer per
family and sampling, and the route (the real ComfyUI detection: tests/comfyui/test_comfyui_flow.py)."""
from __future__ import annotations

import asyncio
import sys

import pytest
import torch
from safetensors.torch import save_file

import prefalign_pack
import prefalign_pack.nodes.routes  # noqa: E402

import prefalign_pack.nodes.model_probe as probe_module  # noqa: E402
ff = sys.modules["prefalign_fake_families"]  # loaded by conftest.py


@pytest.fixture
def models(comfy_folders, monkeypatch):
    """A checkpoints folder the fake folder_paths lists, with one real safetensors file."""
    root = comfy_folders["input"].parent / "checkpoints"
    root.mkdir()
    save_file({"big": torch.zeros(64, 64), "v_pred": torch.tensor([1.0])}, str(root / "model.safetensors"))
    (root / "notes.ckpt").write_bytes(b"x")
    fp = sys.modules["folder_paths"]
    monkeypatch.setattr(fp, "get_filename_list", lambda kind: ["model.safetensors", "notes.ckpt"] if kind == "checkpoints" else [])
    monkeypatch.setattr(fp, "get_full_path", lambda kind, name: str(root / name))
    return root


def test_only_a_listed_safetensors_file_of_a_loader_folder_is_read(models):
    assert probe_module.model_file("checkpoints", "model.safetensors") == models / "model.safetensors"
    for folder, name, problem in [("loras", "model.safetensors", "folder must be one of"),
                                  ("checkpoints", "../../secret.safetensors", "no model"),
                                  ("checkpoints", str(models / "model.safetensors"), "no model"),
                                  ("checkpoints", "notes.ckpt", "only .safetensors")]:
        with pytest.raises(probe_module.ProbeError, match=problem):
            probe_module.model_file(folder, name)


def test_the_header_gives_shapes_without_reading_weights(models):
    sd = probe_module.header_state_dict(models / "model.safetensors")
    assert sd["big"].device.type == "meta" and sd["big"].shape == (64, 64)
    assert sd["v_pred"].device.type == "cpu" and sd["v_pred"].item() == 1.0  # flags ComfyUI's detection reads


@pytest.mark.parametrize("family, sampling, refused", [
    ("flux", "", {"mapo", "dspo"}),
    ("chroma", "", {"mapo", "dspo", "rpo"}),  # no pooled text vector for RPO's prompt distances
    ("sd3", "epsilon", set()),  # a ModelSamplingDiscrete patch in the graph: every method
])
def test_each_method_trains_the_connected_model_or_says_why(models, monkeypatch, family, sampling, refused):
    patcher, _, _ = ff.make(family)
    monkeypatch.setattr(probe_module, "detect", lambda path: patcher.model)
    answer = probe_module.probe("checkpoints", "model.safetensors", sampling)
    assert answer["prediction_type"] == (sampling or "flow") and answer["family"] == family
    assert {m for m, why in answer["methods"].items() if why} == refused
    assert set(answer["methods"]) == set(prefalign_pack.trainer.methods.method_names())
    if "rpo" in refused:
        assert "pooled text vectors" in answer["methods"]["rpo"]
    if "mapo" in refused:
        assert answer["methods"]["mapo"].startswith(f"method 'mapo' does not train {family} models (flow prediction)")


def test_route_answers_or_names_the_problem(models, monkeypatch):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    patcher, _, _ = ff.make("flux")
    monkeypatch.setattr(probe_module, "detect", lambda path: patcher.model)

    async def main():
        app = web.Application()
        app.add_routes(prefalign_pack.nodes.routes.make_routes(lambda: models))
        async with TestClient(TestServer(app)) as client:
            ok = await client.get("/prefalign/model_methods", params={"folder": "checkpoints", "name": "model.safetensors"})
            bad = await client.get("/prefalign/model_methods", params={"folder": "checkpoints", "name": "../x.safetensors"})
            odd = await client.get("/prefalign/model_methods",
                                   params={"folder": "checkpoints", "name": "model.safetensors", "sampling": "edm"})
            return ok.status, await ok.json(), bad.status, await bad.json(), odd.status

    status, answer, bad_status, bad, odd_status = asyncio.run(main())
    assert status == 200 and answer["label"] == "Flux.1 dev/schnell" and answer["methods"]["dpo"] is None
    assert bad_status == 400 and "no model" in bad["error"] and odd_status == 400
