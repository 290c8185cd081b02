"""Full-size denoisers on a GPU: SD1.5-, SDXL-, SD3.5-medium- and Flux.1-size, random weights, bf16, LoRA DPO.

For each (model, batch 1..4, gradient checkpointing off/on) it runs `trainer.loop.train` on cached
latents (method dpo by default) and reports the step time, the floor ratio (as step_time.py: bare
UNet forward+backward on 2B + no-grad reference forward on 2B, interleaved in the same run) and the
CUDA peak memory (`max_memory_allocated`) of the training steps. Goal: SDXL LoRA DPO at batch 1 with
checkpointing under 16 GB.

The UNets have the real architectures (SD1.5: 860M parameters at 512 px; SDXL: 2.6B at 1024 px) with
random weights, built directly on the GPU; so do the transformers (`sd35m`: SD3.5-medium's MMDiT-X, 2.5B;
`flux`: Flux.1-dev's, 11.9B; both at 1024 px, the family's default LoRA targets; no floor ratio for them,
since the floor is the UNet's). The VAE (8x) and text encoders are small random stand-ins of the right
output widths (T5's 4096 too), used only to fill the cache. The real encoders would add their weights
if left on the GPU: SD1.5 ~0.6 GB (CLIP-L bf16 + VAE fp32), SDXL ~2.0 GB (CLIP-L + bigG bf16 + VAE
fp32); the "+ real encoders" column adds that.

No GPU was available when this script was written; on a machine without one, `--smoke` runs the same
code on the CPU with narrow UNets (a correctness check, not a measurement) and writes nothing.

    python benchmarks/gpu_sizes.py [--quick] [--models sd15,sdxl,sd35m,flux] [--batches 1,2,4] [--method dpo]

Results go to benchmarks/RESULTS.md, section `gpu_sizes`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from harness import InterleavedTimer, MethodCase, fmt, make_floor, make_pairs

import torch

from benchmarks.results import write_section
from trainer.batches import BatchStream
from trainer.config import make_config
from trainer.distributed import Ranks
from trainer.loop import TrainHooks, train
from trainer.methods import build_method

GiB = 1 << 30
#: resident weights of the real encoders that the random stand-ins replace (bf16 text encoders, fp32 VAE)
REAL_ENCODERS_GIB = {"sd15": (123e6 * 2 + 83.7e6 * 4) / GiB, "sdxl": ((123e6 + 695e6) * 2 + 83.7e6 * 4) / GiB,
                     "sd35m": ((123e6 + 695e6 + 4.76e9) * 2 + 83.8e6 * 4) / GiB,  # CLIP-L, CLIP-G, T5-XXL; 16-ch VAE
                     "flux": ((123e6 + 4.76e9) * 2 + 83.8e6 * 4) / GiB}
RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd35m": 1024, "flux": 1024}
TRANSFORMERS = ("sd35m", "flux")


NOT_MEASURED = """\
**Not measured yet: no GPU was available** where these benchmarks were written and run. On a machine
with a CUDA GPU, run (each writes its own `*_gpu` section here; ratios are measured within one run):

```
python benchmarks/gpu_sizes.py                      # SD1.5/SDXL-size UNets, batch 1/2/4, checkpointing off/on
python benchmarks/gpu_sizes.py --models sd35m,flux --batches 1   # SD3.5-medium / Flux.1-size transformers
python benchmarks/step_time.py                      # trainer / floor per method (tiny-sd, bf16)
python benchmarks/step_time.py --model PATH_TO_SDXL --resolution 1024 --batch 1 --checkpointing --methods dpo,sft
python benchmarks/encoding.py                       # per-step encoding vs cached
python benchmarks/memory.py                         # CUDA max allocated per method
```

