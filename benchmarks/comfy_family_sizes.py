"""What training a preference LoRA on each ComfyUI family holds on the GPU at 1024 px, one pair (arithmetic).

Run with ComfyUI's Python: `COMFY_VENV/bin/python benchmarks/comfy_family_sizes.py COMFYUI_DIR [--no-write]`.

Each family's diffusion model is ComfyUI's own class at its released size (the configs ComfyUI's model detection
gives the released checkpoints), built on the meta device (no memory, no weights), so the parameter counts and the
LoRA size of the Train node's preset (`nodes/comfy_families.py`) are exact. The rest is arithmetic:

- weights (parameters and buffers) as Load Diffusion Model holds them: bf16 (2 bytes each) or fp8 (1 byte);
- the LoRA at rank 16 with AdamW: fp32 weights, gradients and two moments, 16 bytes a parameter;
- activations with gradient checkpointing (the blocks the node wraps), bf16, one pair (chosen + rejected = 2
  images): each block keeps a copy of its input sequence, 2 x tokens x width x 2 bytes; one block's internals are
  recomputed at a time, taken as 15 block inputs (the MLP's 4x width and the attention's q/k/v/out);
- tokens: a 1024 px image is 128 x 128 latents, 4096 patches of 2 x 2 (Wan 2.2's 16x VAE: 1024); text tokens in
  the joint sequence as ComfyUI's encoders give them for a short prompt (T5 for SD3 77 + CLIP 77, Flux/Chroma T5
  256, Qwen-Image's and Lumina's LLM ~128, HiDream T5 128 + Llama 128; Wan attends to text by cross-attention).
Writes RESULTS.md section `comfy_family_sizes`; docs/memory.md's ComfyUI table is this output.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # results.py
from results import load_pack, publish  # noqa: E402

GB = 1e9

# family -> (ComfyUI config class, released config as ComfyUI's detection gives it, width, image tokens, text tokens)
SD35M = dict(in_channels=16, patch_size=2, out_channels=16, depth=24, adm_in_channels=2048, input_size=None,
             context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
             num_patches=147456, pos_embed_max_size=384, qk_norm="rms", pos_embed_scaling_factor=None,
             x_block_self_attn_layers=list(range(13)))
SD35L = dict(SD35M, depth=38, num_patches=36864, pos_embed_max_size=192, x_block_self_attn_layers=[],
             context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 2432}})
FLUX = dict(image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768, context_in_dim=4096,
            hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
            theta=10000, qkv_bias=True, guidance_embed=True)
CHROMA = dict(FLUX, image_model="chroma", in_channels=64, out_channels=64, in_dim=64, out_dim=3072, hidden_dim=5120,
              n_layers=5)
CHROMA.pop("vec_in_dim")
CHROMA.pop("guidance_embed")
WAN = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True,
           cross_attn_norm=True, eps=1e-6, text_dim=4096)
FAMILIES = {
    "SD3.5-medium": ("SD3", SD35M, 1536, 4096, 154),
    "SD3.5-large": ("SD3", SD35L, 2432, 4096, 154),
    "Flux.1-dev": ("Flux", FLUX, 3072, 4096, 256),
    "Chroma": ("Chroma", CHROMA, 3072, 4096, 256),
    "Qwen-Image": ("QwenImage", dict(image_model="qwen_image", num_layers=60), 3072, 4096, 128),
    "HiDream-I1": ("HiDream", dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=16,
                                   num_single_layers=32, attention_head_dim=128, num_attention_heads=20,
                                   caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
                                   num_activated_experts=2, axes_dims_rope=[64, 32, 32], max_resolution=[128, 128],
                                   llama_layers=list(range(32)) + [31] * 16), 2560, 4096, 256),
    "Lumina 2": ("Lumina2", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=2304, cap_feat_dim=2304,
                                 n_layers=26, n_heads=24, n_kv_heads=8, qk_norm=True, axes_dims=[32, 32, 32],
                                 axes_lens=[300, 512, 512]), 2304, 4096, 128),
    "Wan 2.1 T2V 1.3B": ("WAN21_T2V", dict(WAN, in_dim=16, out_dim=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), 1536, 4096, 0),
    "Wan 2.1 T2V 14B": ("WAN21_T2V", dict(WAN, in_dim=16, out_dim=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40), 5120, 4096, 0),
    "Wan 2.2 TI2V 5B": ("WAN22_T2V", dict(WAN, in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30), 3072, 1024, 0),
}
RANK = 16


def sizes(comfy_dir: str) -> list[dict]:
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    import comfy.supported_models as sm

    load_pack()
    from prefalign_pack.nodes.comfy_families import family_of
    from prefalign_pack.nodes.comfy_lora import linear_layers, matches_target

    rows = []
    for name, (config_name, unet_config, width, image_tokens, text_tokens) in FAMILIES.items():
        config = getattr(sm, config_name)(dict(unet_config))
        with torch.device("meta"):
            base = config.get_model({}, device="meta")
        model = base.diffusion_model
        modules = dict(base.named_modules())
        targets = family_of(base).targets
        targeted = {n for n in linear_layers(base.named_modules()) if matches_target(n, targets)}
        lora = sum(RANK * (modules[n].weight.shape[0] + modules[n].weight[0].numel()) for n in targeted)
        blocks = sum(1 for list_name, c in model.named_children() if isinstance(c, torch.nn.ModuleList)  # transformer
                     for i in range(len(c)) if any(t.startswith(f"diffusion_model.{list_name}.{i}.") for t in targeted))
        weights = sum(t.numel() for t in [*model.parameters(), *model.buffers()])  # SD3's positional table is a buffer
        rows.append({"family": name, "params": weights, "lora": lora, "blocks": blocks, "width": width,
                     "tokens": image_tokens + text_tokens})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| family | parameters | weights bf16 / fp8 | LoRA rank 16 (+AdamW) | blocks x tokens x width | "
             "activations, checkpointed | expected peak, fp8 / bf16 |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        kept = 2 * r["tokens"] * r["width"] * 2  # one pair, bf16: each block's input copy
        acts = (r["blocks"] + 15) * kept
        lora = r["lora"] * 16
        extra = lora + acts + 1.5 * GB  # + CUDA context and allocator slack
        lines.append(f"| {r['family']} | {r['params'] / 1e9:.2f} B | {2 * r['params'] / GB:.1f} / {r['params'] / GB:.1f} GB | "
                     f"{r['lora'] / 1e6:.0f} M ({lora / GB:.2f} GB) | {r['blocks']} x {r['tokens']} x {r['width']} | "
                     f"{acts / GB:.1f} GB | {(r['params'] + extra) / GB:.0f} / {(2 * r['params'] + extra) / GB:.0f} GB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comfy_dir")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    publish("comfy_family_sizes", table(sizes(args.comfy_dir)), write=not args.no_write)


if __name__ == "__main__":
    main()
