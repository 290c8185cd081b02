"""Small fakes of the diffusion transformers ComfyUI runs, one per family, for the Train node's family tests.

Each fake follows what the node relies on in ComfyUI 0.3.64 (checked there by tests/comfyui/family_probe.py on
ComfyUI's real classes):
- the config class name (`comfy/supported_models.py`) and the module paths of the family's transformer blocks
  (`comfy/ldm/*`), as comfy.ops layers with `weight_function` hooks, weights made under inference mode;
- the model sampling: fake_comfy's `ModelSamplingDiscreteFlow` (SD3 shift 3, HiDream 3, Lumina 2 shift 6, Wan
  shift 8; timestep = 1000 sigma) or `ModelSamplingFlux` (Flux, Chroma, Qwen-Image; shifted exp table, timestep =
  sigma); both CONST: x = (1 - sigma) x0 + sigma noise and `apply_model` returns x0 = x - sigma v;
- `extra_conds` as the family's `model_base` class builds them (pooled `y`, Flux's `guidance` defaulting to
  3.5 and Chroma's to 0, HiDream's Llama states, Lumina's attention mask and token count), and `apply_model`
  records what reached it;
- the text encoder's output length: CLIP chunks of 77, Flux's T5 at least 256 tokens, Wan's umT5 at least 512,
  the LLM encoders (Qwen-Image, Lumina 2, HiDream's Llama) as long as the prompt; widths are small;
- Flux's and Chroma's blocks update their residual stream in place after it was saved for backward, as
  ComfyUI's do (`txt += ...`, `addcmul_`);
- video latents (Wan, and Qwen-Image through the Wan VAE) have a frame axis.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

fake = sys.modules["prefalign_fake_comfy"]

D = 8  # hidden width of every fake
CTX = 8  # text encoder width


class Linear(fake.PatchedWeights, nn.Linear):
    """A comfy.ops Linear of `a * D` -> `b * D` features used as D -> D: the input is repeated a times, the
    output's b chunks summed (the shapes of fused layers such as qkv and Flux's linear1, for the file names)."""

    def __init__(self, a: int = 1, b: int = 1) -> None:
        super().__init__(a * D, b * D)
        self.a, self.b = a, b

    def forward(self, h):
        w, bias = self.weight.to(h.dtype), self.bias.to(h.dtype)  # comfy.ops: cast to the compute dtype, then wrappers
        for f in self.weight_function:
            w = f(w)
        out = F.linear(h.repeat(*[1] * (h.dim() - 1), self.a), w, bias)
        return out.view(*out.shape[:-1], self.b, D).sum(-2)


class Block(nn.Module):
    """A transformer block: its linears in order on the joint sequence, then image tokens attend to text tokens.
    `in_place`: the residual stream is updated with `+=` after a norm saved it (Flux/Chroma in ComfyUI)."""

    def __init__(self, layers: dict[str, tuple[int, int]], in_place: bool) -> None:
        super().__init__()
        self.paths = list(layers)
        for path, (a, b) in layers.items():
            _set(self, path, Linear(a, b))
        self.in_place = in_place

    def forward(self, img, txt):
        h = torch.cat([txt, img], dim=1)
        for path in self.paths:
            normed = F.layer_norm(h, (D,))  # saves h for backward
            update = 0.3 * torch.tanh(_get(self, path)(normed))
            if self.in_place:
                h += update
            else:
                h = h + update
        txt, img = h[:, :txt.shape[1]], h[:, txt.shape[1]:]
        attn = torch.softmax(img @ txt.transpose(1, 2) / math.sqrt(D), dim=-1)
        return img + attn @ txt, txt


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        child = root._modules.get(part)
        if child is None:
            child = nn.ModuleList() if parts[i + 1].isdigit() else nn.Module()
            root.add_module(part, child)
        root = child
    if isinstance(root, nn.ModuleList):
        while len(root) <= int(parts[-1]):
            root.append(nn.Identity())
        root[int(parts[-1])] = module
    else:
        root.add_module(parts[-1], module)


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


class DiT(nn.Module):
    """Patchify 2x2 -> img_in; text -> txt_in; the family's blocks; back to the latent layout (the velocity)."""

    def __init__(self, blocks: dict[str, dict[str, tuple[int, int]]], channels: int, in_place: bool) -> None:
        super().__init__()
        self.channels = channels
        self.img_in = fake.Linear(4 * channels, D)
        self.txt_in = fake.Linear(CTX, D)
        self.out = fake.Linear(D, 4 * channels)
        self.order = []
        for container, layers in blocks.items():
            for i in range(2):
                _set(self, f"{container}.{i}", Block(layers, in_place))
                self.order.append(f"{container}.{i}")

    def forward(self, x, t, context, vec):
        b, c, h, w = x.shape
        tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
        img = self.img_in(tokens) + vec[:, None]
        txt = self.txt_in(context)
        for path in self.order:
            img, txt = _get(self, path)(img, txt)
        out = self.out(img).view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return out


