"""Every method through the real model stack: CLI runs, falling losses, reference skipping, gradients."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from conftest import fixed_batch_losses, make_pairs, tiny_config
from trainer.cli import main
from trainer.data.dataset import collate
from trainer.data.transforms import ImageTransform
from trainer.encoding import encode_collated
from trainer.methods import build_method, method_class, method_names
from trainer.run import make_backend
from trainer.step import compute_outputs, draw_noise

METHODS = method_names()
# options that make 20 small steps on an untrained tiny model show a clear fall (betas in the paper's units
# are tuned for real errors; the tiny model's errors are ~1 and near-identical between pairs)
FAST = {"dpo": {"beta": 500.0}, "dense": {"beta": 2000.0}, "cal-dpo": {"beta": 500.0}, "rpo": {"beta": 500.0},
        "cpo": {"beta": 250.0}, "kto": {"beta": 100.0}, "dspo": {"variant": "sd15"}}


@pytest.fixture(scope="module")
def sd_backend(tmp_path_factory):
    return make_backend(tiny_config(tmp_path_factory.mktemp("m")), torch.device("cpu"))


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_through_the_cli(tmp_path, method, model):
    out = tmp_path / "out"
    code = main(["train", "--model", model, "--data", "tiny", "--method", method, "--resolution", "32",
                 "--max-steps", "2", "--batch-size", "2", "--rank", "4", "--output-dir", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--checkpoint-every", "0"])
    assert code == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["prefalign.method"] == method
        assert f.metadata()["prefalign.steps"] == "2"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_lowers_its_loss_on_a_fixed_batch(tmp_path, method):
    backend = make_backend(tiny_config(tmp_path), torch.device("cpu"))
    losses = fixed_batch_losses(backend, method, make_pairs(2), steps=20, lr=1e-2, options=FAST.get(method))
    assert losses[-1] < losses[0] - 0.1 * abs(losses[0]), losses


def one_batch(backend, examples):
    transform = ImageTransform(32)
    return encode_collated(backend, collate([transform(e, False, None) for e in examples]))


@pytest.mark.parametrize("method", METHODS)
def test_reference_forward_only_when_needed_and_grads_only_on_lora(sd_backend, method):
    backend = sd_backend
    m = build_method(method, FAST.get(method))
    batch = one_batch(backend, make_pairs(2))
    calls = []
    handle = backend.model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        noise = draw_noise(m, batch.latents.shape, True, backend.timestep_sampling, torch.Generator().manual_seed(0))
        loss, _ = m.loss(compute_outputs(backend, m, batch, noise))
        loss.backward()
    finally:
        handle.remove()
    cls = method_class(method)
    images = 4 if cls.uses_rejected else 2  # SFT never runs the rejected half
    needs_second_pass = cls.needs_reference or bool(cls.needs & {"predictions"})
    assert calls == [images] * (2 if needs_second_pass else 1)
    for name, param in backend.model.named_parameters():
        assert (param.grad is not None) == (".lora_" in name), name
        param.grad = None
    for module in [backend.parts.vae, *backend.parts.text_encoders]:
        assert all(p.grad is None for p in module.parameters())


def test_ncp_space_with_identity_features_is_the_scaled_latent_error(sd_backend, monkeypatch):
    """With E = identity, x_hat_{t-1} - x_{t-1} = beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) * (eps - eps_hat),
    so the NCP error is that coefficient squared times the latent error (DDPM posterior, Ho et al. eq. 11)."""
    backend = sd_backend
    monkeypatch.setattr(backend, "encoder_features", lambda x, t, cond: x.flatten(1))
    latent, ncp = build_method("dpo"), build_method("dpo", {"space": "ncp"})
    batch = one_batch(backend, make_pairs(2))
    noise = draw_noise(latent, batch.latents.shape, True, backend.timestep_sampling, torch.Generator().manual_seed(3))
    noise.timesteps[:] = torch.tensor([10, 700, 10, 700])
    with torch.no_grad():
        a = compute_outputs(backend, latent, batch, noise)
        b = compute_outputs(backend, ncp, batch, noise)
    ac = backend.alphas_cumprod.double()
    t = noise.timesteps
    alpha_t = ac[t] / ac[t - 1]
    coef = (1 - alpha_t) / (alpha_t.sqrt() * (1 - ac[t]).sqrt())
    torch.testing.assert_close(b.err.double(), coef**2 * a.err.double(), rtol=1e-3, atol=1e-9)  # float32 cancellation in the posterior step
    torch.testing.assert_close(b.ref_err.double(), coef**2 * a.ref_err.double(), rtol=1e-3, atol=1e-9)  # float32 cancellation in the posterior step
