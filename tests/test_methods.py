"""Preference losses against independent numbers.

Expected values come from /work/shared/methods.md and methods-sources.md section 10 (computed there
with numpy), or from a few lines of numpy in the test following the paper's equation; never from the
implementation under test.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.forward_process import TimestepSampling
from trainer.methods import StepOutputs, build_method, method_class, method_names
from trainer.methods.table import methods_table_markdown, methods_table_rows, methods_table_text

ALL = ["cal-dpo", "cpo", "dense", "dpo", "dspo", "kto", "mapo", "npo", "rpo", "sft"]

# methods.md, 3 pairs
M3 = dict(w=[0.100, 0.200, 0.050], l=[0.120, 0.180, 0.050], rw=[0.110, 0.190, 0.060], rl=[0.110, 0.190, 0.040])
# methods-sources.md section 10, 4 pairs
S4 = dict(
    w=[0.1000, 0.2500, 0.0500, 0.4000],
    l=[0.1200, 0.2400, 0.0600, 0.3900],
    rw=[0.1010, 0.2490, 0.0510, 0.3980],
    rl=[0.1190, 0.2410, 0.0590, 0.3920],
)


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def pairs(w, l, rw=None, rl=None, grad: bool = False, **extra) -> StepOutputs:
    """A paired batch, chosen first, float64."""
    err = t64(np.concatenate([w, l])).requires_grad_(grad)
    ref = None if rw is None else t64(np.concatenate([rw, rl]))
    n = len(w)
    labels = torch.cat([torch.ones(n), torch.zeros(n)]).double()
    return StepOutputs(err=err, timesteps=torch.zeros(2 * n, dtype=torch.long), labels=labels, ref_err=ref, **extra)


def run(name: str, out: StepOutputs, **options) -> tuple[float, dict[str, float]]:
    loss, metrics = build_method(name, options).loss(out)
    return loss.item(), {k: v.item() for k, v in metrics.items()}


def softplus(x):
    return np.logaddexp(0.0, x)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# ---------------------------------------------------------------- dpo


def test_dpo_methods_md_vectors():
    loss, m = run("dpo", pairs(**M3))
    assert loss == pytest.approx(16.666667, abs=1e-6)
    assert m["implicit_acc"] == pytest.approx(2 / 3)
    assert m["reward_margin"] == pytest.approx(50 / 3, abs=1e-6)  # inside = [50, -50, 50]
    loss, m = run("dpo", pairs(**M3), beta=50)
    assert loss == pytest.approx(0.640744, abs=1e-6)
    assert m["implicit_acc"] == pytest.approx(2 / 3)


def test_dpo_sources_vectors_and_gradient():
    out = pairs(**S4, grad=True)
    loss, metrics = build_method("dpo").loss(out)
    assert loss.item() == pytest.approx(3.7550478610916462, abs=1e-6)
    assert metrics["implicit_acc"].item() == 0.5
    loss.backward()
    grad_w = [4.1830318277, 620.8169681723, 4.1830318277, 624.9716263321]
    np.testing.assert_allclose(out.err.grad[:4].numpy(), grad_w, atol=1e-6)
    np.testing.assert_allclose(out.err.grad[4:].numpy(), -np.array(grad_w), atol=1e-6)
    assert run("dpo", pairs(**S4), beta=500)[0] == pytest.approx(0.808873160014636, abs=1e-6)
    assert metrics["err_w"].item() == pytest.approx(np.mean(S4["w"]))
    assert metrics["ref_err_l"].item() == pytest.approx(np.mean(S4["rl"]))


def test_dpo_policy_equal_reference_is_ln2():
    out = pairs(S4["rw"], S4["rl"], S4["rw"], S4["rl"])
    loss, m = run("dpo", out)
    assert loss == pytest.approx(math.log(2), abs=1e-12)
    assert m["implicit_acc"] == 0.0 and m["reward_margin"] == 0.0


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_dpo_hinge_and_ipo_follow_diffusers_forms(loss_type):
    beta = 5000.0
    logits = (np.array(S4["rw"]) - S4["rl"]) - (np.array(S4["w"]) - S4["l"])
    beta_diffusers = beta / 2  # the diffusers SD script has no 0.5 factor
    if loss_type == "hinge":
        expected = np.mean(np.maximum(0.0, 1.0 - beta_diffusers * logits))
    else:
        expected = np.mean((logits - 1.0 / (2.0 * beta_diffusers)) ** 2)
    assert run("dpo", pairs(**S4), loss_type=loss_type)[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- sft, cpo, mapo


def test_sft_chosen_only_and_full_batch():
    chosen_only = StepOutputs(err=t64(M3["w"]), timesteps=torch.zeros(3), labels=torch.ones(3))
    assert run("sft", chosen_only)[0] == pytest.approx(0.116667, abs=1e-6)
    assert run("sft", pairs(**S4))[0] == pytest.approx(0.2, abs=1e-12)  # section 10.3, rejected rows ignored


def test_cpo_vector_and_sft_weight():
    w, l = [0.100, 0.250, 0.0500, 0.400], [0.102, 0.249, 0.0505, 0.400]
    assert run("cpo", pairs(w, l))[0] == pytest.approx(0.8826703361717471, abs=1e-6)
    expected = np.mean(softplus(2500 * (np.array(w) - l))) + 0.3 * np.mean(w)
    assert run("cpo", pairs(w, l), sft_weight=0.3)[0] == pytest.approx(expected, abs=1e-12)


def test_mapo_methods_md_vector():
    loss, m = run("mapo", pairs(M3["w"], M3["l"]))
    assert loss == pytest.approx(0.301669, abs=1e-6)
    assert m["win_score"] == pytest.approx(np.mean([0.975208, 0.950833, 0.987552]), abs=1e-6)
    assert m["lose_score"] == pytest.approx(np.mean([0.970300, 0.955675, 0.987552]), abs=1e-6)
    ratio = [-0.007358, -4.849577, -0.693147]
    assert m["margin_loss"] == pytest.approx(-0.1 * np.mean(ratio), abs=1e-6)


def test_mapo_sources_vector_and_gradient():
    out = pairs(S4["w"], S4["l"], grad=True)
    loss, m = build_method("mapo").loss(out)
    assert loss.item() == pytest.approx(0.32502396141981144, abs=1e-9)
    assert m["margin_loss"].item() == pytest.approx(0.12502396141981142, abs=1e-9)
    assert m["win_score"].item() == pytest.approx(0.9512233162611825, abs=1e-9)
    assert m["lose_score"].item() == pytest.approx(0.9505603591490922, abs=1e-9)
    loss.backward()
    assert out.err.grad[0].item() == pytest.approx(0.295052605, abs=1e-6)
    assert out.err.grad[4].item() == pytest.approx(-0.044899930, abs=1e-6)


def test_mapo_finite_over_error_range():
    e = np.logspace(-6, 1, 8)
    loss, _ = run("mapo", pairs(e, e[::-1]))
    assert math.isfinite(loss)


# ---------------------------------------------------------------- kto


def kto_out(err, ref, y, grad=False) -> StepOutputs:
    return StepOutputs(err=t64(err).requires_grad_(grad), timesteps=torch.zeros(len(y)), labels=t64(y), ref_err=t64(ref))


def test_kto_vectors():
    err, y = S4["w"], [1, 0, 1, 0]
    loss, m = run("kto", kto_out(err, S4["rw"], y))
    assert loss == pytest.approx(0.23150679653302592, abs=1e-9)
    assert m["implicit_acc"] == 1.0 and m["z0"] == 0.0
    loss, m = run("kto", kto_out(err, [0.1030, 0.2490, 0.0530, 0.4010], y))
    assert loss == pytest.approx(0.20456247410802603, abs=1e-9)
    assert m["z0"] == pytest.approx(0.0015, abs=1e-12)


def test_kto_reference_point_is_detached():
    err, ref, y = np.array(S4["w"]), np.array([0.1030, 0.2490, 0.0530, 0.4010]), np.array([1.0, 0, 1, 0])
    out = kto_out(err, ref, y, grad=True)
    build_method("kto").loss(out)[0].backward()
    g = ref - err
    z0 = max(g.mean(), 0.0)
    sgn, beta = 2 * y - 1, 1000.0
    h = sigmoid(sgn * beta * (g - z0))
    expected = sgn * beta * h * (1 - h) / len(y)  # no term through z0
    np.testing.assert_allclose(out.err.grad.numpy(), expected, rtol=1e-10)


def test_kto_lambdas():
    err, ref, y = np.array([0.2, 0.3, 0.1]), np.array([0.21, 0.28, 0.1]), np.array([1.0, 0.0, 0.0])
    g = ref - err
    h = sigmoid((2 * y - 1) * 500 * (g - max(g.mean(), 0)))
    expected = np.mean(np.where(y == 1, 2.0, 0.5) * (1 - h))
    loss, _ = run("kto", kto_out(err, ref, y), beta=500, lambda_d=2.0, lambda_u=0.5)
    assert loss == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- cal-dpo


def cal_dpo_from_rewards(r_w, r_l, beta=5000.0) -> StepOutputs:
    """Errors whose Diffusion-DPO implicit rewards -(beta/2)(e - e_ref) are r (with e_ref = 0)."""
    k = beta / 2
    return pairs(-np.array(r_w) / k, -np.array(r_l) / k, [0.0] * len(r_w), [0.0] * len(r_l))


def test_cal_dpo_vectors():
    r_w, r_l = [0.8, -0.2], [-0.5, 0.1]
    assert run("cal-dpo", cal_dpo_from_rewards(r_w, r_l), beta_cal=1.0)[0] == pytest.approx(0.7826818491507597, abs=1e-9)
    loss, _ = run("cal-dpo", cal_dpo_from_rewards(r_w, r_l), beta_cal=0.001)
    assert loss == pytest.approx(249750.78268184914, abs=1e-6)


def test_cal_dpo_default_scale():
    r_w = -(2500.0) * (np.array(S4["w"]) - S4["rw"])
    r_l = -(2500.0) * (np.array(S4["l"]) - S4["rl"])
    target = 1.0  # 1 / (2 * beta_cal), beta_cal = 0.5
    expected = np.mean(softplus(-(r_w - r_l))) + 0.5 * (np.mean((r_w - target) ** 2) + np.mean((r_l + target) ** 2))
    loss, m = run("cal-dpo", pairs(**S4))
    assert loss == pytest.approx(expected, abs=1e-9)
    assert m["reward_margin"] == pytest.approx(np.mean(r_w - r_l), abs=1e-9)


# ---------------------------------------------------------------- rpo

EMB3 = [[1.0, 0, 0], [0.8, 0.6, 0], [0, 0, 1.0]]


def rpo_out(n_pairs=3, prompt=EMB3, image=None, grad=False) -> StepOutputs:
    prompt_emb = t64(np.concatenate([prompt, prompt]))
    return pairs(*(S4[k][:n_pairs] for k in ("w", "l", "rw", "rl")), grad=grad, prompt_emb=prompt_emb, image_emb=image)


def test_rpo_sources_vector():
    method = build_method("rpo")
    w_expected = [
        [0.5538155504, 0.3712336652, 0.0749507844],
        [0.3712336652, 0.5538155504, 0.0749507844],
        [0.1065069789, 0.1065069789, 0.7869860422],
    ]
    np.testing.assert_allclose(method.weights(rpo_out()).numpy(), w_expected, atol=1e-9)
    assert method.loss(rpo_out())[0].item() == pytest.approx(0.7408699131476638, abs=1e-9)
    assert run("dpo", rpo_out())[0] == pytest.approx(1.6733820151557863, abs=1e-9)


def test_rpo_identity_weights_equal_dpo():
    out = rpo_out(4, prompt=np.eye(4), grad=True)
    rpo_loss, rpo_metrics = build_method("rpo", {"weighting": "loss", "tau": 1e-3}).loss(out)
    (rpo_grad,) = torch.autograd.grad(rpo_loss, out.err)
    dpo_loss, dpo_metrics = build_method("dpo").loss(out)
    (dpo_grad,) = torch.autograd.grad(dpo_loss, out.err)
    assert rpo_loss.item() == pytest.approx(dpo_loss.item(), abs=1e-12)
    torch.testing.assert_close(rpo_grad, dpo_grad, rtol=1e-12, atol=1e-12)
    for key in ("implicit_acc", "reward_margin", "err_w", "ref_err_l"):
        assert rpo_metrics[key].item() == pytest.approx(dpo_metrics[key].item(), abs=1e-12)


def rpo_numpy(h_w, h_l, dist, tau, beta, placement):
    w = np.exp(-dist / tau)
    w /= w.sum(1, keepdims=True)
    logits = beta / 2 * (h_w[:, None] - h_l[None, :])
    if placement == "logit":
        return np.mean(-log_sigmoid(w * logits))
    return np.mean(np.sum(-w * log_sigmoid(logits), 1))


def cos_dist(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 1 - a @ b.T


@pytest.mark.parametrize("embedding", ["prompt", "image", "both"])
@pytest.mark.parametrize("weighting", ["logit", "loss"])
def test_rpo_embeddings_and_weighting(embedding, weighting):
    rng = np.random.default_rng(0)
    prompt, image = rng.normal(size=(3, 5)), rng.normal(size=(6, 5))
    out = rpo_out(3, prompt=prompt, image=t64(image))
    h_w = np.array(S4["rw"][:3]) - S4["w"][:3]
    h_l = np.array(S4["rl"][:3]) - S4["l"][:3]
    d_prompt, d_image = cos_dist(prompt, prompt), cos_dist(image[:3], image[3:])
    dist = {"prompt": d_prompt, "image": d_image, "both": (d_prompt + d_image) / 2}[embedding]
    expected = rpo_numpy(h_w, h_l, dist, 0.5, 5000.0, weighting)
    loss, _ = run("rpo", out, embedding=embedding, weighting=weighting)
    assert loss == pytest.approx(expected, abs=1e-9)


def test_rpo_image_embedding_required():
    with pytest.raises(ValueError, match="image_emb"):
        build_method("rpo", {"embedding": "image"}).loss(rpo_out())


# ---------------------------------------------------------------- dspo


def dspo_out(shift_w: float = 0.0) -> StepOutputs:
    eps = np.array([[0.5, -1.0], [0.2, 0.0]])
    ref_w, pol_w = eps + [[0.05, -0.05], [0.05, 0.05]], eps + [[0.04, -0.05], [0.05, 0.05]] + shift_w
    ref_l, pol_l = eps + [[0.10, 0.10], [-0.10, 0.10]], eps + [[0.10, 0.10], [-0.10, 0.11]]
    target = t64(np.stack([eps, eps])[:, None])
    pred, ref_pred = t64(np.stack([pol_w, pol_l])[:, None]), t64(np.stack([ref_w, ref_l])[:, None])
    err, ref_err = ((pred - target) ** 2).mean((1, 2, 3)), ((ref_pred - target) ** 2).mean((1, 2, 3))
    return StepOutputs(
        err=err, timesteps=torch.zeros(2), labels=t64([1, 0]), ref_err=ref_err, pred=pred, ref_pred=ref_pred, target=target
    )


def test_dspo_vectors():
    np.testing.assert_allclose(dspo_out().err.numpy(), [0.002275, 0.010525], atol=1e-12)
    assert run("dspo", dspo_out())[0] == pytest.approx(0.0022751000062312494, abs=1e-12)
    assert run("dspo", dspo_out(), variant="sdxl")[0] == pytest.approx(0.017679489171385978, abs=1e-12)
    assert run("dspo", dspo_out(0.5), variant="sdxl")[0] == pytest.approx(0.247525, abs=1e-9)
    assert run("dspo", dspo_out(), beta=5000)[0] == pytest.approx(11.18491997231408, abs=1e-9)


def test_dspo_beta_follows_variant():
    assert build_method("dspo").config.beta == 0.001
    assert build_method("dspo", {"variant": "sdxl"}).config.beta == 5000.0
    assert build_method("dspo", {"variant": "sdxl", "beta": 1000}).config.beta == 1000.0
    with pytest.raises(ValueError, match="method_args.beta"):
        build_method("dspo", {"beta": "big"})


def test_dspo_sdxl_switch_at_threshold():
    out = dspo_out()
    d2 = ((out.pred[:1] - out.ref_pred[:1]) ** 2).mean().item()  # 2.5e-5
    s = sigmoid(1.875)
    below = run("dspo", out, variant="sdxl", sdxl_threshold=d2 * 1.001)[0]
    at = run("dspo", out, variant="sdxl", sdxl_threshold=d2)[0]
    assert below == pytest.approx((1 - s) ** 2, abs=1e-12)
    assert at == pytest.approx((1 - s) ** 2 * d2, abs=1e-12)


# ---------------------------------------------------------------- dense


def test_dense_step_probabilities():
    p = build_method("dense").step_probabilities().numpy()
    # section 10.10 (its 1e-10 offsets come from the official `/ (sum + 1e-8)`)
    assert p[0] == pytest.approx(0.10051804731964614, abs=1e-9)
    assert p[1] == pytest.approx(0.09046624258768153, abs=1e-9)
    assert p[10] == pytest.approx(0.03504847594131221, abs=1e-9)
    assert p[49] == pytest.approx(0.0005756082446269142, abs=1e-9)
    assert p.sum() == pytest.approx(1.0, abs=1e-15)


def test_dense_timestep_distribution_matches_gamma():
    method, total, steps = build_method("dense"), 1000, 50
    t = method.sample_timesteps(200_000, TimestepSampling(total), torch.Generator().manual_seed(0)).numpy()
    assert t.min() >= 0 and t.max() < total
    k = steps - 1 - (t * steps) // total  # step k covers [T(N-1-k)/N, T(N-k)/N); k = 0 the noisiest
    freq = np.bincount(k, minlength=steps) / len(t)
    expected = 0.9 ** np.arange(steps) / np.sum(0.9 ** np.arange(steps))
    np.testing.assert_allclose(freq, expected, atol=3e-3)
    assert set(np.unique(t[k == 0])) == set(range(980, 1000))  # uniform inside the block


def test_dense_clip_and_dpo_equivalence():
    assert run("dense", pairs(**S4))[0] == pytest.approx(run("dpo", pairs(**S4))[0], abs=1e-12)
    c = 1.5e-3
    h_w = np.clip(np.array(S4["rw"]) - S4["w"], -c, c)
    h_l = np.clip(np.array(S4["rl"]) - S4["l"], -c, c)
    expected = np.mean(softplus(-2500 * (h_w - h_l)))
    assert run("dense", pairs(**S4), clip=c)[0] == pytest.approx(expected, abs=1e-12)


def test_dense_rejects_more_steps_than_timesteps():
    with pytest.raises(ValueError, match="num_steps"):
        build_method("dense", {"num_steps": 20}).sample_timesteps(4, TimestepSampling(10), torch.Generator())


# ---------------------------------------------------------------- invariants over all methods


def random_pairs(b: int = 4, grad: bool = True, seed: int = 0) -> StepOutputs:
    """Errors near a reference, with the predictions and embeddings every method may need."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * b, 2, 2, 2, generator=g, dtype=torch.float64)
    ref_pred = target + 0.1 * torch.randn(2 * b, 2, 2, 2, generator=g, dtype=torch.float64)
    pred = ref_pred + 1e-3 * torch.randn(2 * b, 2, 2, 2, generator=g, dtype=torch.float64)
    pred.requires_grad_(grad)
    return StepOutputs(
        err=((pred - target) ** 2).mean((1, 2, 3)),
        timesteps=torch.zeros(2 * b, dtype=torch.long),
        labels=torch.cat([torch.ones(b), torch.zeros(b)]).double(),
        ref_err=((ref_pred - target) ** 2).mean((1, 2, 3)),
        pred=pred,
        ref_pred=ref_pred,
        target=target,
        prompt_emb=torch.randn(2 * b, 8, generator=g, dtype=torch.float64),
    )


