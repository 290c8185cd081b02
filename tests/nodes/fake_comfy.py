"""The few ComfyUI objects the nodes touch, faked small enough to run the Train node on CPU in a second.

The fakes follow ComfyUI's contracts as the nodes use them (checked against ComfyUI's source):
- modules built by comfy.ops carry `weight_function` / `bias_function` lists that ComfyUI fills from
  `ModelPatcher.add_weight_wrapper` when the model is loaded, and apply to a *copy* of the weight;
- `BaseModel.apply_model(x, sigma, c_crossattn=...)` takes k-diffusion x = x0 + sigma * eps and returns
  the denoised x0 (EPS sampling: x0 = x - sigma * eps_out, eps_out = UNet(x / sqrt(sigma^2 + 1)));
- weights are loaded under inference mode (inference tensors);
- `comfy.sd.load_lora_for_models` applies kohya `lora_unet_*` keys as W + alpha/rank * up @ down.
"""
from __future__ import annotations

import hashlib
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

# --- comfy.ops-like layers -------------------------------------------------------------------------


class PatchedWeights:
    """comfy.ops' weight/bias functions (where ModelPatcher's weight wrappers attach)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_function, self.bias_function = [], []

    def patched(self):
        w, b = self.weight, self.bias
        for f in self.weight_function:
            w = f(w.clone())
        if b is not None:
            for f in self.bias_function:
                b = f(b.clone())
        return w, b


class Linear(PatchedWeights, nn.Linear):
    def forward(self, x):
        w, b = self.patched()
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


class Conv2d(PatchedWeights, nn.Conv2d):
    def forward(self, x):
        w, b = self.patched()
        return F.conv2d(x, w, b, self.stride, self.padding)


class Attention(nn.Module):
    def __init__(self, dim, ctx_dim):
        super().__init__()
        self.to_q, self.to_k, self.to_v = Linear(dim, dim, bias=False), Linear(ctx_dim, dim, bias=False), Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.ModuleList([Linear(dim, dim)])

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        a = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out[0](a @ v)


class Block(nn.Module):
    def __init__(self, ch, ctx_dim):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)
        self.attn1 = Attention(ch, ctx_dim)

    def forward(self, h, emb, context):
        h = h + self.conv(torch.tanh(h)) + emb[:, :, None, None]
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)
        seq = seq + self.attn1(seq, context)
        return seq.transpose(1, 2).reshape(b, c, hh, ww)


class TinyUNet(nn.Module):
    def __init__(self, ch=8, ctx_dim=8):
        super().__init__()
        self.conv_in = Conv2d(4, ch, 3, padding=1)
        self.time = Linear(1, ch)
        self.input_blocks = nn.ModuleList([Block(ch, ctx_dim)])
        self.middle_block = Block(ch, ctx_dim)
        self.out = Conv2d(ch, 4, 3, padding=1)

    def forward(self, x, t, context=None, **kwargs):
        emb = torch.sin(self.time(t.float().view(-1, 1) / 1000.0))
        h = self.conv_in(x)
        for block in self.input_blocks:
            h = block(h, emb, context)
        h = self.middle_block(h, emb, context)
        return self.out(h)


# --- model sampling and the base model ------------------------------------------------------------


class EPS:
    pass


class ModelSamplingDiscrete(EPS):
    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.sigmas = (((1 - ac) / ac) ** 0.5).float()

    def timestep(self, sigma):
        return (sigma.view(-1, 1) - self.sigmas.to(sigma.device).view(1, -1)).abs().argmin(1).float()


class CONST:
    pass


class ModelSamplingDiscreteFlow(CONST):
    """ComfyUI's rectified-flow sampling (SD3, Flux): x = (1 - sigma) x0 + sigma noise, sigma in (0, 1],
    with a table of 1000 sigmas shifted towards noise: shift t / (1 + (shift - 1) t)."""

    def __init__(self, shift: float = 1.0):
        t = torch.arange(1, 1001) / 1000
        self.sigmas = shift * t / (1 + (shift - 1) * t)

    def timestep(self, sigma):
        return sigma * 1000

    @staticmethod
    def noise_scaling(sigma, noise, latent_image):
        return sigma * noise + (1.0 - sigma) * latent_image


class SD15:
    pass


class CondCrossAttn:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, device, **kwargs):
        return CondCrossAttn(self.cond.to(device))


class BaseModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = TinyUNet()
        self.model_sampling = ModelSamplingDiscrete()
        self.model_config = SD15()

    def get_dtype(self):
        return torch.float32

    def process_latent_in(self, latent):
        return latent * 0.18215

    def extra_conds(self, **kwargs):
        return {"c_crossattn": CondCrossAttn(kwargs["cross_attn"])}

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        sigma = t.view(-1, 1, 1, 1).to(x.dtype)
        if isinstance(self.model_sampling, CONST):  # the flow model predicts v = noise - x0
            v = self.diffusion_model(x, self.model_sampling.timestep(t), context=c_crossattn).float()
            return x - v * sigma
        xc = x / (sigma ** 2 + 1) ** 0.5
        eps = self.diffusion_model(xc, self.model_sampling.timestep(t), context=c_crossattn).float()
        return x - eps * sigma


class ModelPatcher:
    def __init__(self, model, patches=None, wrappers=None, object_patches=None):
        self.model = model
        self.load_device = torch.device("cpu")
        self.weight_wrapper_patches = dict(wrappers or {})
        self.lora = dict(patches or {})
        self.object_patches = dict(object_patches or {})

    def clone(self):
        return ModelPatcher(self.model, self.lora, self.weight_wrapper_patches, self.object_patches)

    def add_weight_wrapper(self, name, function):
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]

    def add_object_patch(self, name, obj):
        """What ComfyUI's ModelSampling* nodes use: the object replaces the model's attribute when loaded."""
        self.object_patches[name] = obj

    def get_model_object(self, name):
        return self.object_patches.get(name, getattr(self.model, name))

    def load(self):
        for name, obj in self.object_patches.items():
            setattr(self.model, name, obj)
        for name, m in self.model.named_modules():
            if hasattr(m, "weight_function"):
                m.weight_function = list(self.weight_wrapper_patches.get(f"{name}.weight", []))
                m.bias_function = list(self.weight_wrapper_patches.get(f"{name}.bias", []))
                for f in m.weight_function + m.bias_function:
                    if hasattr(f, "move_to"):
                        f.move_to(self.load_device)


def make_model_patcher(seed: int = 0) -> ModelPatcher:
    """Built under inference mode, as ComfyUI's checkpoint loader node does."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        model = BaseModel()
    return ModelPatcher(model)


