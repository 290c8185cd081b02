"""The DPO-family guardrails (trainer/methods/guardrails.py) against independent numbers.

Expected values come from a few lines of numpy following the sources' formulas: the Diffusion-SDPO
loser scale (AIDC-AI/Diffusion-SDPO train.py, get_adaptive_lose_l_scale), SimpleTuner's adaptive beta
(flow_dpo/distiller.py, _beta_for_margin) and the SFT anchor; never from the implementation under test.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from trainer.loop import train
from trainer.methods import StepOutputs, build_method
from trainer.run import make_backend
from trainer.step import compute_outputs, draw_noise

GUARDED = ["cal-dpo", "cpo", "dense", "dpo", "npo", "rpo"]


def log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


def with_residuals(r_w: np.ndarray, r_l: np.ndarray, ref_shift: float = 0.01, grad: bool = False) -> StepOutputs:
    """A paired batch whose policy residuals are r_w / r_l ([B, D], target 0) and whose reference errors are
    the policy's plus `ref_shift` (chosen) and minus it (rejected)."""
    pred = torch.as_tensor(np.concatenate([r_w, r_l]), dtype=torch.float64)
    err = (pred ** 2).mean(1).detach().requires_grad_(grad)
    b = len(r_w)
    ref = err.detach() + torch.cat([torch.full((b,), ref_shift), torch.full((b,), -ref_shift)]).double()
    return StepOutputs(err=err, timesteps=torch.zeros(2 * b, dtype=torch.long),
                       labels=torch.cat([torch.ones(b), torch.zeros(b)]).double(), ref_err=ref, pred=pred,
                       target=torch.zeros_like(pred), prompt_emb=torch.eye(2 * b, dtype=torch.float64))


def sdpo_scale(r_w: np.ndarray, r_l: np.ndarray, mu: float) -> float:
    """The official rule on output-space gradients of A = mean(r_w^2), B = mean(r_l^2)."""
    g_a, g_b = 2 * r_w.ravel() / r_w.size, 2 * r_l.ravel() / r_l.size
    den = g_b @ g_a
    return 1.0 if den <= 0 else float(np.clip((1 - mu) * (g_a @ g_a) / (den + 1e-9), 0.0, 1.0))


RNG = np.random.default_rng(7)
R_W = RNG.normal(size=(3, 16))
SAFEGUARD_CASES = {
    "aligned loser, scaled down": (R_W, 1.8 * R_W + 0.3 * RNG.normal(size=(3, 16)), 0.9),
    "opposed loser, untouched": (R_W, -R_W + 0.1 * RNG.normal(size=(3, 16)), 0.9),
    "cap above 1, clipped": (R_W, 0.5 * R_W, 0.0),
}


@pytest.mark.parametrize("case", SAFEGUARD_CASES)
def test_safeguard_scale_matches_sdpo_vectors(case):
    r_w, r_l, mu = SAFEGUARD_CASES[case]
    _, metrics = build_method("dpo", {"safeguard": True, "safeguard_mu": mu}).loss(with_residuals(r_w, r_l))
    assert metrics["loser_scale"].item() == pytest.approx(sdpo_scale(r_w, r_l, mu), rel=1e-9)
    expected = {"aligned loser, scaled down": (1 - mu) / 1.8, "opposed loser, untouched": 1.0,
                "cap above 1, clipped": 1.0}[case]
    assert metrics["loser_scale"].item() == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("name", GUARDED)
def test_safeguard_scales_only_the_losers_gradient(name):
    r_w, r_l, mu = SAFEGUARD_CASES["aligned loser, scaled down"]
    # npo trains toward the rejected images: there the "winner" is the second half
    scale = sdpo_scale(r_l, r_w, mu) if name == "npo" else sdpo_scale(r_w, r_l, mu)
    losses, grads = {}, {}
    for safeguard in (False, True):
        out = with_residuals(r_w, r_l, grad=True)
        if name == "cpo":
            out.ref_err = None
        loss, _ = build_method(name, {"safeguard": safeguard}).loss(out)
        (grads[safeguard],) = torch.autograd.grad(loss, out.err)
        losses[safeguard] = loss.item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-12)
    b = len(r_w)
    kept, scaled = (slice(b, None), slice(0, b)) if name == "npo" else (slice(0, b), slice(b, None))
    assert torch.allclose(grads[True][kept], grads[False][kept], rtol=1e-12, atol=0)
    assert torch.allclose(grads[True][scaled], scale * grads[False][scaled], rtol=1e-9, atol=0)


