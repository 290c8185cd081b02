"""Write the smallest checkpoint ComfyUI detects as SD1.5 (random weights), for integration tests.

Run with ComfyUI's Python: `python make_tiny_sd15.py COMFYUI_DIR OUT.safetensors`.
ComfyUI detects the family from state-dict shapes: SD1.5 needs model_channels=320, context_dim=768, conv
projections and no ADM; block counts are free, so a 1-level, 1-res-block UNet is enough. CLIP-L and the
VAE have fixed shapes in ComfyUI, so they are full size (~440 MiB in fp16). Never committed.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(comfy_dir: str, out: str) -> None:
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]  # comfy.cli_args reads sys.argv on import, when enabled
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import save_file

    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    ops = comfy.ops.manual_cast
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                     channel_mult=(1,), num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                     transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768, legacy=False,
                     use_linear_in_transformer=False, operations=ops)
    sd = {}
    for module in unet.modules():  # ComfyUI's ops skip init: give every weight small random values
        for name, p in module.named_parameters(recurse=False):
            with torch.no_grad():
                if name == "weight" and p.dim() > 1:
                    torch.nn.init.normal_(p, std=0.02)
                elif name == "weight":
                    p.fill_(1.0)
                else:
                    p.zero_()
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    for name, p in clip.named_parameters():
        with torch.no_grad():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
            elif "weight" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    sd.update({f"cond_stage_model.{k}": v for k, v in clip.state_dict().items() if not k.endswith("position_ids")})
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    for name, p in vae.named_parameters():
        with torch.no_grad():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
            elif "weight" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items() if v.is_floating_point()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, out)
    print(f"wrote {out}: {sum(v.numel() for v in sd.values()) / 1e6:.1f}M params")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
