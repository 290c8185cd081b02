"""Tiny SD1.5- and SDXL-architecture pipelines built offline from configs (random weights).

They exercise every code path of the trainer in seconds on a CPU; `--model tiny-sd` and
`--model tiny-sdxl` build them once into the cache folder.
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from ..atomic import atomic_dir

TINY_MODELS = ("tiny-sd", "tiny-sdxl")
TEXT_WIDTH = 32


def cache_root() -> Path:
    """Where built models and encodings live: $PREFALIGN_CACHE or ~/.cache/prefalign."""
    return Path(os.environ.get("PREFALIGN_CACHE", Path.home() / ".cache" / "prefalign"))


def write_char_tokenizer(folder: Path) -> int:
    """A CLIP tokenizer over printable ASCII with no merges (one token per character); returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [c for c in string.printable if not c.isspace()]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_char_tokenizer(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)
    tok.save_pretrained(folder)
    return tok


def _text_encoder(vocab_size: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=32, projection_dim=TEXT_WIDTH,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
    )


def _unet(sdxl: bool):
    from diffusers import UNet2DConditionModel

    common = dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
    )
    if not sdxl:
        return UNet2DConditionModel(cross_attention_dim=TEXT_WIDTH, **common)
    return UNet2DConditionModel(
        cross_attention_dim=2 * TEXT_WIDTH, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH, use_linear_projection=True,
        transformer_layers_per_block=(1, 2), **common,
    )


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         steps_offset=1, clip_sample=False)


def build_tiny_pipeline(kind: str, folder: Path, seed: int = 0) -> Path:
    """Build and save a tiny pipeline of `kind` (tiny-sd or tiny-sdxl) into `folder` atomically."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {kind!r}; choose one of {', '.join(TINY_MODELS)}")
    torch.manual_seed(seed)
    with atomic_dir(folder) as tmp:
        tok = _tokenizer(tmp / "_tok")
        if kind == "tiny-sd":
            pipe = StableDiffusionPipeline(
                vae=_vae(), text_encoder=_text_encoder(len(tok), False), tokenizer=tok, unet=_unet(False),
                scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        else:
            pipe = StableDiffusionXLPipeline(
                vae=_vae(), text_encoder=_text_encoder(len(tok), False), text_encoder_2=_text_encoder(len(tok), True),
                tokenizer=tok, tokenizer_2=tok, unet=_unet(True), scheduler=_scheduler(),
            )
        pipe.save_pretrained(tmp)
        for path in (tmp / "_tok").iterdir():
            path.unlink()
        (tmp / "_tok").rmdir()
    return folder


def tiny_model_path(kind: str) -> Path:
    """The cached tiny pipeline of `kind`, built on first use."""
    folder = cache_root() / "models" / kind
    if not (folder / "model_index.json").exists():
        build_tiny_pipeline(kind, folder)
    return folder