class CLIP:
    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        seed = int(hashlib.sha256(tokens.encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            cond = torch.randn(1, 77, 8, generator=g)
            pooled = torch.randn(1, 8, generator=g)
        return {"cond": cond, "pooled_output": pooled}


class VAE:
    def __init__(self):
        self.first_stage_model = nn.Identity()

    def encode(self, images):
        assert images.ndim == 4 and images.shape[-1] == 3, "ComfyUI VAE.encode takes NHWC images in 0..1"
        x = images.permute(0, 3, 1, 2) * 2 - 1
        x = F.avg_pool2d(x, 8)
        return torch.cat([x, x.mean(1, keepdim=True)], dim=1) / 0.18215


# --- module fakes ---------------------------------------------------------------------------------


class InterruptProcessingException(Exception):
    pass


def install(folders) -> dict:
    """Put fake `folder_paths`, `comfy.*` and `server` modules in sys.modules; returns a record of calls."""
    calls = {"progress": [], "messages": [], "interrupt": False, "loads": 0}

    fp = types.ModuleType("folder_paths")
    fp.get_user_directory = lambda: str(folders["user"])
    fp.get_output_directory = lambda: str(folders["output"])
    fp.get_temp_directory = lambda: str(folders["temp"])
    fp.get_input_directory = lambda: str(folders["input"])
    fp.get_folder_paths = lambda kind: [str(folders["loras"])] if kind == "loras" else []

    def get_filename_list(kind):
        root = folders["loras"]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*.safetensors")) if kind == "loras" else []

    def get_full_path(kind, name):
        p = folders["loras"] / name
        return str(p) if kind == "loras" and p.is_file() else None

    fp.get_filename_list, fp.get_full_path = get_filename_list, get_full_path

    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException

    def load_models_gpu(patchers, memory_required=0, force_full_load=False, **kwargs):
        calls["loads"] += 1
        for p in patchers:
            p.load()

    def processing_interrupted():
        return calls["interrupt"]

    def throw_exception_if_processing_interrupted():
        if calls["interrupt"]:
            calls["interrupt"] = False
            raise InterruptProcessingException()

    mm.load_models_gpu = load_models_gpu
    mm.processing_interrupted = processing_interrupted
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.node_id = total, node_id

        def update_absolute(self, value, total=None, preview=None):
            calls["progress"].append((value, total or self.total))
            throw_exception_if_processing_interrupted()  # ComfyUI's progress hook checks for Cancel

    utils.ProgressBar = ProgressBar

    def load_torch_file(path, safe_load=False):
        from safetensors.torch import load_file

        return load_file(path)

    utils.load_torch_file = load_torch_file

    sd = types.ModuleType("comfy.sd")

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
        out = model.clone()
        out.lora = {**out.lora, **{k: (v, strength_model) for k, v in lora.items()}}
        return out, clip

    sd.load_lora_for_models = load_lora_for_models
    comfy.model_management, comfy.utils, comfy.sd = mm, utils, sd

    server = types.ModuleType("server")

    class PromptServer:
        instance = None

    server.PromptServer = PromptServer

    class _Instance:
        def send_sync(self, event, data, sid=None):
            calls["messages"].append((event, data))

    PromptServer.instance = _Instance()

    sys.modules.update({"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
                        "comfy.sd": sd, "server": server})
    return calls


def apply_kohya(patcher: ModelPatcher, lora: dict, strength: float = 1.0) -> None:
    """Bake kohya LoRA weights into the model the way ComfyUI's LoRAAdapter does (W += s * alpha/rank * up @ down)."""
    with torch.no_grad():
        for name, m in patcher.model.named_modules():
            if not name.startswith("diffusion_model."):
                continue
            key = "lora_unet_" + name[len("diffusion_model."):].replace(".", "_")
            if f"{key}.lora_up.weight" in lora:
                up, down = lora[f"{key}.lora_up.weight"], lora[f"{key}.lora_down.weight"]
                alpha = float(lora[f"{key}.alpha"]) / down.shape[0]
                diff = (up.flatten(1) @ down.flatten(1)).reshape(m.weight.shape)
                m.weight.data = m.weight.data + strength * alpha * diff
