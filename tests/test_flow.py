"""SD3/SD3.5 and Flux.1 in the headless trainer (tiny models, CPU): conditioning as the pipelines build it,
Flow-DPO from ln 2, learning, exact resume, every method trained or refused before any encoding."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import fixed_batch_losses, make_pairs, make_unpaired, tiny_config
from trainer.loop import train
from trainer.methods import method_class, method_names
from trainer.run import make_backend

FAMILIES = {"tiny-sd3": "sd3", "tiny-flux": "flux"}


def backend_for(tmp_path, model, **overrides):
    return make_backend(tiny_config(tmp_path, model=model, **overrides), torch.device("cpu"))


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_family_is_detected_with_its_forward_process(tmp_path, model):
    backend = backend_for(tmp_path, model)
    assert backend.model_info()["architecture"] == FAMILIES[model]
    assert backend.prediction_type == "flow" and backend.alphas_cumprod is None
    want = {"tiny-sd3": "logit_normal", "tiny-flux": "uniform"}[model]  # diffusers' training scripts' defaults
    assert backend.timestep_sampling.scheme == want
    assert backend_for(tmp_path, model, timestep_sampling="mode").timestep_sampling.scheme == "mode"


def test_sd3_conditioning_is_the_pipelines(tmp_path):
    """Joint sequence and pooled vector equal StableDiffusion3Pipeline.encode_prompt (CLIP-L+G padded, then T5)."""
    from diffusers import StableDiffusion3Pipeline

    from trainer.models.tiny import tiny_model_path

    backend = backend_for(tmp_path, "tiny-sd3")
    cond = backend.encode_prompts(["a red square", "blue"])
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_model_path("tiny-sd3")))
    embeds, _, pooled, _ = pipe.encode_prompt("a red square", "a red square", "a red square", do_classifier_free_guidance=False,
                                              max_sequence_length=backend.t5_length)
    torch.testing.assert_close(backend.joint_embeds(cond)[:1], embeds)
    torch.testing.assert_close(cond["pooled"][:1], pooled)


def test_sd3_without_t5_uses_zeros_and_its_own_cache_entries(tmp_path):
    full = backend_for(tmp_path, "tiny-sd3")
    lean = backend_for(tmp_path, "tiny-sd3", drop_t5=True)
    assert len(lean.parts.text_encoders) == 2 and lean.cache_tag == "t5=off" and full.cache_tag is None
    cond = lean.encode_prompts(["a red square"])
    assert "t5_embeds" not in cond
    joint = lean.joint_embeds(cond)
    clip_tokens = cond["clip_embeds"].shape[1]
    assert joint.shape[1] == clip_tokens + lean.t5_length and joint[:, clip_tokens:].abs().max() == 0
    torch.testing.assert_close(joint[:, :clip_tokens], full.joint_embeds(full.encode_prompts(["a red square"]))[:, :clip_tokens])


def test_flux_packing_and_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    from trainer.models.flux_backend import image_ids, pack_latents, unpack_latents

    x = torch.randn(2, 16, 8, 12)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 12))
    torch.testing.assert_close(unpack_latents(packed, 8, 12), x)
    torch.testing.assert_close(image_ids(8, 12), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_latents_use_the_vae_shift_and_scale(tmp_path, model):
    backend = backend_for(tmp_path, model)
    vae = backend.parts.vae
    assert vae.config.shift_factor not in (None, 0.0)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(backend.encode_images(pixels), (z - vae.config.shift_factor) * vae.config.scaling_factor)


def spy_forward(backend) -> dict:
    seen = {}
    forward = backend._forward

    def spy(**kwargs):
        seen.update(kwargs)
        return forward(**kwargs)

    backend._forward = spy
    return seen


def schnell_folder(tmp_path):
    """tiny-flux without a guidance embedding, as FLUX.1-schnell."""
    import shutil

    from trainer.models.tiny import tiny_model_path

    folder = tmp_path / "tiny-schnell"
    shutil.copytree(tiny_model_path("tiny-flux"), folder)
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), guidance_embeds=False)))
    return folder


def test_flux_dev_gets_the_training_guidance_and_schnell_none(tmp_path):
    t = torch.tensor([500])
    dev = backend_for(tmp_path, "tiny-flux", guidance=5.0)
    seen = spy_forward(dev)
    dev.predict(torch.randn(1, 16, 16, 16), t, dev.encode_prompts(["a"]))
    assert seen["guidance"].tolist() == [5.0]
    assert seen["timestep"].item() == pytest.approx(dev.schedule.sigma(t).item())  # Flux scales by 1000 itself
    schnell = make_backend(tiny_config(tmp_path, model=str(schnell_folder(tmp_path))), torch.device("cpu"))
    assert schnell.model_info()["architecture"] == "flux"
    seen = spy_forward(schnell)
    schnell.predict(torch.randn(1, 16, 16, 16), t, schnell.encode_prompts(["a"]))
    assert seen["guidance"] is None


def test_sd3_timestep_is_sigma_times_1000(tmp_path):
    t = torch.tensor([500])
    backend = backend_for(tmp_path, "tiny-sd3")
    seen = spy_forward(backend)
    backend.predict(torch.randn(1, 16, 16, 16), t, backend.encode_prompts(["a"]))
    assert "guidance" not in seen
    assert seen["timestep"].item() == pytest.approx(1000 * backend.schedule.sigma(t).item(), rel=1e-6)


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_flow_dpo_starts_at_ln2_and_falls_on_a_fixed_batch(tmp_path, model):
    backend = backend_for(tmp_path, model)
    losses = fixed_batch_losses(backend, "dpo", make_pairs(2), steps=12, lr=3e-3)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # zero-initialised lora_B: policy == reference
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_resume_continues_exactly(tmp_path, model):
    """4 steps straight == 2 steps, then --resume latest for 2 more: identical adapter tensors."""
    data = make_pairs(4)
    options = dict(model=model, max_steps=4, checkpoint_every=2)
    straight = train(tiny_config(tmp_path / "a", **options), backend_for(tmp_path / "a", model), data)
    half = tiny_config(tmp_path / "b", **dict(options, max_steps=2))
    train(half, backend_for(tmp_path / "b", model), data)
    resumed_config = tiny_config(tmp_path / "b", **options, resume="latest")
    resumed = train(resumed_config, make_backend(resumed_config, torch.device("cpu")), data)
    a, b = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    assert set(a) == set(b) and any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_metadata_names_family_prediction_and_flow_beta(tmp_path, model):
    result = train(tiny_config(tmp_path, model=model, max_steps=1), backend_for(tmp_path, model), make_pairs(2))
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["prefalign.architecture"] == FAMILIES[model] and meta["prefalign.prediction_type"] == "flow"
    assert meta["ss_base_model_version"] == {"sd3": "sd3", "flux": "flux1"}[FAMILIES[model]]  # kohya's names
    assert meta["modelspec.architecture"] == {"sd3": "stable-diffusion-3/lora", "flux": "flux-1/lora"}[FAMILIES[model]]
    args = json.loads(meta["prefalign.method_args"])
    assert args["beta"] == 1000.0 and args["loss_type"] == "sigmoid"  # the flow default, recorded as used


def method_options(name: str) -> dict:
    return {"dense": {"num_steps": 10}}.get(name, {})


@pytest.mark.parametrize("model", sorted(FAMILIES))
@pytest.mark.parametrize("name", method_names())
def test_every_method_trains_two_steps_or_refuses_before_encoding(tmp_path, model, name):
    cls = method_class(name)
    data = make_unpaired(4) if not cls.paired else make_pairs(2)
    config = tiny_config(tmp_path, model=model, method=name, max_steps=2, method_args=method_options(name))
    backend = make_backend(config, torch.device("cpu"))
    if "flow" not in cls.prediction_types:
        backend.encode_prompts = lambda prompts: pytest.fail("encoded before refusing")
        with pytest.raises(ValueError, match=f"method '{name}' does not train {FAMILIES[model]} models .flow "
                                             "prediction.: .*(epsilon|DDPM)"):
            train(config, backend, data)
        return
    result = train(config, backend, data)
    assert result.steps == 2 and math.isfinite(result.metrics["loss"])
    lora = load_file(str(result.lora_path))
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_ncp_space_is_refused_on_flow_models(tmp_path, model):
    config = tiny_config(tmp_path, model=model, method="dpo", method_args={"space": "ncp"}, max_steps=1)
    backend = make_backend(config, torch.device("cpu"))
    backend.encode_prompts = lambda prompts: pytest.fail("encoded before refusing")
    with pytest.raises(ValueError, match="space = 'ncp'.*discrete noise schedule"):
        train(config, backend, make_pairs(2))


def test_gradient_checkpointing_on_transformer_blocks_gives_the_same_losses(tmp_path):
    plain = fixed_batch_losses(backend_for(tmp_path, "tiny-flux"), "dpo", make_pairs(2), steps=3)
    checkpointed_backend = backend_for(tmp_path, "tiny-flux", gradient_checkpointing=True)
    assert checkpointed_backend.model.gradient_checkpointing
    assert fixed_batch_losses(checkpointed_backend, "dpo", make_pairs(2), steps=3) == pytest.approx(plain, abs=1e-5)