def test_safeguard_keeps_the_winner_error_from_rising_where_plain_dpo_raises_it():
    """A linear model on a fixed batch: the loser's input lies further along the winner's residual, so the two
    error gradients align and one plain DPO step raises the winner's error; the safeguarded step lowers it."""
    g = torch.Generator().manual_seed(0)
    w0 = 0.5 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 6, generator=g, dtype=torch.float64)  # the shared target of each pair
    x_w = torch.randn(2, 6, generator=g, dtype=torch.float64)
    x_l = x_w + 0.8 * torch.linalg.solve(w0.T, (x_w @ w0 - eps).T).T  # loser residual = 1.8 x winner residual
    x, target = torch.cat([x_w, x_l]), torch.cat([eps, eps])

    def winner_error(w):
        return ((x_w @ w - eps) ** 2).mean().item()

    after = {}
    for safeguard in (False, True):
        w = w0.clone().requires_grad_(True)
        pred = x @ w
        out = StepOutputs(err=((pred - target) ** 2).mean(1), timesteps=torch.zeros(4, dtype=torch.long),
                          labels=torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64),
                          ref_err=((x @ w0 - target) ** 2).mean(1).detach(), pred=pred, target=target)
        loss, _ = build_method("dpo", {"beta": 50.0, "safeguard": safeguard}).loss(out)
        loss.backward()
        after[safeguard] = winner_error(w0 - 0.01 * w.grad)
    before = winner_error(w0)
    assert after[False] > before * 1.2
    assert after[True] < before


def test_safeguard_refused_outside_latent_space_and_bad_mu():
    with pytest.raises(ValueError, match="method_args.safeguard: .*space = 'latent'"):
        build_method("dpo", {"safeguard": True, "space": "ncp"})
    with pytest.raises(ValueError, match="method_args.safeguard_mu"):
        build_method("cpo", {"safeguard_mu": 1.5})
    assert build_method("dpo", {"space": "ncp"}).needs == frozenset()  # off: nothing extra asked of the loop


def test_safeguard_asks_for_residuals_not_a_reference_pass(tmp_path):
    """cpo is reference-free: with the safeguard it gets predictions and targets, still without a reference pass."""
    from conftest import make_pairs
    from trainer.data.dataset import collate
    from trainer.data.transforms import ImageTransform
    from trainer.encoding import encode_collated

    config = tiny_config(tmp_path)
    backend = make_backend(config, torch.device("cpu"))
    method = build_method("cpo", {"safeguard": True})
    assert method.needs == {"residuals"} and build_method("rpo", {"safeguard": True}).needs == {"embeddings", "residuals"}
    batch = encode_collated(backend, collate([ImageTransform(32)(e, False, None) for e in make_pairs(2)]))
    noise = draw_noise(method, batch.latents.shape, batch.paired, backend.timestep_sampling,
                       torch.Generator().manual_seed(0))
    entered = []
    original = backend.reference
    backend.reference = lambda: (entered.append(1), original())[1]
    out = compute_outputs(backend, method, batch, noise)
    assert not entered and out.ref_err is None and out.ref_pred is None
    assert out.pred is not None and out.pred.requires_grad and out.target is not None
    loss, metrics = method.loss(out)
    assert torch.isfinite(loss) and 0.0 <= metrics["loser_scale"].item() <= 1.0


# ---------------------------------------------------------------- adaptive beta


def adaptive_betas(abs_margins, beta, factor, target=0.2, decay=0.99):
    """SimpleTuner's rule: EMA of the mean |margin|, multiplier -logit(target)/EMA clamped to [1e-3, 1] x k."""
    ema, out = None, []
    for a in abs_margins:
        ema = a if ema is None else decay * ema + (1 - decay) * a
        k = -math.log(target / (1 - target)) / ema
        k_max = factor * beta
        out.append(min(max(k, 1e-3 * k_max), k_max) / factor)
    return out


