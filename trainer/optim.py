"""Optimiser and learning-rate schedule from the config."""
from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError, TrainConfig


def make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("the model has no trainable adapter parameters (check target_modules)")
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("use_8bit_adam", "needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.max_steps)