def for_method(name: str, out: StepOutputs) -> StepOutputs:
    """What the loop would hand the method: no reference when it needs none; SFT sees chosen rows."""
    cls = method_class(name)
    if not cls.needs_reference:
        out.ref_err = None
    if not cls.uses_rejected:
        b = out.num_pairs
        out.err, out.labels = out.err[:b], out.labels[:b]
    return out


def test_registry_builds_every_method():
    assert method_names() == ALL
    for name in ALL:
        method = build_method(name)
        assert method.name == name and method.paper
        assert method.error_space == "latent"
        loss, metrics = method.loss(for_method(name, random_pairs()))
        assert loss.dim() == 0 and torch.isfinite(loss)
        for key, value in metrics.items():
            assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key
        required = {"loss", "err_w"} if name == "sft" else {"loss", "implicit_acc", "reward_margin", "err_w", "err_l"}
        if method.needs_reference:
            required |= {"ref_err_w", "ref_err_l"}
        assert required <= set(metrics), name
        assert metrics["loss"].item() == loss.item()


def test_registry_rejects_bad_options():
    with pytest.raises(ValueError, match="method_args.betta"):
        build_method("dpo", {"betta": 1.0})
    with pytest.raises(ValueError, match="method_args.loss_type"):
        build_method("dpo", {"loss_type": "square"})
    with pytest.raises(ValueError, match="method_args.space"):
        build_method("cpo", {"space": "pixel"})
    with pytest.raises(ValueError, match="method_args.beta"):
        build_method("kto", {"beta": "high"})
    assert build_method("sft", {"space": "ncp"}).error_space == "ncp"
    assert build_method("dpo", {"beta": 2500}).config.beta == 2500.0