# mean |margin| per step: small margins keep the configured beta, large ones lower it to the floor
SCRIPTED = [2e-4, 5e-4, 1e-3, 4e-3, 2e-2, 5e0, 1e-3]


def margin_batch(a: float) -> StepOutputs:
    """Two pairs whose margins h_w - h_l are +a and -a (mean |margin| = a); cpo's e_l - e_w are the same."""
    err = torch.tensor([0.10, 0.20, 0.10 + a, 0.20 - a], dtype=torch.float64)
    ref = torch.tensor([0.10 + a, 0.20 - a, 0.10 + a, 0.20 - a], dtype=torch.float64)
    return StepOutputs(err=err, timesteps=torch.zeros(4, dtype=torch.long),
                       labels=torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), ref_err=ref,
                       prompt_emb=torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("name,factor", [("dpo", 0.5), ("cpo", 1.0), ("dense", 0.5), ("cal-dpo", 0.5), ("rpo", 0.5)])
def test_adaptive_beta_follows_its_rule_on_a_scripted_margin_sequence(name, factor):
    decay = 0.5
    method = build_method(name, {"adaptive_beta": True, "adaptive_beta_decay": decay})
    beta = method.config.beta
    expected = adaptive_betas(SCRIPTED, beta, factor, decay=decay)
    got = []
    for a in SCRIPTED:
        out = margin_batch(a)
        if name == "cpo":  # reference-free: its margin is e_l - e_w
            out.ref_err = None
        _, metrics = method.loss(out)
        got.append(metrics["beta"].item())
    assert got == pytest.approx(expected, rel=1e-9)
    assert got[0] == beta and got[-2] == pytest.approx(1e-3 * beta)  # both ends of the clamp are reached


def test_adaptive_beta_sets_the_logit_and_resumes_from_its_state():
    method = build_method("dpo", {"adaptive_beta": True})
    for a in SCRIPTED[:4]:
        method.loss(margin_batch(a))
    resumed = build_method("dpo", {"adaptive_beta": True})
    resumed.load_state_dict(json.loads(json.dumps(method.state_dict())))  # checkpoints store it as JSON
    out = margin_batch(SCRIPTED[4])
    (loss_a, m_a), (loss_b, m_b) = method.loss(out), resumed.loss(out)
    assert loss_a.item() == loss_b.item()
    beta = adaptive_betas(SCRIPTED[:5], 5000.0, 0.5)[-1]
    a = SCRIPTED[4]
    assert loss_a.item() == pytest.approx(np.mean(-log_sigmoid(0.5 * beta * np.array([a, -a]))), rel=1e-9)


