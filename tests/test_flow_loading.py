"""Which family a model is, single-file SD3/Flux transformers, and the options that only some families take
(drop_t5, quantize): each refused before anything loads, with one line naming the option."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_config
from trainer.cli import main
from trainer.models.flow_loading import load_flow_components, model_family, quantization_config
from trainer.models.tiny import tiny_model_path
from trainer.run import make_backend


def transformer_state(kind: str) -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if kind == "tiny-flux" else SD3Transformer2DModel
    return {k: v.clone() for k, v in cls.from_pretrained(str(tiny_model_path(kind)), subfolder="transformer").state_dict().items()}


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """Transformer-only single files in diffusers names. Original-layout (BFL/SAI) files go through diffusers'
    converters, which assume the real widths (Flux.1: 3072), so tiny models cannot exercise them."""
    folder = tmp_path_factory.mktemp("flow-single")
    files = {kind: folder / f"{kind}-transformer.safetensors" for kind in ("tiny-flux", "tiny-sd3")}
    for kind, path in files.items():
        save_file(transformer_state(kind), str(path))
    return files


def test_family_from_pipeline_class_and_from_tensor_names(single_files, tmp_path):
    assert [model_family(m) for m in ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")] == ["unet", "unet", "sd3", "flux"]
    assert model_family(str(single_files["tiny-flux"])) == "flux"
    assert model_family(str(single_files["tiny-sd3"])) == "sd3"
    originals = {"sd3": "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",  # SAI names, ComfyUI prefix
                 "flux": "double_blocks.0.img_attn.qkv.weight"}  # BFL's flux1-dev.safetensors names
    for family, key in originals.items():
        path = tmp_path / f"{family}-original.safetensors"
        save_file({key: torch.zeros(2, 2)}, str(path))
        assert model_family(str(path)) == family
    assert model_family(str(tmp_path / "missing.safetensors")) == "unet"  # the SD loader reports it


@pytest.mark.parametrize("kind", ["tiny-flux", "tiny-sd3"])
def test_single_file_transformer_loads_with_model_config(single_files, kind):
    parts = load_flow_components(str(single_files[kind]), model_family(kind), model_config=str(tiny_model_path(kind)))
    want = transformer_state(kind)
    got = parts.denoiser.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert parts.architecture == model_family(kind) and len(parts.text_encoders) == (3 if kind == "tiny-sd3" else 2)


def test_single_file_trains_from_the_command_line(single_files, tmp_path):
    code = main(["train", "--model", str(single_files["tiny-flux"]), "--model-config", str(tiny_model_path("tiny-flux")),
                 "--data", "tiny", "--resolution", "32", "--max-steps", "1", "--batch-size", "1", "--rank", "2",
                 "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0 and (tmp_path / "out" / "lora.safetensors").exists()


def run_cli(tmp_path, capsys, *args: str) -> tuple[int, str]:
    code = main(["train", "--data", "tiny", "--resolution", "32", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "out"), *args])
    return code, capsys.readouterr().err


def test_single_file_without_model_config_names_the_option(single_files, tmp_path, capsys):
    code, err = run_cli(tmp_path, capsys, "--model", str(single_files["tiny-sd3"]))
    assert code == 2 and "config key 'model_config'" in err and "Traceback" not in err
    code, err = run_cli(tmp_path, capsys, "--model", str(single_files["tiny-sd3"]), "--model-config",
                        str(tiny_model_path("tiny-flux")))
    assert code == 2 and "is a sd3 transformer but" in err
    assert not (tmp_path / "out").exists()


def test_drop_t5_is_refused_for_flux_before_loading(tmp_path, capsys):
    code, err = run_cli(tmp_path, capsys, "--model", "tiny-flux", "--drop-t5")
    assert code == 2 and err.strip() == "error: --drop-t5: only SD3/SD3.5 can run without T5; this model is flux"
    assert not (tmp_path / "out").exists()


def test_quantize_refusals_name_the_option(tmp_path, capsys, monkeypatch):
    code, err = run_cli(tmp_path, capsys, "--model", "tiny-sd", "--quantize", "nf4")
    assert code == 2 and "--quantize: " in err and "SD3/Flux" in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    code, err = run_cli(tmp_path, capsys, "--model", "tiny-flux", "--quantize", "nf4")
    assert code == 2 and "pip install 'prefalign[bnb]'" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    code, err = run_cli(tmp_path, capsys, "--model", "tiny-flux", "--quantize", "int8")
    assert code == 2 and "runs on a CUDA GPU; this run is on cpu" in err
    code, err = run_cli(tmp_path, capsys, "--model", "tiny-flux", "--quantize", "fp4")
    assert code == 2 and "'fp4' is not one of no, nf4, int8" in err
    assert not (tmp_path / "out").exists()


def test_quantization_config_is_qlora_nf4():
    pytest.importorskip("bitsandbytes")  # diffusers' BitsAndBytesConfig reads the installed version
    nf4 = quantization_config("nf4", torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("int8", torch.bfloat16).load_in_8bit


def test_target_modules_default_per_family_and_override(tmp_path):
    flux = make_backend(tiny_config(tmp_path, model="tiny-flux"), torch.device("cpu"))
    assert "proj_mlp" in flux.lora.target_modules
    sd = make_backend(tiny_config(tmp_path, model="tiny-sd"), torch.device("cpu"))
    assert sd.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    only_q = make_backend(tiny_config(tmp_path, model="tiny-sd3", target_modules=["to_q"]), torch.device("cpu"))
    assert {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in only_q.export_lora()} == {"to_q"}


def test_cli_records_the_flow_beta_and_resumes_with_it(tmp_path, capsys):
    """config.toml holds the beta the run used (1000 on Flux); `--resume latest` with the beta left unset
    is the same run (the folder check does not read the unset beta as a change)."""
    import tomllib

    common = ("--model", "tiny-flux", "--batch-size", "1", "--rank", "2", "--cache-dir", str(tmp_path / "cache"))
    code, err = run_cli(tmp_path, capsys, *common)
    assert code == 0, err
    assert tomllib.loads((tmp_path / "out" / "config.toml").read_text())["method_args"]["beta"] == 1000.0
    code, err = run_cli(tmp_path, capsys, *common, "--resume", "latest", "--max-steps", "2")
    assert code == 0, err
    code, err = run_cli(tmp_path, capsys, *common, "--resume", "latest", "--max-steps", "3", "--method-args", "beta=50")
    assert code == 2 and "method_args.beta: 1000.0 -> 50.0" in err
