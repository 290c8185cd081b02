"""Diffusion-NPO: the loss (DPO toward the rejected images), training, and sampling with the LoRA in the
negative branch of classifier-free guidance only (trainer/toy/sampling.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from conftest import fixed_batch_losses, make_pairs, tiny_config
from trainer.export import read_lora
from trainer.loop import train
from trainer.methods import StepOutputs, build_method, method_class
from trainer.run import make_backend
from trainer.toy import load_toy_pipeline, sample_images

# methods.md, 3 pairs
W, L, RW, RL = [0.100, 0.200, 0.050], [0.120, 0.180, 0.050], [0.110, 0.190, 0.060], [0.110, 0.190, 0.040]


def pairs(w, l, rw, rl) -> StepOutputs:
    n = len(w)
    return StepOutputs(err=torch.tensor(w + l, dtype=torch.float64), timesteps=torch.zeros(2 * n, dtype=torch.long),
                       labels=torch.cat([torch.ones(n), torch.zeros(n)]).double(),
                       ref_err=torch.tensor(rw + rl, dtype=torch.float64))


def test_npo_is_dpo_toward_the_rejected_images():
    """G-U-N/Diffusion-NPO train_sd15.py: Diffusion-DPO with the pair order reversed; beta 500 without the 1/2."""
    beta_official = 500.0  # run_sd15.sh, loss = -logsigmoid(beta_dpo * (ref_diff - model_diff)), diff = w - l
    w, l, rw, rl = (np.array(v) for v in (W, L, RW, RL))
    model_diff, ref_diff = l - w, rl - rw  # the rejected image plays the winner
    expected = np.mean(np.logaddexp(0.0, -beta_official * (ref_diff - model_diff)))
    loss, metrics = build_method("npo").loss(pairs(W, L, RW, RL))
    assert method_class("npo").Config().beta == 2 * beta_official  # our convention multiplies by beta/2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    inside = beta_official * (ref_diff - model_diff)  # [-5, 5, -5]
    assert metrics["implicit_acc"].item() == pytest.approx(np.mean(inside > 0))
    assert metrics["err_w"].item() == pytest.approx(np.mean(l))  # "winner" = the image NPO trains toward
    dpo_loss, _ = build_method("dpo", {"beta": 1000.0}).loss(pairs(W, L, RW, RL))
    assert loss.item() != pytest.approx(dpo_loss.item())


def test_npo_options_and_flags():
    npo = build_method("npo", {"safeguard": True, "sft_weight": 0.5})
    assert npo.negative_branch and not method_class("dpo").negative_branch
    assert npo.needs == {"residuals"}
    with pytest.raises(ValueError, match="method_args.loss_type"):
        build_method("npo", {"loss_type": "square"})


def test_npo_trains_toward_the_rejected_images(tmp_path):
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    backend = make_backend(config, torch.device("cpu"))
    losses = fixed_batch_losses(backend, "npo", make_pairs(2), steps=15, options={"beta": 500.0})
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < 0.5 * losses[0]


def test_npo_run_writes_a_lora_marked_npo(tmp_path):
    config = tiny_config(tmp_path, method="npo", max_steps=3)
    torch.manual_seed(0)
    result = train(config, make_backend(config, torch.device("cpu")), make_pairs(4))
    _, meta = read_lora(result.lora_path)
    assert meta["prefalign.method"] == "npo"
    assert 0.0 <= result.metrics["implicit_acc"] <= 1.0 and math.isfinite(result.metrics["loss"])


# ---------------------------------------------------------------- sampling with the LoRA in the negative branch


PROMPTS, SEEDS = ["a red circle", "a blue square", "a yellow triangle"], [3, 4, 5]


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def kohya_lora(unet, scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            key = "lora_unet_" + name.replace(".", "_")
            lora[f"{key}.lora_down.weight"] = scale * torch.randn(4, module.in_features, generator=g)
            lora[f"{key}.lora_up.weight"] = scale * torch.randn(module.out_features, 4, generator=g)
            lora[f"{key}.alpha"] = torch.tensor(4.0)
    return lora


@pytest.fixture(scope="module")
def toy_lora() -> dict[str, torch.Tensor]:
    """A random kohya LoRA for the toy UNet's attention projections (what training writes)."""
    return kohya_lora(load_toy_pipeline().unet, 0.3)


