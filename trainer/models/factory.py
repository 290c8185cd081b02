"""The backend a training config asks for: the model's family decides the loader and the backend class."""
from __future__ import annotations

import torch

from ..config import TrainConfig
from ..forward_process import TimestepSampling
from .diffusers_backend import DiffusersBackend
from .flow_loading import check_family_options, load_flow_components, model_family
from .flux_backend import FluxBackend
from .loading import Components, load_components
from .lora import LoraSpec
from .sd3_backend import SD3Backend
from .unet_backend import UNetBackend

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS: dict[str, type[DiffusersBackend]] = {"unet": UNetBackend, "sd3": SD3Backend, "flux": FluxBackend}


def load_model_components(model: str, vae: str | None = None, model_config: str | None = None, drop_t5: bool = False,
                          quantize: str = "no", weight_dtype: torch.dtype = torch.float32,
                          family: str | None = None) -> Components:
    """The frozen components of any family the trainer knows (the family decides the loader; `family`: already
    known from `model_family(model)`, which reads the pipeline index or the file's header)."""
    family = family or model_family(model)
    if family == "unet":
        return load_components(model, vae, model_config=model_config)
    return load_flow_components(model, family, vae, model_config, drop_t5, quantize, weight_dtype)


def make_backend(config: TrainConfig, device: torch.device) -> DiffusersBackend:
    """Load `config.model` (any family) with a fresh LoRA, on `device`; bad options stop before loading."""
    family = model_family(config.model)
    check_family_options(family, config.drop_t5, config.quantize, device)
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision] if device.type == "cuda" else torch.float32
    parts = load_model_components(config.model, config.vae, config.model_config, config.drop_t5, config.quantize,
                                  weight_dtype, family)
    cls = BACKENDS[family]
    lora = LoraSpec.from_config(config, parts.architecture)
    sampling = TimestepSampling(int(parts.scheduler.config.num_train_timesteps),
                                config.timestep_sampling or cls.default_timestep_sampling,
                                config.logit_mean, config.logit_std, config.mode_scale)
    extra = {"guidance": config.guidance} if family == "flux" else {}
    return cls(parts, lora, device=device, weight_dtype=weight_dtype, gradient_checkpointing=config.gradient_checkpointing,
               seed=config.seed, compile=config.compile, timestep_sampling=sampling, **extra)
