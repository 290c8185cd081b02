"""Flow-DPO beta on the tiny SD3/Flux models: how fast the logistic loss leaves ln 2 and where pairs stop counting.

For each family and beta, a fresh zero-initialised LoRA trains on one fixed batch of pairs (one noise and
timestep draw, the family's timestep sampling) with Adam; we record the loss after 10 and 30 steps and the
fraction of pairs whose DPO term has left the sigmoid's working range after 30 steps (|inside| > 5: a won
pair then contributes under 0.7% of its full gradient; a lost one sits where the loss is linear). Random tiny models are not trained ones: this shows where the formula's scale puts
each beta for velocity errors of order 1, the argument in docs/methods.md ("Flow-DPO beta").

    python benchmarks/flow_beta.py [--steps 30] [--betas 100,500,1000,2500,5000] [--no-write]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import make_pairs

import torch

from benchmarks.results import publish
from trainer.config import make_config
from trainer.data.dataset import collate
from trainer.data.transforms import ImageTransform
from trainer.encoding import encode_collated
from trainer.methods import build_method
from trainer.run import make_backend
from trainer.step import compute_outputs, draw_noise


def run(model: str, beta: float, steps: int, lr: float, tmp: Path) -> tuple[float, float, float, float]:
    config = make_config(dict(model=model, resolution=32, rank=4, alpha=4.0, output_dir=str(tmp), seed=0))
    backend = make_backend(config, torch.device("cpu"))
    method = build_method("dpo", {"beta": beta}).for_model(backend.prediction_type, model)
    batch = encode_collated(backend, collate([ImageTransform(32)(e, False, None) for e in make_pairs(4, 32)]))
    noise = draw_noise(method, batch.latents.shape, True, backend.timestep_sampling, torch.Generator().manual_seed(3))
    optimizer = torch.optim.Adam(backend.trainable_parameters(), lr=lr)
    losses, inside = [], None
    for _ in range(steps + 1):
        out = compute_outputs(backend, method, batch, noise)
        loss, _ = method.loss(out)
        losses.append(loss.item())
        inside = -0.5 * beta * ((out.err_w - out.err_l) - (out.ref_err_w - out.ref_err_l)).detach()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses[min(10, steps)], losses[steps], (inside.abs() > 5).float().mean().item(), out.err.mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--betas", default="100,500,1000,2500,5000")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = ["| model | beta | loss @10 | loss @{0} | pairs with abs(term) > 5 @{0} | mean velocity error |".format(args.steps),
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("tiny-sd3", "tiny-flux"):
            for beta in (float(b) for b in args.betas.split(",")):
                at10, last, saturated, err = run(model, beta, args.steps, args.lr, Path(tmp))
                rows.append(f"| {model} | {beta:g} | {at10:.3f} | {last:.3f} | {saturated:.2f} | {err:.3f} |")
                print(rows[-1], flush=True)
    body = "\n".join(rows) + (f"\n\nln 2 = 0.693 at step 0 for every beta; Adam lr {args.lr:g}, 4 pairs, 32 px, rank 4, "
                              "one fixed noise/timestep draw.")
    publish("flow_beta", body, write=not args.no_write)


if __name__ == "__main__":
    main()