def test_method_flags():
    assert [n for n in ALL if not method_class(n).needs_reference] == ["cpo", "mapo", "sft"]
    assert [n for n in ALL if not method_class(n).uses_rejected] == ["sft"]
    kto = method_class("kto")
    assert not kto.paired and not kto.shared_noise
    assert method_class("rpo").wants_related_prompts and not method_class("dpo").wants_related_prompts
    assert method_class("rpo").needs == {"embeddings"} and method_class("dspo").needs == {"predictions"}


def case(name: str) -> tuple[str, dict]:
    """A test case name: a method, or "dspo-sdxl" for DSPO's sdxl variant."""
    return ("dspo", {"variant": "sdxl"}) if name == "dspo-sdxl" else (name, {})


# sft has no rejected half; dspo sd15 regresses predictions, so its error gradient has no fixed sign
@pytest.mark.parametrize("name", ["cal-dpo", "cpo", "dense", "dpo", "dspo-sdxl", "kto", "mapo", "rpo"])
def test_gradient_pushes_chosen_error_down(name):
    name, options = case(name)
    out = for_method(name, random_pairs(grad=False))
    out.err = out.err.detach().requires_grad_(True)
    loss, _ = build_method(name, options).loss(out)
    (grad,) = torch.autograd.grad(loss, out.err)
    assert (grad[: out.num_pairs] > 0).all() and (grad[out.num_pairs :] < 0).all(), grad


