"""The method interface: a preference loss on what the loop computed for one batch.

A method file holds only maths on tensors; the loop and the backend make every model call.
Batches are laid out chosen-first: for B pairs, rows 0..B-1 are the chosen images and rows
B..2B-1 the rejected ones, each pair sharing its timestep and noise (unless `shared_noise` is False).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..forward_process import PREDICTION_TYPES, TimestepSampling

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


def rank_mean(x: Tensor) -> Tensor:
    """The mean of `x` over the ranks of a data-parallel run (`x` itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def _required(x: Tensor | None, name: str) -> Tensor:
    if x is None:
        raise ValueError(f"StepOutputs.{name} is missing: the method did not declare it needs it")
    return x


def by_prediction(ddpm: float, flow: float) -> Any:
    """A hyper-parameter whose default depends on the model: `ddpm` for epsilon/v-prediction models, `flow` for
    rectified-flow ones (their velocity errors have another scale). Unset, it reads as the DDPM value until the
    method meets its model (`Method.for_model`)."""
    return field(default=None, metadata={"by_prediction": {"ddpm": ddpm, "flow": flow}})


def default_note(f: dataclasses.Field) -> str:
    """How the methods table marks a default that is not one fixed number."""
    defaults = f.metadata.get("by_prediction")
    if defaults is not None:
        return f" (flow: {defaults['flow']:g})"
    return " (auto)" if f.default is None else ""


@dataclass
class MethodConfig:
    """Base of every method's hyper-parameters; subclasses add fields with the paper's defaults.

    Subclasses that define `__post_init__` call this one first (it fills `by_prediction` fields)."""

    def __post_init__(self) -> None:
        self._unset_by_prediction: list[str] = []
        for f in dataclasses.fields(self):
            defaults, value = f.metadata.get("by_prediction"), getattr(self, f.name)
            if defaults is None:
                continue
            if value is None:
                setattr(self, f.name, float(defaults["ddpm"]))
                self._unset_by_prediction.append(f.name)
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"method_args.{f.name}: expected a number, got {value!r}")
            else:
                setattr(self, f.name, float(value))

    def recorded(self) -> dict[str, Any]:
        """The options as a config file records them: unset `by_prediction` fields as None (chosen per model)."""
        values = dataclasses.asdict(self)
        values.update(dict.fromkeys(self._unset_by_prediction))
        return values

    def for_prediction(self, prediction_type: str) -> "MethodConfig":
        """These options on a model of `prediction_type`: unset `by_prediction` fields take its default."""
        key = "flow" if prediction_type == "flow" else "ddpm"
        fields = {f.name: f for f in dataclasses.fields(self)}
        values = {name: float(fields[name].metadata["by_prediction"][key]) for name in self._unset_by_prediction}
        return dataclasses.replace(self, **values)


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
    - `embeddings` (with EMBEDDINGS): which CLIP-space embeddings the loss reads, `prompt` and/or `image`.
    - `wants_related_prompts`: batches should mix semantically related prompts (RPO's cross-pair terms).
    - `negative_branch`: the LoRA is meant for the unconditional branch of classifier-free guidance (NPO).
    - `prediction_types`: what the network may predict (`epsilon`, `v_prediction`, `flow`); on any other
      model the method is refused with `flow_refusal` (why its maths does not carry over).
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
    prediction_types: ClassVar[frozenset[str]] = frozenset(PREDICTION_TYPES)
    flow_refusal: ClassVar[str] = ""

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @property
    def embeddings(self) -> frozenset[str]:
        return frozenset()

    @property
    def error_space(self) -> str:
        """`latent` (the denoising MSE) or `ncp` (MSE in the U-Net's noise-conditioned features)."""
        return getattr(self.config, "space", "latent")

    def for_model(self, prediction_type: str, family: str) -> "Method":
        """This method configured for a model (flow defaults); refused, naming method, family and why, if unsupported."""
        if prediction_type not in self.prediction_types:
            raise ValueError(f"method {self.name!r} does not train {family} models ({prediction_type} prediction): "
                             f"{self.flow_refusal}")
        config = self.config.for_prediction(prediction_type)
        return self if config == self.config else type(self)(config)

    def sample_timesteps(self, n: int, sampling: TimestepSampling, generator: torch.Generator) -> Tensor:
        """Training timesteps for n pairs (or images): the model family's sampling unless the method says otherwise."""
        return sampling.sample(n, generator)

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
        return {f.name: f.metadata["by_prediction"]["ddpm"] if "by_prediction" in f.metadata else f.default
                for f in dataclasses.fields(cls.Config)}

    def options(self) -> dict[str, Any]:
        """Every hyper-parameter as this method uses it (defaults included)."""
        return dataclasses.asdict(self.config)
