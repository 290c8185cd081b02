"""A1111/ComfyUI-style single-file checkpoints: written from the tiny pipelines, loaded offline with model_config."""
from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import tiny_config
from trainer.loop import train
from trainer.models.loading import load_components
from trainer.models.single_file import detect_architecture, save_single_file
from trainer.models.tiny import tiny_model_path
from trainer.run import make_backend

KINDS = ("tiny-sd", "tiny-sdxl")
ARCH = {"tiny-sd": "sd15", "tiny-sdxl": "sdxl"}


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """Each tiny pipeline written as one original-layout .safetensors."""
    folder = tmp_path_factory.mktemp("single-files")
    return {kind: save_single_file(tiny_model_path(kind), folder / f"{kind}.safetensors") for kind in KINDS}


def reference_modules(kind: str):
    """The pipeline folder's own modules, loaded directly with diffusers/transformers."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = tiny_model_path(kind)
    encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")]
    if kind == "tiny-sdxl":
        encoders.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"))
    return dict(unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"), text_encoders=encoders,
                scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"))


def assert_same_weights(got, want, what):
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b))[:5])
    for key in a:
        assert a[key].dtype == torch.float32, (what, key)
        assert torch.equal(a[key], b[key]), (what, key)


def close(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def unet_prediction(unet, sdxl: bool):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if sdxl:
        pooled = torch.randn(2, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim, generator=g)
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * 2).float()}
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), context, **extra).sample


@pytest.mark.parametrize("kind", KINDS)
def test_file_has_the_original_layout_and_its_architecture_is_detected(single_files, kind):
    with safe_open(str(single_files[kind]), "pt") as f:
        keys = set(f.keys())
    prefixes = {"model.diffusion_model.", "first_stage_model."} | (
        {"cond_stage_model.transformer.text_model."} if kind == "tiny-sd"
        else {"conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."})
    assert all(any(k.startswith(p) for p in prefixes) for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    if kind == "tiny-sdxl":
        assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"} <= keys
    assert detect_architecture(keys) == ARCH[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_single_file_loads_offline_with_the_pipeline_weights(single_files, kind):
    parts = load_components(str(single_files[kind]), model_config=str(tiny_model_path(kind)))
    ref = reference_modules(kind)
    assert parts.architecture == ARCH[kind]
    assert_same_weights(parts.denoiser, ref["unet"], "unet")
    assert_same_weights(parts.vae, ref["vae"], "vae")
    assert len(parts.text_encoders) == len(ref["text_encoders"]) == len(parts.tokenizers)
    for i, (got, want) in enumerate(zip(parts.text_encoders, ref["text_encoders"])):
        assert type(got) is type(want)
        assert_same_weights(got, want, f"text encoder {i}")
    # equal weights; outputs agree to float rounding (kernels may differ with the tensors' memory alignment)
    close(unet_prediction(parts.denoiser, kind == "tiny-sdxl"), unet_prediction(ref["unet"], kind == "tiny-sdxl"))
    for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type"):
        assert parts.scheduler.config[key] == ref["scheduler"].config[key], key
    assert parts.vae.config.scaling_factor == ref["vae"].config.scaling_factor


@pytest.mark.parametrize("kind", KINDS)
def test_make_backend_loads_a_single_file_from_the_config(tmp_path, single_files, kind):
    config = tiny_config(tmp_path, model=str(single_files[kind]), model_config=str(tiny_model_path(kind)))
    backend = make_backend(config, torch.device("cpu"))
    folder_backend = make_backend(tiny_config(tmp_path, model=kind), torch.device("cpu"))
    assert backend.sdxl == (kind == "tiny-sdxl")
    got, want = backend.encode_prompts(["a red square"]), folder_backend.encode_prompts(["a red square"])
    close(got["prompt_embeds"], want["prompt_embeds"])
    close(got["pooled"], want["pooled"])


def test_training_on_a_single_file(tmp_path, single_files, pairs):
    config = tiny_config(tmp_path, model=str(single_files["tiny-sd"]), model_config=str(tiny_model_path("tiny-sd")),
                         max_steps=2, method_args={"beta": 1000.0})
    torch.manual_seed(config.seed)
    result = train(config, make_backend(config, torch.device("cpu")), pairs[:4])
    assert result.steps == 2 and (tmp_path / "out" / "lora.safetensors").exists()
    assert math.isfinite(result.metrics["loss"]) and result.metrics["loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert 'model_config = "' in (tmp_path / "out" / "config.toml").read_text()  # a resumed run finds the config again


def test_half_precision_file_loads_as_fp32(tmp_path):
    path = save_single_file(tiny_model_path("tiny-sd"), tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    parts = load_components(str(path), model_config=str(tiny_model_path("tiny-sd")))
    want = reference_modules("tiny-sd")["unet"].state_dict()
    for key, value in parts.denoiser.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, want[key].half().float()), key


def test_missing_wrong_and_pickled_files_are_refused_by_name(tmp_path, single_files):
    sd_config = str(tiny_model_path("tiny-sd"))
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError, match=f"{re.escape(str(missing))}.*does not exist"):
        load_components(str(missing), model_config=sd_config)
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickled)
    with pytest.raises(ValueError, match=f"{re.escape(str(pickled))}.*only .safetensors.*pickle"):
        load_components(str(pickled), model_config=sd_config)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=f"{re.escape(str(garbage))} is not a readable .safetensors"):
        load_components(str(garbage), model_config=sd_config)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ValueError, match=f"{re.escape(str(lora))} has no UNet weights"):
        load_components(str(lora), model_config=sd_config)
    with pytest.raises(ValueError, match=f"{re.escape(str(single_files['tiny-sdxl']))} is SDXL but .* is an SD1.5 pipeline"):
        load_components(str(single_files["tiny-sdxl"]), model_config=sd_config)
    with pytest.raises(ValueError, match="model_config.*not a diffusers pipeline"):
        load_components(str(single_files["tiny-sd"]), model_config=str(tmp_path))


def test_without_model_config_offline_the_error_says_what_to_pass(single_files):
    """No config: diffusers would fetch the standard one from the hub; offline that fails with a pointer."""
    with pytest.raises(ValueError, match=f"(?s){re.escape(str(single_files['tiny-sd']))}.*--model_config"):
        load_components(str(single_files["tiny-sd"]))


def test_full_size_layouts_are_what_diffusers_expects():
    """Real SD1.5/SDXL sizes (on the meta device, no weights): diffusers detects the type from our keys
    and its own LDM -> diffusers converters give back exactly the diffusers names and shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint, infer_diffusers_model_type)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.models.single_file import ldm_state_dict

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
        sdxl = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                              num_hidden_layers=12, max_position_embeddings=77))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                            num_hidden_layers=32, max_position_embeddings=77, projection_dim=1280))

    def same_layout(got, model):
        want = model.state_dict()
        assert got.keys() == {k for k in want if not k.endswith("position_ids")}
        assert all(got[k].shape == want[k].shape for k in got)

    for unet, encoders, kind in ((sd15, [clip_l], "v1"), (sdxl, [clip_l, clip_g], "xl_base")):
        state = ldm_state_dict(unet, vae, encoders)
        assert infer_diffusers_model_type(state) == kind
        assert detect_architecture(state) == ("sd15" if kind == "v1" else "sdxl")
        same_layout(convert_ldm_unet_checkpoint(state, unet.config), unet)
        same_layout(convert_ldm_vae_checkpoint(state, vae.config), vae)
    same_layout(convert_open_clip_checkpoint(clip_g, state, prefix="conditioner.embedders.1.model."), clip_g)
    assert len(state) == 2513 and state["model.diffusion_model.output_blocks.2.2.conv.weight"].shape == (1280, 1280, 3, 3)
