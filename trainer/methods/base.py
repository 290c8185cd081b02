"""The method interface: a preference loss on what the loop computed for one batch.

A method file holds only maths on tensors; the loop and the backend make every model call.
Batches are laid out chosen-first: for B pairs, rows 0..B-1 are the chosen images and rows
B..2B-1 the rejected ones, each pair sharing its timestep and noise (unless `shared_noise` is False).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

#: Extras a method may ask the loop for (see `Method.needs`).
PREDICTIONS = "predictions"  # full policy/reference predictions and the target (DSPO)
EMBEDDINGS = "embeddings"  # prompt and image embeddings per image (RPO)
RESIDUALS = "residuals"  # the policy prediction and the target, no reference pass (the SDPO safeguard)
KNOWN_NEEDS = frozenset({PREDICTIONS, EMBEDDINGS, RESIDUALS})


@dataclass
class StepOutputs:
    """Per-image quantities of one batch of N images (N = 2B for pairs, chosen first).

    `err` is the policy's per-image error, mean over all non-batch dimensions; `ref_err` the same
    with the adapter disabled (no grad), present only when the method needs a reference.
    """

    err: Tensor
    timesteps: Tensor
    labels: Tensor  # 1.0 chosen / desirable, 0.0 rejected / undesirable
    ref_err: Tensor | None = None
    pred: Tensor | None = None  # policy prediction [N, ...]   (needs PREDICTIONS or RESIDUALS)
    ref_pred: Tensor | None = None  # reference prediction, no grad (needs PREDICTIONS)
    target: Tensor | None = None  # eps or v target (needs PREDICTIONS or RESIDUALS)
    prompt_emb: Tensor | None = None  # [N, D]   (needs EMBEDDINGS)
    image_emb: Tensor | None = None  # [N, D]   (needs EMBEDDINGS)

    @property
    def num_pairs(self) -> int:
        return self.err.shape[0] // 2

    def chosen(self, x: Tensor) -> Tensor:
        """Rows of the chosen half of a paired batch."""
        return x[: self.num_pairs]

    def rejected(self, x: Tensor) -> Tensor:
        """Rows of the rejected half of a paired batch."""
        return x[self.num_pairs :]

    @property
    def err_w(self) -> Tensor:
        return self.chosen(self.err)

    @property
    def err_l(self) -> Tensor:
        return self.rejected(self.err)

    @property
    def ref_err_w(self) -> Tensor:
        return self.chosen(_required(self.ref_err, "ref_err"))

    @property
    def ref_err_l(self) -> Tensor:
        return self.rejected(_required(self.ref_err, "ref_err"))


def _required(x: Tensor | None, name: str) -> Tensor:
    if x is None:
        raise ValueError(f"StepOutputs.{name} is missing: the method did not declare it needs it")
    return x


@dataclass
class MethodConfig:
    """Base of every method's hyper-parameters; subclasses add fields with the paper's defaults."""


def check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    """ValueError naming the config field when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"method_args.{field}: {value!r} is not one of {', '.join(choices)}")


class Method:
    """A preference-alignment objective. Subclasses set the class attributes and `loss`.

    - `needs_reference`: run the adapter-disabled forward (reference-free methods skip it).
    - `uses_rejected`: run the rejected half at all (SFT does not).
    - `paired`: needs chosen/rejected pairs; False accepts single labelled images (KTO).
    - `shared_noise`: both images of a pair share timestep and noise.
    - `needs`: extras from `KNOWN_NEEDS`.
    - `wants_related_prompts`: batches should mix semantically related prompts (RPO's cross-pair terms).
    - `negative_branch`: the LoRA is meant for the unconditional branch of classifier-free guidance (NPO).
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_reference: ClassVar[bool] = True
    uses_rejected: ClassVar[bool] = True
    paired: ClassVar[bool] = True
    shared_noise: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset()
    wants_related_prompts: ClassVar[bool] = False
    negative_branch: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @property
    def error_space(self) -> str:
        """`latent` (the denoising MSE) or `ncp` (MSE in the U-Net's noise-conditioned features)."""
        return getattr(self.config, "space", "latent")

    def sample_timesteps(self, n: int, num_train_timesteps: int, generator: torch.Generator) -> Tensor:
        """Training timesteps for n pairs (or images); uniform unless the method says otherwise."""
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)

    def loss(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss and detached metrics (tensors: the loop reads them only every few steps)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What the method carries from step to step (JSON values, saved in checkpoints); most carry nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s values (a resumed run)."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls.Config)}
