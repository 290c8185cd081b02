"""Methods on flow models: Flow-DPO and the flow betas against their formulas (numpy, independent numbers), flow
defaults visible in `methods`, user values winning, and MaPO/DSPO refused with their reasons."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.methods import StepOutputs, build_method, method_names
from trainer.methods.table import methods_table_text

# velocity errors of 3 pairs (flow errors sit near 1-2 per element on unit-variance latents)
ERR_W, ERR_L = np.array([1.10, 1.30, 0.95]), np.array([1.12, 1.28, 0.95])
REF_W, REF_L = np.array([1.11, 1.29, 0.96]), np.array([1.11, 1.29, 0.94])


def outputs(labels=None) -> StepOutputs:
    err = torch.tensor(np.concatenate([ERR_W, ERR_L]), dtype=torch.float64)
    ref = torch.tensor(np.concatenate([REF_W, REF_L]), dtype=torch.float64)
    labels = torch.tensor(labels if labels is not None else [1.0] * 3 + [0.0] * 3, dtype=torch.float64)
    return StepOutputs(err=err, timesteps=torch.zeros(6, dtype=torch.long), labels=labels, ref_err=ref)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def on_flow(name: str, options: dict | None = None):
    return build_method(name, options).for_model("flow", "flux")


def test_flow_dpo_loss_and_metrics_match_the_formula():
    """Flow-DPO (flow_grpo train_sd3_dpo.py): -log sigmoid(-(beta/2) ((e_w - e_l) - (r_w - r_l))), beta 1000."""
    beta = 1000.0
    inside = -0.5 * beta * ((ERR_W - ERR_L) - (REF_W - REF_L))  # [10, -10, 10]
    loss, metrics = on_flow("dpo").loss(outputs())
    assert loss.item() == pytest.approx(np.mean(-log_sigmoid(inside)), abs=1e-9)
    assert metrics["implicit_acc"].item() == pytest.approx(np.mean(inside > 0))
    assert metrics["reward_margin"].item() == pytest.approx(inside.mean(), abs=1e-9)


def test_flow_dpo_at_policy_equal_reference_is_ln2():
    out = outputs()
    out.ref_err = out.err.clone()
    assert on_flow("dpo").loss(out)[0].item() == pytest.approx(np.log(2.0), abs=1e-12)


def test_flow_betas_of_the_other_methods_follow_their_formulas():
    cpo = -0.5 * 1000.0 * (ERR_W - ERR_L)  # beta 500, no 0.5 factor: the DPO multiplier
    assert on_flow("cpo").loss(outputs())[0].item() == pytest.approx(np.mean(-log_sigmoid(cpo)), abs=1e-9)
    g = np.concatenate([REF_W - ERR_W, REF_L - ERR_L])  # KTO, beta 200
    y = np.array([1.0] * 3 + [0.0] * 3)
    z0 = max(g.mean(), 0.0)
    h = 1 / (1 + np.exp(-(2 * y - 1) * 200.0 * (g - z0)))
    assert on_flow("kto").loss(outputs())[0].item() == pytest.approx(np.mean(1 - h), abs=1e-9)
    k = 0.5 * 1000.0  # Cal-DPO, beta 1000, beta_cal 0.5
    r_w, r_l = -k * (ERR_W - REF_W), -k * (ERR_L - REF_L)
    cal = np.mean(-log_sigmoid(r_w - r_l)) + 0.5 * (np.mean((r_w - 1.0) ** 2) + np.mean((r_l + 1.0) ** 2))
    assert on_flow("cal-dpo").loss(outputs())[0].item() == pytest.approx(cal, rel=1e-9)
    assert on_flow("dense").config.beta == on_flow("rpo").config.beta == 1000.0


def test_user_values_win_and_ddpm_models_keep_the_paper_defaults():
    assert on_flow("dpo", {"beta": 100}).config.beta == 100.0
    assert build_method("dpo").for_model("epsilon", "sd15").config.beta == 5000.0
    assert build_method("cpo").for_model("v_prediction", "sdxl").config.beta == 2500.0
    with pytest.raises(ValueError, match="method_args.beta: expected (float|a number), got 'high'"):
        build_method("dpo", {"beta": "high"})


def test_methods_output_shows_flow_defaults_and_refusals():
    text = methods_table_text()
    rows = {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0] in method_names()}
    assert "beta=5000 (flow: 1000)" in rows["dpo"] and "beta=2500 (flow: 500)" in rows["cpo"]
    assert "beta=1000 (flow: 200)" in rows["kto"]
    assert "not on flow models" in rows["mapo"] and "not on flow models" in rows["dspo"]
    assert "not on flow models" not in rows["sft"]


@pytest.mark.parametrize("name", ["mapo", "dspo"])
def test_mapo_and_dspo_are_refused_on_flow_with_a_reason(name):
    with pytest.raises(ValueError, match=f"method '{name}' does not train sd3 models \\(flow prediction\\): .+ Use dpo"):
        build_method(name).for_model("flow", "sd3")
    assert build_method(name).for_model("epsilon", "sd15").name == name
