"""Write the smallest checkpoints ComfyUI detects as SD1.5 or SDXL (random weights), for integration tests.

Run with ComfyUI's Python: `python make_tiny_checkpoint.py COMFYUI_DIR sd15|sdxl OUT.safetensors`.
ComfyUI detects the family from state-dict shapes. SD1.5 needs model_channels=320, context_dim=768, conv
projections and no ADM; block counts are free, so a 1-level, 1-res-block UNet is enough (~19M params).
The SDXL family is matched by its transformer-depth pattern: KOALA-700M's `[0, 2, 5]` (a distilled SDXL:
SDXL's conditioning, CLIP-L + CLIP-G, ADM 2816) with `channel_mult=[1, 1, 1]` is ~106M params. Text
encoders and the VAE have fixed shapes in ComfyUI, so they are full size: ~440 MiB (SD1.5) and ~1.8 GiB
(SDXL) in fp16. The keys are written by ComfyUI's own `process_*_state_dict_for_saving`, as its
CheckpointSave does. Never committed.
"""
from __future__ import annotations

import sys
from pathlib import Path

UNETS = {
    "sd15": dict(num_res_blocks=[1], channel_mult=(1,), num_heads=8, transformer_depth=[1], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1], context_dim=768, use_linear_in_transformer=False),
    "sdxl": dict(num_res_blocks=[1, 1, 1], channel_mult=(1, 1, 1), num_head_channels=64, transformer_depth=[0, 2, 5],
                 transformer_depth_middle=1, transformer_depth_output=[0, 0, 2, 2, 5, 5], context_dim=2048,
                 use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816),
}
VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def randomize(module) -> None:
    """ComfyUI's ops skip initialisation: small random matrices, unit norms, zero biases."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def main(comfy_dir: str, family: str, out: str) -> None:
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]  # comfy.cli_args reads sys.argv on import, when enabled
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import save_file

    import comfy.ops
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models as sm
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, use_spatial_transformer=True,
                     legacy=False, operations=comfy.ops.manual_cast, **UNETS[family])
    config_class, clip_class = {"sd15": (sm.SD15, comfy.sd1_clip.SD1ClipModel),
                                "sdxl": (sm.KOALA_700M, comfy.sdxl_clip.SDXLClipModel)}[family]
    config = config_class(dict(config_class.unet_config))
    clip = clip_class(device="cpu", dtype=torch.float32)
    vae = AutoencoderKL(ddconfig=VAE, embed_dim=4)
    for module in (unet, clip, vae):
        randomize(module)
    clip_sd = {k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    sd = {**config.process_unet_state_dict_for_saving(unet.state_dict()),
          **config.process_clip_state_dict_for_saving(clip_sd),
          **config.process_vae_state_dict_for_saving(vae.state_dict())}
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items() if v.is_floating_point()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    save_file(sd, str(tmp))
    tmp.replace(out)
    print(f"wrote {out}: {sum(v.numel() for v in sd.values()) / 1e6:.1f}M params")


if __name__ == "__main__":
    main(*sys.argv[1:4])