`python benchmarks/gpu_sizes.py --smoke` runs the same code on the CPU with narrow UNets (a correctness
check of the script, not a measurement).
"""


def unet_config(kind: str, narrow: bool = False) -> dict:
    if kind == "sd15":
        config = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                      cross_attention_dim=768, attention_head_dim=8)
    else:
        config = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816)
    if narrow:  # --smoke: same structure, a tenth of the width, one transformer layer
        config["block_out_channels"] = tuple(c // 10 for c in config["block_out_channels"])
        config["norm_num_groups"] = 8
        config["attention_head_dim"] = 4 if kind == "sd15" else (2, 4, 8)
        if kind == "sdxl":
            config["transformer_layers_per_block"] = 1
    return config


def transformer(kind: str, narrow: bool = False):
    """SD3.5-medium's or Flux.1-dev's transformer config (diffusers' config.json of those models); `narrow`: the
    same blocks, two or three of them, a few heads."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if kind == "sd35m":
        config = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                      attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                      pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                      qk_norm="rms_norm")
        if narrow:
            config.update(num_layers=2, num_attention_heads=2, caption_projection_dim=128, dual_attention_layers=(0,),
                          joint_attention_dim=128, pooled_projection_dim=64)
        return SD3Transformer2DModel(**config)
    config = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
    if narrow:
        config.update(num_layers=1, num_single_layers=2, num_attention_heads=2)
    return FluxTransformer2DModel(**config)


def build_parts(kind: str, device: torch.device, narrow: bool, folder: Path):
    """Components with a full-size random denoiser (on the device) and small random encoders."""
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from trainer.models.loading import Components
    from trainer.models.tiny import write_char_tokenizer

    size = write_char_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"), model_max_length=77)

    def encoder(width: int, projection: bool):
        config = CLIPTextConfig(vocab_size=size, hidden_size=width, intermediate_size=64, num_attention_heads=4,
                                num_hidden_layers=1, max_position_embeddings=77, projection_dim=width,
                                bos_token_id=size - 2, eos_token_id=size - 1, pad_token_id=size - 1)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    def t5(width: int):
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config(vocab_size=size, d_model=width, d_kv=8, d_ff=64, num_layers=1, num_heads=4))

    torch.manual_seed(0)
    with torch.device(device):
        denoiser = transformer(kind, narrow) if kind in TRANSFORMERS else UNet2DConditionModel(**unet_config(kind, narrow))
    latent_channels = 16 if kind in TRANSFORMERS else 4
    vae = AutoencoderKL(block_out_channels=[8, 16, 32, 32], layers_per_block=1, latent_channels=latent_channels,
                        norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4)
    t5_width = denoiser.config.get("joint_attention_dim", 0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False)
    if kind == "sd15":
        encoders, tokenizers = [encoder(768, False)], [tokenizer]
    elif kind == "sdxl":
        encoders, tokenizers = [encoder(768, False), encoder(1280, True)], [tokenizer, tokenizer]
    elif kind == "sd35m":
        encoders = [encoder(768 if not narrow else 32, True), encoder(1280 if not narrow else 32, True), t5(t5_width)]
        tokenizers = [tokenizer, tokenizer, tokenizer]
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    else:
        encoders, tokenizers = [encoder(768, False), t5(t5_width)], [tokenizer, tokenizer]
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    for module in [denoiser, vae, *encoders]:
        module.requires_grad_(False)
        module.eval()
    architecture = {"sd35m": "sd3"}.get(kind, kind)
    return Components(name=f"random-{kind}", denoiser=denoiser, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                      scheduler=scheduler, architecture=architecture, hash=f"random-{kind}{'-narrow' if narrow else ''}")


