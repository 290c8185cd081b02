"""The model interface the training loop drives: the diffusers backend and ComfyUI's implement it.

Timesteps are integers in [0, num_train_timesteps) that grow with the noise (trainer/forward_process.py maps
them to each family's alphas or flow sigmas). Conditioning is a dict of batch-first tensors (`prompt_embeds`
and `pooled`; SDXL adds `time_ids`, SD3 keeps `clip_embeds`/`t5_embeds` apart) so it can be cached, indexed
and concatenated.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, Sequence

import torch
from torch import Tensor, nn

from ..forward_process import TimestepSampling

Cond = dict[str, Tensor]


class Backend(Protocol):
    num_train_timesteps: int
    prediction_type: str  # "epsilon", "v_prediction" or "flow" (rectified flow: SD3, Flux)
    alphas_cumprod: Tensor | None  # DDPM schedule [num_train_timesteps] (NCP's posterior step); None for flow
    timestep_sampling: TimestepSampling  # how the family draws training timesteps
    # CLIP-space embeddings its encodings carry without a separate embedder (RPO's distances): "prompt" when the
    # text encoder gives a pooled vector; image embeddings always need the embedder (models/embedder.py)
    embeddings: frozenset[str]
    device: torch.device

    @property
    def model(self) -> nn.Module:
        """The trainable network (what accelerate wraps)."""

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Text conditioning for each prompt (no grad); includes `pooled`, a per-prompt vector."""

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels [N, 3, H, W] in [-1, 1] -> latents scaled for the model (no grad)."""

    def release_encoders(self) -> None:
        """Every encoding the run needs is cached: the VAE and text encoders may leave the accelerator
        (an encode call brings them back)."""

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The forward process x_t."""

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the model is trained to predict (eps, v, or the flow velocity noise - latents)."""

    def predict(self, noisy: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        """The policy's prediction (adapter enabled, with grad)."""

    def reference(self) -> AbstractContextManager[None]:
        """Inside this context `predict` is the reference: the trainable adapter is switched off."""

    def encoder_features(self, sample: Tensor, timesteps: Tensor, cond: Cond) -> Tensor:
        """Noise-conditioned features of the frozen pretrained encoder (NCP space), flattened [N, F]."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's parameters, and nothing else."""

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapter's weights, for checkpoints."""

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `adapter_state_dict` output exactly."""

    def export_lora(self) -> dict[str, Tensor]:
        """The adapter under the names of the family's LoRA file (trainer/models/lora.py)."""

    def model_info(self) -> dict[str, str]:
        """Base-model facts for the LoRA metadata: at least `name`, `hash` and `architecture` (sd15/sdxl/sd3/flux/...)."""
