"""Loop options: gradient accumulation, gradient checkpointing, bf16 autocast, v-prediction, TensorBoard."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_pairs, tiny_config
from trainer.loop import TrainHooks, train
from trainer.run import make_backend


def run(config, data, losses=None):
    backend = make_backend(config, torch.device("cpu"))
    hooks = TrainHooks(on_step=lambda r: losses.append(r.metrics["loss"])) if losses is not None else None
    result = train(config, backend, data, hooks)
    return backend, load_file(str(result.lora_path))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, monkeypatch):
    """2 micro-batches of 2 pairs accumulate exactly the gradient of one batch of the same 4 pairs.

    Noise is made independent of batch composition (one timestep, zero noise) so both runs see the same
    per-pair errors; a large Adam epsilon makes the first step proportional to the gradient."""
    from trainer.step import Noise

    def fixed_noise(method, shape, paired, num_train_timesteps, generator):
        return Noise(torch.full((shape[0],), 500), torch.zeros(shape), torch.zeros(shape))

    monkeypatch.setattr("trainer.loop.draw_noise", fixed_noise)
    data = make_pairs(4)
    options = dict(max_steps=1, method_args={"beta": 100.0}, adam_epsilon=1.0, learning_rate=10.0, max_grad_norm=0.0)
    _, big = run(tiny_config(tmp_path / "big", batch_size=4, **options), data)
    _, small = run(tiny_config(tmp_path / "small", batch_size=2, gradient_accumulation_steps=2, **options), data)
    moved = max(v.abs().max() for k, v in big.items() if k.endswith("lora_up.weight"))
    assert moved > 1e-6
    for key in big:
        torch.testing.assert_close(small[key], big[key], atol=1e-7 + 1e-3 * float(moved), rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    data = make_pairs(2)
    plain, checkpointed = [], []
    run(tiny_config(tmp_path / "a", max_steps=3, method_args={"beta": 100.0}), data, plain)
    run(tiny_config(tmp_path / "b", max_steps=3, gradient_checkpointing=True, method_args={"beta": 100.0}), data,
        checkpointed)
    assert checkpointed == pytest.approx(plain, abs=1e-5)


def test_bf16_autocast_trains(tmp_path):
    losses = []
    _, lora = run(tiny_config(tmp_path, max_steps=3, mixed_precision="bf16", method_args={"beta": 100.0}),
                  make_pairs(2), losses)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(v.abs().max() > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))


def test_v_prediction_target_is_the_velocity(tmp_path):
    backend = make_backend(tiny_config(tmp_path), torch.device("cpu"))
    backend.prediction_type = "v_prediction"
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    want = backend.parts.scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(backend.target(x0, noise, t), want)
    torch.testing.assert_close(backend.add_noise(x0, noise, t), backend.parts.scheduler.add_noise(x0, noise, t))


def test_tensorboard_logs_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    run(tiny_config(tmp_path, max_steps=2, tensorboard=True), make_pairs(2))
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