def test_negative_branch_with_a_zero_lora_is_plain_sampling(toy_lora):
    zero = {k: torch.zeros_like(v) if "lora_up" in k else v for k, v in toy_lora.items()}
    plain = pixels(sample_images(None, PROMPTS, SEEDS, steps=6))
    assert np.array_equal(plain, pixels(sample_images(None, PROMPTS, SEEDS, steps=6, negative_lora=toy_lora,
                                                      negative_strength=0.0)))
    # the stock pipeline runs both branches as one batch, the negative-branch path as two: rounding only
    zero_lora = pixels(sample_images(None, PROMPTS, SEEDS, steps=6, negative_lora=zero))
    assert np.abs(plain - zero_lora).max() <= 1 and np.mean(plain != zero_lora) < 1e-3


def double_unet_sampling(lora, steps: int, scale: float):
    """The official NPO pipeline's loop, written out: a second UNet with the LoRA fused in predicts the
    unconditional branch, the plain UNet the conditional one (DDIM, eta 0)."""
    plain, negative = load_toy_pipeline(), load_toy_pipeline()
    negative.load_lora_weights(dict(lora))
    negative.fuse_lora()
    scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        cond, uncond = plain.encode_prompt(PROMPTS, "cpu", 1, True)
        x = plain.prepare_latents(len(PROMPTS), 8, 32, 32, cond.dtype, "cpu",
                                  [torch.Generator().manual_seed(s) for s in SEEDS])
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            eps_uncond = negative.unet(x_in, t, encoder_hidden_states=uncond).sample
            eps_cond = plain.unet(x_in, t, encoder_hidden_states=cond).sample
            x = scheduler.step(eps_uncond + scale * (eps_cond - eps_uncond), t, x, eta=0.0).prev_sample
        decoded = plain.vae.decode(x / plain.vae.config.scaling_factor).sample
    return plain.image_processor.postprocess(decoded, output_type="pil")


def test_negative_branch_matches_the_double_unet_formula(toy_lora):
    ours = pixels(sample_images(None, PROMPTS, SEEDS, steps=6, negative_lora=toy_lora))
    assert np.abs(ours - pixels(double_unet_sampling(toy_lora, 6, 3.0))).max() <= 1  # fused weights: rounding
    plain = pixels(sample_images(None, PROMPTS, SEEDS, steps=6))
    whole = pixels(sample_images(None, PROMPTS, SEEDS, steps=6, lora=toy_lora))
    assert np.abs(ours - plain).max() > 20 and np.abs(ours - whole).max() > 20
    # without guidance (scale 1) the pipeline runs no negative branch: the LoRA changes nothing
    no_cfg = sample_images(None, PROMPTS, SEEDS, steps=6, guidance_scale=1.0)
    assert np.array_equal(pixels(no_cfg), pixels(sample_images(None, PROMPTS, SEEDS, steps=6, guidance_scale=1.0,
                                                                negative_lora=toy_lora)))


def test_a_positive_lora_stays_on_both_branches(toy_lora):
    zero = {k: torch.zeros_like(v) if "lora_up" in k else v for k, v in toy_lora.items()}
    with_lora = pixels(sample_images(None, PROMPTS, SEEDS, steps=6, lora=toy_lora))
    both = pixels(sample_images(None, PROMPTS, SEEDS, steps=6, lora=toy_lora, negative_lora=zero))
    assert np.abs(with_lora - both).max() <= 1  # the branches run as two batches: rounding, not a change


def test_negative_branch_on_sdxl_splits_its_added_conditions():
    """SDXL's UNet also takes pooled text embeddings and time ids per row: they are split with the batch."""
    from trainer.generate import generate, load_pipeline

    pipe = load_pipeline("tiny-sdxl", device="cpu")
    lora = kohya_lora(pipe.unet, 0.3)
    zero = {k: torch.zeros_like(v) if "lora_up" in k else v for k, v in lora.items()}
    plain = pixels(generate(pipe, "a red square", [1, 2], 4, 5.0, size=32))
    assert np.abs(plain - pixels(generate(pipe, "a red square", [1, 2], 4, 5.0, size=32, negative_lora=zero))).max() <= 1
    assert np.abs(plain - pixels(generate(pipe, "a red square", [1, 2], 4, 5.0, size=32, negative_lora=lora))).max() > 5


def test_negative_branch_needs_guidance():
    from trainer.generate import negative_branch

    class NoGuidance:  # FluxPipeline, for one, has no classifier-free guidance to put the LoRA in
        pass

    with pytest.raises(ValueError, match="needs classifier-free guidance; NoGuidance has none"):
        with negative_branch(NoGuidance(), {}, 1.0):
            pass