@pytest.mark.parametrize("name", ALL + ["dspo-sdxl"])
def test_loss_decreases_under_gradient_descent(name):
    name, options = case(name)
    method = build_method(name, options)
    base = random_pairs(grad=False)
    offset = (base.pred - base.target).clone().requires_grad_(True)  # learnable per-sample predictions
    optimizer = torch.optim.Adam([offset], lr=1e-3)
    losses = []
    for _ in range(21):
        pred = base.target + offset
        out = for_method(name, dataclasses.replace(base, pred=pred, err=((pred - base.target) ** 2).mean((1, 2, 3))))
        loss, _ = method.loss(out)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(map(math.isfinite, losses))
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------- table


def test_methods_table():
    rows = methods_table_rows()
    assert [r[0] for r in rows] == ALL
    by_name = {r[0]: r for r in rows}
    assert by_name["dpo"][2] == "yes" and by_name["mapo"][2] == "no"
    assert "beta=5000" in by_name["dpo"][3] and "beta=0.001 (auto)" in by_name["dspo"][3]
    markdown, text = methods_table_markdown(), methods_table_text()
    assert markdown.count("\n") == len(ALL) + 3 and "| kto |" in markdown  # header, rule, rows, blank, guardrails
    assert "safeguard=false" in markdown.splitlines()[-1] and "safeguard" not in by_name["dpo"][3]
    assert by_name["dpo"][3].endswith("+ guardrails") and not by_name["kto"][3].endswith("+ guardrails")
    assert all(name in text for name in ALL)


def test_docs_table_is_current():
    docs = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    assert methods_table_markdown() in docs, "regenerate the table in docs/methods.md"