def test_adaptive_beta_state_survives_a_resume(tmp_path, pairs):
    """Without the margin average in the checkpoint, the resumed run restarts it and trains other weights."""
    options = {"adaptive_beta": True, "adaptive_beta_decay": 0.5, "beta": 1e6}  # tiny-model margins are ~1e-5

    def backend_for(config):
        torch.manual_seed(config.seed)
        return make_backend(config, torch.device("cpu"))

    straight = tiny_config(tmp_path / "a", max_steps=4, method_args=options)
    train(straight, backend_for(straight), pairs)
    first = tiny_config(tmp_path / "b", max_steps=2, checkpoint_every=1, method_args=options)
    train(first, backend_for(first), pairs)
    resumed = tiny_config(tmp_path / "b", max_steps=4, resume="latest", checkpoint_every=1, method_args=options)
    train(resumed, backend_for(resumed), pairs)
    a, b = load_file(str(tmp_path / "a" / "out" / "lora.safetensors")), load_file(str(tmp_path / "b" / "out" / "lora.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    betas = [json.loads(line)["beta"] for line in (tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(set(betas)) > 1  # the beta did adapt


def test_adaptive_beta_bad_options_name_the_key():
    with pytest.raises(ValueError, match="method_args.adaptive_beta_target"):
        build_method("dpo", {"adaptive_beta_target": 0.5})
    with pytest.raises(ValueError, match="method_args.adaptive_beta_decay"):
        build_method("rpo", {"adaptive_beta_decay": 1.0})


# ---------------------------------------------------------------- sft anchor and the winner metric


@pytest.mark.parametrize("name", GUARDED)
def test_sft_weight_adds_the_chosen_error(name):
    r_w, r_l, _ = SAFEGUARD_CASES["aligned loser, scaled down"]
    out = with_residuals(r_w, r_l)
    if name == "cpo":
        out.ref_err = None
    plain, _ = build_method(name).loss(out)
    anchored, metrics = build_method(name, {"sft_weight": 0.7}).loss(out)
    chosen = (r_l if name == "npo" else r_w) ** 2  # npo's "chosen" is the image it trains toward
    assert anchored.item() == pytest.approx(plain.item() + 0.7 * chosen.mean(), rel=1e-12)
    assert metrics["loss"].item() == anchored.item()
    with pytest.raises(ValueError, match="method_args.sft_weight"):
        build_method(name, {"sft_weight": -1.0})


def test_winner_error_rose_is_logged_and_averaged_into_a_share(tmp_path, pairs):
    out = with_residuals(R_W, 1.8 * R_W, ref_shift=0.01)  # reference error above the policy's on the chosen half
    assert build_method("dpo").loss(out)[1]["win_err_rose"].item() == 0.0
    out = with_residuals(R_W, 1.8 * R_W, ref_shift=-0.01)
    assert build_method("dpo").loss(out)[1]["win_err_rose"].item() == 1.0
    config = tiny_config(tmp_path, max_steps=4, log_every=4, learning_rate=1e-2)
    result = train(config, make_backend(config, torch.device("cpu")), pairs)
    share = result.metrics["win_err_rose"]
    assert share in (0.0, 0.25, 0.5, 0.75, 1.0)  # the mean of four 0/1 steps


# ---------------------------------------------------------------- several ranks, flow models


def _adaptive_rank(results) -> None:
    import os

    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        method = build_method("dpo", {"adaptive_beta": True})
        results[rank] = method.loss(margin_batch([1e-3, 3e-3][rank]))[1]["beta"].item()  # |margins| 1e-3 and 3e-3
    finally:
        dist.destroy_process_group()


def test_adaptive_beta_averages_the_margin_over_ranks():
    """SimpleTuner gathers the mean |margin| over processes: both ranks use the same beta, from the mean 2e-3."""
    import torch.multiprocessing as mp
    from ranks import run_ranks

    results = mp.Manager().dict()
    run_ranks(_adaptive_rank, (results,))
    expected = adaptive_betas([2e-3], 5000.0, 0.5)[0]
    assert results[0] == pytest.approx(expected, rel=1e-6) and results[1] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_guardrails_train_flow_models(tmp_path, pairs, model):
    options = {"safeguard": True, "adaptive_beta": True, "sft_weight": 0.5}
    config = tiny_config(tmp_path, model=model, max_steps=2, method_args=options)
    result = train(config, make_backend(config, torch.device("cpu")), pairs)
    assert 0.0 <= result.metrics["loser_scale"] <= 1.0 and result.metrics["beta"] <= 1000.0  # the flow DPO beta
    assert math.isfinite(result.metrics["loss"]) and "sft_loss" in result.metrics


def test_cli_refuses_a_bad_guardrail_option_in_one_line_before_writing(tmp_path, capsys):
    from trainer.cli import main

    from trainer.toy import write_preference_dataset

    data = write_preference_dataset(tmp_path / "data", "shaded", 2, seed=0)
    out = tmp_path / "run"
    code = main(["train", "--model", "tiny-sd", "--data", str(data), "--method", "dpo", "--method-args",
                 "safeguard=true", "safeguard_mu=2", "--output-dir", str(out)])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("error:")]  # (transformers may warn at import)
    assert code == 2 and ours == ["error: method_args.safeguard_mu: must be in [0, 1], got 2.0"] and "Traceback" not in err
    assert not out.exists()
