"""Write the smallest checkpoints ComfyUI detects as SD1.5, SDXL or SD3, and a Flux diffusion model with its VAE
(random weights), for integration tests.

Run with ComfyUI's Python: `python make_tiny_checkpoint.py COMFYUI_DIR sd15|sdxl|sd3|flux|flux-vae OUT.safetensors`.
ComfyUI detects the family from state-dict shapes. SD1.5 needs model_channels=320, context_dim=768, conv
projections and no ADM; block counts are free, so a 1-level, 1-res-block UNet is enough (~19M params).
The SDXL family is matched by its transformer-depth pattern: KOALA-700M's `[0, 2, 5]` (a distilled SDXL:
SDXL's conditioning, CLIP-L + CLIP-G, ADM 2816) with `channel_mult=[1, 1, 1]` is ~106M params. Text
encoders and the VAE have fixed shapes in ComfyUI, so they are full size: ~440 MiB (SD1.5) and ~1.8 GiB
(SDXL) in fp16. The keys are written by ComfyUI's own `process_*_state_dict_for_saving`, as its
CheckpointSave does. Never committed.

SD3: ComfyUI's MMDiT detection takes the width from `x_embedder` as 64 x depth (head dim 64, one head per block),
so two blocks are 128 wide; made like SD3.5-medium (RMS q/k norms, a second image attention in block 0). Its text
encoders are CLIP-L + CLIP-G (T5 is optional in ComfyUI's SD3), its VAE a TAESD-shaped one with SD3's 16 latent
channels and scale/shift (what ComfyUI's `taesd3` VAE is): ~820M params, ~1.6 GiB in fp16.
Flux (a file for Load Diffusion Model): ComfyUI's Flux detection fixes the width (3072, 24 heads) and counts the
blocks, so one double and one single block is the smallest it accepts: ~0.5B params, ~1 GiB in bf16. `flux-vae`:
a TAESD-shaped VAE with Flux's 16 channels and scale/shift (as ComfyUI's `taef1`), for Load VAE.
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


SD3 = dict(in_channels=16, patch_size=2, out_channels=16, depth=2, adm_in_channels=2048, input_size=None,
           context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
           num_patches=1024, pos_embed_max_size=32, qk_norm="rms", pos_embed_scaling_factor=None, x_block_self_attn_layers=[0])
FLUX = dict(image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768, context_in_dim=4096,
            hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
            theta=10000, qkv_bias=True, guidance_embed=True)
TAESD_SCALE = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}  # ComfyUI's VAELoader for taesd3 / taef1


def tiny_vae(family: str):
    """Variance-keeping random weights (std 1/sqrt(fan-in)): with randomize()'s 0.02 the decoder's images are black
    whatever the latent, and no change of the model could show in them."""
    import math

    import torch
    from comfy.taesd.taesd import TAESD

    vae = TAESD(latent_channels=16)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 1 / math.sqrt(p[0].numel())) if p.dim() > 1 else p.zero_()
        vae.vae_scale.fill_(TAESD_SCALE[family][0])
        vae.vae_shift.fill_(TAESD_SCALE[family][1])
    return vae


def save(sd: dict, out: str, dtype) -> None:
    import torch
    from safetensors.torch import save_file

    sd = {k: v.detach().to(dtype).contiguous() for k, v in sd.items() if v.is_floating_point()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    save_file(sd, str(tmp))
    tmp.replace(out)
    print(f"wrote {out}: {sum(v.numel() for v in sd.values()) / 1e6:.1f}M params")


def save_checkpoint(config, unet, clip, vae, out: str) -> None:
    """A Load Checkpoint file in float16, keyed as ComfyUI's CheckpointSave keys it (the config's
    `process_*_state_dict_for_saving`); the text encoders' position_ids are left out."""
    import torch

    clip_sd = {k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    save({**config.process_unet_state_dict_for_saving(unet.state_dict()),
          **config.process_clip_state_dict_for_saving(clip_sd),
          **config.process_vae_state_dict_for_saving(vae.state_dict())}, out, torch.float16)


def flow_files(family: str, out: str) -> None:
    import torch

    import comfy.ops
    import comfy.supported_models as sm
    import comfy.text_encoders.sd3_clip
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    torch.manual_seed(0)
    if family == "flux-vae":
        return save(tiny_vae("flux").state_dict(), out, torch.float16)
    if family == "flux":
        model = Flux(**FLUX, operations=comfy.ops.manual_cast)
        randomize(model)
        return save(model.state_dict(), out, torch.bfloat16)
    config = sm.SD3(dict(SD3))
    unet = OpenAISignatureMMDITWrapper(**SD3, operations=comfy.ops.manual_cast)
    clip = comfy.text_encoders.sd3_clip.SD3ClipModel(clip_l=True, clip_g=True, t5=False, device="cpu", dtype=torch.float32)
    vae = tiny_vae("sd3")
    for module in (unet, clip):
        randomize(module)
    save_checkpoint(config, unet, clip, vae, out)


def main(comfy_dir: str, family: str, out: str) -> None:
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]  # comfy.cli_args reads sys.argv on import, when enabled
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    if family in ("sd3", "flux", "flux-vae"):
        return flow_files(family, out)

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
    save_checkpoint(config, unet, clip, vae, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