def run_case(kind: str, batch: int, checkpointing: bool, args, tmp: Path, device: torch.device) -> dict:
    from trainer.models.factory import BACKENDS
    from trainer.models.lora import DEFAULT_TARGETS, LoraSpec

    resolution = 64 if args.smoke else RESOLUTION[kind]
    mp = "bf16" if device.type == "cuda" else "no"
    row = {"model": kind, "resolution": resolution, "batch": batch, "checkpointing": checkpointing}
    backend = None
    try:
        parts = build_parts(kind, device, args.smoke, tmp)
        cls = BACKENDS["unet" if kind not in TRANSFORMERS else parts.architecture]
        backend = cls(parts, LoraSpec(args.rank, args.rank, DEFAULT_TARGETS[parts.architecture]), device=device,
                      weight_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                      gradient_checkpointing=checkpointing)
        pairs = make_pairs(max(8, 2 * batch), resolution)
        case = MethodCase(args.method, args.method)
        every = 2 if args.quick or args.smoke else 3
        intervals = 1 if args.smoke else 2 if args.quick else 4
        config = make_config(dict(model=f"random-{kind}", data="synthetic pairs", resolution=resolution,
                                  batch_size=batch, method=args.method, learning_rate=1e-5, rank=args.rank,
                                  alpha=float(args.rank), checkpoint_every=0, cache_dir=str(tmp / "cache"),
                                  output_dir=str(tmp / f"out-{kind}-{batch}-{checkpointing}"),
                                  mixed_precision=mp, gradient_checkpointing=checkpointing, seed=0,
                                  max_steps=every * (intervals + 1), log_every=every))
        method = build_method(args.method)
        stream = BatchStream(config, backend, pairs, method, Ranks.single(device))  # fills the cache
        floor = make_floor(backend, case, stream.next_batch().local, mp) if kind not in TRANSFORMERS else None
        del stream
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        timer = InterleavedTimer(floor, every, 1, device)  # transformers: no floor, trainer intervals only
        train(config, backend, pairs, TrainHooks(on_step=timer))
        row.update(step=timer.step_s(), wall=time.perf_counter() - start)
        if floor is not None:
            row.update(floor=timer.floor_s(), ratio=timer.ratio())
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB
            row["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GiB
    except torch.cuda.OutOfMemoryError:
        row["oom"] = True
    finally:
        del backend
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 2, fewer steps")
    parser.add_argument("--smoke", action="store_true", help="CPU correctness run with narrow UNets; writes nothing")
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
    parser.add_argument("--method", default="dpo")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        write_section("gpu_sizes", NOT_MEASURED)
        raise SystemExit("gpu_sizes.py needs a CUDA GPU (use --smoke for a CPU correctness run); "
                         "wrote the 'not measured' note to RESULTS.md")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        batches = [b for b in batches if b <= 2]
    if args.smoke:
        batches = batches[:1]
    flags = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    rows = []
    with tempfile.TemporaryDirectory(prefix="prefalign-bench-") as tmp:
        for kind in args.models.split(","):
            for batch in batches:
                for checkpointing in flags:
                    rows.append(run_case(kind, batch, checkpointing, args, Path(tmp), device))
    if args.smoke:
        return
    lines = [
        f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, LoRA rank {args.rank} (the family's default "
        "targets: UNets to_q/k/v/out, transformers attention and MLPs), "
        f"method {args.method}, bf16 weights and autocast, random weights, cached latents. Step = "
        "`trainer.loop.train` per optimiser step; ratio = step / floor (bare UNet fwd+bwd on 2B + no-grad "
        "reference fwd on 2B, same run). Peak = CUDA max allocated during training (UNet, LoRA, optimiser, "
        "activations; the random stand-in encoders are a few MB); + real encoders = peak + the real "
        "text encoders' and VAE's weights if they stay on the GPU. Goal: SDXL DPO batch 1 with "
        "checkpointing < 16 GB.",
        "",
        "| model | px | batch (pairs) | checkpointing | s/step | ratio | peak GiB | + real encoders GiB |",
        "|---|---:|---:|:-:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gc = "on" if r["checkpointing"] else "off"
        if r.get("oom"):
            lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | {gc} | OOM | - | - | - |")
            continue
        lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | {gc} | {fmt(r['step'], 3)} | "
                     f"{fmt(r.get('ratio', float('nan')))} | {fmt(r['peak_gib'], 1)} | {fmt(r['peak_gib'] + REAL_ENCODERS_GIB[r['model']], 1)} |")
    write_section("gpu_sizes", "\n".join(lines))


if __name__ == "__main__":
    main()
