"""Tiny SD1.5-, SDXL-, SD3.5- and Flux.1-architecture pipelines built offline from configs (random weights).

They exercise every code path of the trainer in seconds on a CPU; `--model tiny-sd`, `tiny-sdxl`,
`tiny-sd3` and `tiny-flux` build them once into the cache folder. Tokenizers are written offline: a
character-level CLIP tokenizer and a character-level T5 (SentencePiece-style Unigram) tokenizer.
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from ..atomic import atomic_dir

TINY_MODELS = ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")
TEXT_WIDTH = 32
T5_TOKENS = 16


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


def _t5_tokenizer(folder: Path):
    """A T5 tokenizer over printable ASCII (one piece per character, `</s>` appended), built with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                         model_max_length=T5_TOKENS)
    t5.save_pretrained(folder)
    return t5


def _t5_encoder(vocab_size: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _text_encoder(vocab_size: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=32, projection_dim=TEXT_WIDTH,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(latent_channels: int = 4, **factors: float):
    """`factors`: the 16-channel VAEs' scaling_factor and shift_factor (latents = (z - shift) * scale)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
        **factors,
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


def _sd3_pipeline(tok, t5_tok):
    """SD3.5-medium layout in small: CLIP-L + CLIP-G (penultimate states concatenated, padded to T5's width) and T5;
    MMDiT-X blocks with a second self-attention in block 0 and RMS q/k norms; VAE factors of SD3's 16-channel VAE.
    Heads of 64 and as many blocks as heads, as every SD3 has (ComfyUI derives both from the width)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=128,
        pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_text_encoder(len(tok), True), tokenizer=tok, text_encoder_2=_text_encoder(len(tok), True),
        tokenizer_2=tok, text_encoder_3=_t5_encoder(len(t5_tok), 2 * TEXT_WIDTH), tokenizer_3=t5_tok,
    )


def _flux_pipeline(tok, t5_tok):
    """Flux.1-dev layout in small: pooled CLIP-L + T5, double and single blocks, guidance embedding, RoPE over
    (text, row, column) ids; the dev scheduler (shift by resolution at sampling time); Flux's VAE factors."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_text_encoder(len(tok), False), tokenizer=tok,
        text_encoder_2=_t5_encoder(len(t5_tok), TEXT_WIDTH), tokenizer_2=t5_tok,
    )


def build_tiny_pipeline(kind: str, folder: Path, seed: int = 0) -> Path:
    """Build and save a tiny pipeline of `kind` (one of `TINY_MODELS`) into `folder` atomically."""
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
        elif kind == "tiny-sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=_vae(), text_encoder=_text_encoder(len(tok), False), text_encoder_2=_text_encoder(len(tok), True),
                tokenizer=tok, tokenizer_2=tok, unet=_unet(True), scheduler=_scheduler(),
            )
        else:
            t5_tok = _t5_tokenizer(tmp / "_tok_t5")
            pipe = (_sd3_pipeline if kind == "tiny-sd3" else _flux_pipeline)(tok, t5_tok)
        pipe.save_pretrained(tmp)
        for scratch in (tmp / "_tok", tmp / "_tok_t5"):
            if scratch.exists():
                for path in scratch.iterdir():
                    path.unlink()
                scratch.rmdir()
    return folder


def tiny_model_path(kind: str) -> Path:
    """The cached tiny pipeline of `kind`, built on first use."""
    folder = cache_root() / "models" / kind
    if not (folder / "model_index.json").exists():
        build_tiny_pipeline(kind, folder)
    return folder