class ModelSamplingFlux(fake.CONST):
    """comfy.model_sampling.ModelSamplingFlux: sigma(t) = e^mu / (e^mu + 1/t - 1) over 10000 steps, timestep = sigma."""

    def __init__(self, shift: float = 1.15) -> None:
        t = torch.arange(1, 10001) / 10000
        self.sigmas = math.exp(shift) / (math.exp(shift) + (1 / t - 1))

    def timestep(self, sigma):
        return sigma


class Cond(fake.CondCrossAttn):
    pass


class Constant:
    def __init__(self, value):
        self.cond = value

    def process_cond(self, batch_size, **kwargs):
        return self


class LatentFormat:
    def __init__(self, shift: float, scale: float, video: bool) -> None:
        self.shift, self.scale = shift, scale
        self.latent_dimensions = 3 if video else 2

    def process_in(self, latent):
        return (latent - self.shift) * self.scale


class FamilyModel(nn.Module):
    """A fake ComfyUI BaseModel of one family (see `FAMILIES`)."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec
        self.model_config = spec["config"]()
        self.diffusion_model = DiT(spec["blocks"], spec.get("channels", 16), spec.get("in_place", False))
        self.model_sampling = spec["sampling"]()
        self.latent_format = LatentFormat(0.1, 0.5, spec.get("video", False))
        self.received: list[dict] = []

    def get_dtype(self):
        return torch.float32

    def process_latent_in(self, latent):
        return self.latent_format.process_in(latent)

    def extra_conds(self, **kw):
        out = {"c_crossattn": Cond(kw["cross_attn"])}
        if self.spec.get("pooled"):  # model_base.SD3/Flux/HiDream.encode_adm: kwargs["pooled_output"]
            out["y"] = Cond(kw["pooled_output"])
        if "guidance_default" in self.spec:
            out["guidance"] = Cond(torch.tensor([kw.get("guidance", self.spec["guidance_default"])]))
        if kw.get("conditioning_llama3") is not None:
            out["encoder_hidden_states_llama3"] = Cond(kw["conditioning_llama3"])
        if kw.get("attention_mask") is not None:
            out["attention_mask"] = Cond(kw["attention_mask"])
            out["num_tokens"] = Constant(int(kw["attention_mask"].sum()))
        return out

    def apply_model(self, x, t, c_crossattn=None, y=None, guidance=None, encoder_hidden_states_llama3=None,
                    attention_mask=None, num_tokens=None, **kwargs):
        assert not kwargs, f"unexpected conditioning {sorted(kwargs)}"
        if self.spec.get("video"):
            assert x.dim() == 5 and x.shape[2] == 1, "video models take [N, C, frames, h, w]"
        self.received.append({"x": tuple(x.shape), "context": tuple(c_crossattn.shape),
                              "y": None if y is None else tuple(y.shape),
                              "guidance": None if guidance is None else guidance.tolist(),
                              "llama": None if encoder_hidden_states_llama3 is None else tuple(encoder_hidden_states_llama3.shape),
                              "mask": None if attention_mask is None else tuple(attention_mask.shape), "num_tokens": num_tokens})
        frames = x.dim() == 5
        latent = x[:, :, 0] if frames else x
        sigma = t.view(-1, 1, 1, 1).to(latent.dtype)
        vec = torch.sin(self.model_sampling.timestep(t).float().view(-1, 1) * torch.arange(1, D + 1) / 7)
        if y is not None:
            vec = vec + y.float().mean(-1, keepdim=True)
        if guidance is not None:
            vec = vec + 0.1 * guidance.float().view(-1, 1)
        context = c_crossattn.float()
        if encoder_hidden_states_llama3 is not None:
            context = context + encoder_hidden_states_llama3.float().mean((1, 2))[:, None]  # its own sequence
        v = self.diffusion_model(latent.float(), t, context, vec)
        x0 = latent - v * sigma  # CONST: calculate_denoised
        return x0.unsqueeze(2) if frames else x0


def clip_tokens(prompt: str, kind: str) -> int:
    """How many tokens the family's text encoder gives for a prompt (ComfyUI's tokenizers)."""
    words = len(prompt.split())
    if kind == "clip":  # SD3 without T5: CLIP-L + CLIP-G in chunks of 75 + start/end tokens
        return 77 * max(1, math.ceil(words / 75))
    if kind == "t5-flux":  # comfy/text_encoders/flux.py: T5XXLTokenizer(min_length=256)
        return max(256, words + 1)
    if kind == "umt5":  # comfy/text_encoders/wan.py: min_length 512
        return max(512, words + 1)
    return words + 1  # LLM encoders: the prompt's own length


class FamilyCLIP:
    def __init__(self, spec: dict) -> None:
        self.spec = spec

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        n = clip_tokens(tokens, self.spec["tokens"])
        g = torch.Generator().manual_seed(len(tokens))
        with torch.inference_mode():
            out = {"cond": torch.randn(1, n, CTX, generator=g),
                   "pooled_output": torch.randn(1, 8, generator=g) if self.spec.get("pooled") else None}
            if self.spec.get("llama"):
                out["conditioning_llama3"] = torch.randn(1, 2, len(tokens.split()) + 1, CTX, generator=g)
            if self.spec.get("mask"):
                out["attention_mask"] = torch.ones(1, n, dtype=torch.long)
        return out


class FamilyVAE:
    """NHWC images -> the family's latent channels at 1/8 size (a video VAE: one frame per call)."""

    def __init__(self, spec: dict) -> None:
        self.channels, self.video = spec.get("channels", 16), spec.get("video", False)
        self.first_stage_model = nn.Identity()

    def encode(self, images):
        if self.video:
            assert images.shape[0] == 1, "a video VAE takes a batch of images as the frames of one video"
        x = F.avg_pool2d(images.permute(0, 3, 1, 2) * 2 - 1, 8)
        latent = x.repeat(1, (self.channels + 2) // 3, 1, 1)[:, :self.channels]
        return latent.unsqueeze(2) if self.video else latent


def _config(name: str, parent: type = object) -> type:
    return type(name, (parent,), {"unet_config": {}})


Flux = _config("Flux")
MMDIT_BLOCK = {"x_block.attn.qkv": (1, 3), "x_block.attn.proj": (1, 1), "x_block.mlp.fc1": (1, 4),
               "x_block.mlp.fc2": (4, 1), "context_block.attn.qkv": (1, 3), "context_block.attn.proj": (1, 1),
               "context_block.mlp.fc1": (1, 4), "context_block.mlp.fc2": (4, 1), "x_block.adaLN_modulation.1": (1, 6)}
FLUX_DOUBLE = {"img_attn.qkv": (1, 3), "img_attn.proj": (1, 1), "img_mlp.0": (1, 4), "img_mlp.2": (4, 1),
               "txt_attn.qkv": (1, 3), "txt_attn.proj": (1, 1), "txt_mlp.0": (1, 4), "txt_mlp.2": (4, 1),
               "img_mod.lin": (1, 6)}
FLUX_SINGLE = {"linear1": (1, 7), "linear2": (5, 1), "modulation.lin": (1, 3)}
FAMILIES = {
    "sd3": dict(config=_config("SD3"), sampling=lambda: fake.ModelSamplingDiscreteFlow(3.0), tokens="clip", pooled=True,
                blocks={"joint_blocks": MMDIT_BLOCK}),
    "flux": dict(config=Flux, sampling=ModelSamplingFlux, tokens="t5-flux", pooled=True, guidance_default=3.5,
                 in_place=True, blocks={"double_blocks": FLUX_DOUBLE, "single_blocks": FLUX_SINGLE}),
    "flux-schnell": dict(config=_config("FluxSchnell", Flux), sampling=lambda: ModelSamplingFlux(1.0), tokens="t5-flux",
                         pooled=True, guidance_default=3.5, in_place=True,
                         blocks={"double_blocks": FLUX_DOUBLE, "single_blocks": FLUX_SINGLE}),
    "chroma": dict(config=_config("Chroma"), sampling=ModelSamplingFlux, tokens="t5-flux", guidance_default=0.0,
                   in_place=True, blocks={"double_blocks": {k: v for k, v in FLUX_DOUBLE.items() if "mod" not in k},
                                                       "single_blocks": {"linear1": (1, 7), "linear2": (5, 1)}}),
    "qwen_image": dict(config=_config("QwenImage"), sampling=ModelSamplingFlux, tokens="llm", video=True,
                       blocks={"transformer_blocks": {
                           "attn.to_q": (1, 1), "attn.to_k": (1, 1), "attn.to_v": (1, 1), "attn.to_out.0": (1, 1),
                           "attn.add_q_proj": (1, 1), "attn.add_k_proj": (1, 1), "attn.add_v_proj": (1, 1),
                           "attn.to_add_out": (1, 1), "img_mlp.net.0.proj": (1, 4), "img_mlp.net.2": (4, 1),
                           "txt_mlp.net.0.proj": (1, 4), "txt_mlp.net.2": (4, 1), "img_mod.1": (1, 6)}}),
    "hidream": dict(config=_config("HiDream"), sampling=lambda: fake.ModelSamplingDiscreteFlow(3.0), tokens="t5-flux",
                    pooled=True, llama=True, blocks={
                        "double_stream_blocks": {"block.attn1.to_q": (1, 1), "block.attn1.to_k": (1, 1),
                                                 "block.attn1.to_v": (1, 1), "block.attn1.to_out": (1, 1),
                                                 "block.attn1.to_q_t": (1, 1), "block.attn1.to_out_t": (1, 1),
                                                 "block.ff_i.shared_experts.w1": (1, 4), "block.ff_i.experts.0.w2": (4, 1),
                                                 "block.ff_t.w3": (1, 4), "block.adaLN_modulation.1": (1, 12)},
                        "single_stream_blocks": {"block.attn1.to_q": (1, 1), "block.ff_i.shared_experts.w2": (4, 1)}}),
    "lumina2": dict(config=_config("Lumina2"), sampling=lambda: fake.ModelSamplingDiscreteFlow(6.0), tokens="llm", mask=True,
                    blocks={"layers": {"attention.qkv": (1, 3), "attention.out": (1, 1), "feed_forward.w1": (1, 4),
                                       "feed_forward.w2": (4, 1), "feed_forward.w3": (1, 4), "adaLN_modulation.1": (1, 4)},
                            "noise_refiner": {"attention.qkv": (1, 3), "feed_forward.w2": (4, 1)}}),
    "wan": dict(config=_config("WAN22_T2V", _config("WAN21_T2V")), sampling=lambda: fake.ModelSamplingDiscreteFlow(8.0),
                tokens="umt5", video=True, blocks={"blocks": {
                    "self_attn.q": (1, 1), "self_attn.k": (1, 1), "self_attn.v": (1, 1), "self_attn.o": (1, 1),
                    "cross_attn.q": (1, 1), "cross_attn.k": (1, 1), "cross_attn.v": (1, 1), "cross_attn.o": (1, 1),
                    "ffn.0": (1, 4), "ffn.2": (4, 1)}}),
    "unknown": dict(config=_config("AuraFlow"), sampling=lambda: fake.ModelSamplingDiscreteFlow(1.73), tokens="llm",
                    blocks={"double_layers": {"attn.w2q": (1, 1), "attn.w2k": (1, 1), "mlpX.c_fc1": (1, 4)}}),
}
# how many LoRA layers each family's preset finds in its fake (two blocks of each kind)
PRESET_LAYERS = {"sd3": 16, "flux": 20, "flux-schnell": 20, "chroma": 20, "qwen_image": 24, "hidream": 22,
                 "lumina2": 14, "wan": 20}


def make(name: str):
    """(ModelPatcher, CLIP, VAE) of a fake family model, built under inference mode as ComfyUI's loaders do."""
    spec = FAMILIES[name]
    torch.manual_seed(0)
    with torch.inference_mode():
        model = FamilyModel(spec)
        for p in model.diffusion_model.parameters():
            p.mul_(0.5)
    return fake.ModelPatcher(model), FamilyCLIP(spec), FamilyVAE(spec)


def converter(name: str):
    """The fake of ComfyUI's `comfy.utils.mmdit_to_diffusers` / `flux_to_diffusers` for these fakes: diffusers key ->
    ComfyUI key, or (key, (0, offset, rows)) for a slice of a fused weight, or (key, None, function) for a transformed
    copy (SD3's last adaLN)."""
    def fused(out: dict, src: str, parts: tuple[str, ...], dst: str) -> None:
        """Diffusers layers that are row slices of one fused ComfyUI weight (qkv)."""
        for j, part in enumerate(parts):
            out[f"{src}.{part}.weight"] = (f"{dst}.weight", (0, j * D, D))

    def mmdit(unet_config, output_prefix=""):
        out = {}
        for i in range(2):
            src, dst = f"transformer_blocks.{i}", f"{output_prefix}joint_blocks.{i}"
            fused(out, f"{src}.attn", ("to_q", "to_k", "to_v"), f"{dst}.x_block.attn.qkv")
            fused(out, f"{src}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), f"{dst}.context_block.attn.qkv")
            out.update({f"{src}.{a}.weight": f"{dst}.{b}.weight" for a, b in (
                ("attn.to_out.0", "x_block.attn.proj"), ("attn.to_add_out", "context_block.attn.proj"),
                ("ff.net.0.proj", "x_block.mlp.fc1"), ("ff.net.2", "x_block.mlp.fc2"),
                ("ff_context.net.0.proj", "context_block.mlp.fc1"), ("ff_context.net.2", "context_block.mlp.fc2"))})
            out[f"{src}.norm1.linear.weight"] = (f"{dst}.x_block.adaLN_modulation.1.weight", None, lambda w: w)
        return out

    def flux(unet_config, output_prefix=""):
        out = {}
        for i in range(2):
            src, dst = f"transformer_blocks.{i}", f"{output_prefix}double_blocks.{i}"
            fused(out, f"{src}.attn", ("to_q", "to_k", "to_v"), f"{dst}.img_attn.qkv")
            fused(out, f"{src}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), f"{dst}.txt_attn.qkv")
            out.update({f"{src}.{a}.weight": f"{dst}.{b}.weight" for a, b in (
                ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"), ("ff.net.0.proj", "img_mlp.0"),
                ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"))})
            src, dst = f"single_transformer_blocks.{i}", f"{output_prefix}single_blocks.{i}"
            fused(out, f"{src}.attn", ("to_q", "to_k", "to_v"), f"{dst}.linear1")
            out[f"{src}.proj_mlp.weight"] = (f"{dst}.linear1.weight", (0, 3 * D, 4 * D))
            out[f"{src}.proj_out.weight"] = f"{dst}.linear2.weight"
        return out

    return {"sd3": mmdit, "flux": flux}[name]
