"""The trainer's `Backend` over ComfyUI objects: the graph's MODEL (a ModelPatcher), CLIP and VAE, any family.

- LoRA: one small trainable module per targeted weight, attached with `ModelPatcher.add_weight_wrapper`
  (ComfyUI's weight-wrapper hook, the one its native LoRA trainer uses), so any model family ComfyUI
  samples works. The reference is the same patcher with every wrapper switched off: one model in memory.
  Default targets and the other per-family settings come from `comfy_families`.
- Timesteps are integers in [0, num_train_timesteps) as in the trainer; ComfyUI works in sigmas
  (k-diffusion space x = x0 + sigma * eps). The forward process is the trainer's (`trainer.forward_process`),
  on the model's own schedule: DDPM alphas_cumprod = 1 / (1 + sigma^2) from ComfyUI's sigma table, or for
  flow models (CONST sampling) the model's (shifted) sigma table itself. `predict` maps x_t to ComfyUI's
  space, runs `apply_model`, and turns its x0 into the output the trainer's losses expect (eps, v or the
  flow velocity eps - x0).
- Conditioning: what the CLIP's `encode_from_tokens(return_dict=True)` gives, at its full token length (T5 and
  LLM encoders give as many tokens as the prompt needs), through the model's own `extra_conds` as ComfyUI's
  sampler builds it (pooled vector, guidance, attention masks, HiDream's Llama states, ...). Rows of a batch
  are zero-padded to the longest and each row's sizes are kept (`size.*`); the model sees every row at its own
  size, rows of equal sizes in one call (as ComfyUI's sampler batches conds).
- Latents: `encode_images` runs the VAE and `process_latent_in` (ComfyUI's VAE output is unscaled); video
  families (Wan) encode each image as a one-frame video and train on that frame.
- Weights: ComfyUI loads models under inference mode; the loaded model's inference tensors are replaced by
  ordinary copies (see `own_inference_tensors`). Training loads the whole model on the GPU (partial low-VRAM
  loading is not used) and says how much memory that takes when it cannot.
- Export: kohya names `lora_unet_<ComfyUI path with _>`, or diffusers names for SD3/Flux (`comfy_lora`).
- Gradient checkpointing wraps the diffusion model's outermost blocks (as ComfyUI's own trainer does: the
  transformer blocks of every family) for the life of the backend; use it as a context manager so the shared
  model gets its forwards back.
"""
from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..trainer.encoding import SIZE, concat_rows
from ..trainer.forward_process import Schedule, TimestepSampling, per_sample
from ..trainer.models.lora import LoraSpec
from .comfy_checkpointing import checkpointed, outermost_blocks, snapshot_saved_tensors
from .comfy_families import architecture_of, family_of, layer_names, text_embeddings, trained_guidance
from .comfy_lora import PREFIX, LoraWeight, diffusers_parts, export_names, linear_layers, matches_target

__all__ = ["ComfyBackend", "architecture_of", "own_inference_tensors"]

#: conditioning names in the trainer's cache -> `extra_conds` keyword (other CLIP outputs keep theirs: `extra.<key>`)
COND_KWARGS = {"prompt_embeds": "cross_attn", "pooled": "pooled_output"}
EXTRA = "extra."
GIB = 2 ** 30


def own_inference_tensors(root: nn.Module) -> int:
    """Replace every inference tensor among `root`'s parameters and buffers by an ordinary copy (same values,
    dtype and device, one tensor at a time); returns how many.

    Why: every ComfyUI node runs under `torch.inference_mode()`, so the loaders create the model's weights and
    buffers as inference tensors, and autograd refuses to save one for backward ("Inference tensors cannot be
    saved for backward"). A weight is saved whenever an op needs it for the gradient of its other input:
    `x * scale` in a norm whose scale is a plain Parameter (Flux's and Chroma's RMSNorm `scale`, SD3.5's
    `ln_q`/`ln_k`, HiDream's MoE gate, Wan's `modulation`), or a comfy.ops layer whose weight is already in the
    compute dtype (no cast, so no copy). The graph's other nodes see the same values."""
    replaced = 0
    for module in root.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_inference():
                module._parameters[name] = nn.Parameter(param.clone(), requires_grad=False)
                replaced += 1
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_inference():
                module._buffers[name] = buffer.clone()
                replaced += 1
    return replaced


class ComfyBackend:
    """Implements `trainer.models.backend.Backend` for a ComfyUI MODEL / CLIP / VAE.

    Use it as a context manager: gradient checkpointing patches the blocks of the model that the graph's
    MODEL shares, and leaving the context restores them.
    """

    #: encodings of this backend are stored full length with their sizes: not the same cache entries as before
    cache_tag = "comfy-cond=full-length"

    def __init__(self, model, clip, vae, lora: LoraSpec, seed: int = 0, model_name: str = "",
                 gradient_checkpointing: bool = False, timestep_sampling: str | None = None,
                 guidance: float | None = None) -> None:
        import comfy.model_management as mm

        self.mm = mm
        self.clip, self.vae = clip, vae
        self.lora = lora
        self.rank, self.alpha = int(lora.rank), float(lora.alpha)
        self.model_name = model_name
        self.cancel_while_encoding = True  # the Train node turns this off once a step is done
        self.patcher = model.clone()
        base = self.patcher.model
        self.base = base
        self.family = family_of(base)
        self.embeddings = text_embeddings(self.family)
        self.sampling = self.patcher.get_model_object("model_sampling")  # with object patches (ModelSampling* nodes)
        self.prediction_type = prediction_type_of(self.sampling)
        # the model's own sigma table (flow models: shifted, as their schedulers train), else uniform flow sigmas
        table = getattr(self.sampling, "sigmas", None)
        self._sigmas = table.detach().float().cpu().clone() if table is not None else None
        self.num_train_timesteps = int(self._sigmas.shape[0]) if self._sigmas is not None else 1000
        self.discrete = self._sigmas is not None and self.prediction_type != "flow"
        self.alphas_cumprod = 1.0 / (1.0 + self._sigmas ** 2) if self.discrete else None
        if self.discrete:
            self.schedule = Schedule(alphas_cumprod=self.alphas_cumprod)
        else:  # flow: sigma in (0, 1], the model's table when it has one
            steps = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float32) / self.num_train_timesteps
            self.schedule = Schedule(sigmas=self._sigmas if self._sigmas is not None else steps)
        family_sampling = self.family.timestep_sampling if self.family is not None else "uniform"
        self.timestep_sampling = TimestepSampling(self.num_train_timesteps, timestep_sampling or family_sampling)
        self.guidance = trained_guidance(base, guidance)
        self.frames = getattr(getattr(base, "latent_format", None), "latent_dimensions", 2) == 3  # video: [N, C, T, h, w]
        self.snapshots = self.family is None or self.family.in_place  # exact gradients through in-place updates
        self._info: dict[str, str] | None = None  # model_info, once asked

        generator = torch.Generator().manual_seed(int(seed))
        self.adapters: dict[str, LoraWeight] = {}
        layers = linear_layers(base.named_modules())
        modules = dict(base.named_modules())
        for name in layers:
            if matches_target(name, lora.target_modules):
                adapter = LoraWeight(modules[name].weight.shape, self.rank, self.alpha, generator)
                self.adapters[name] = adapter
                self.patcher.add_weight_wrapper(f"{name}.weight", adapter)
        if not self.adapters:
            raise ValueError(f"no layer of this model ({architecture_of(base)}) matches target_modules "
                             f"{', '.join(lora.target_modules)}; its linear layers are: "
                             f"{layer_names(n[len(PREFIX):] for n in layers)}")
        self.lora_modules = nn.ModuleDict({k.replace(".", "__"): v for k, v in self.adapters.items()})
        for p in base.parameters():  # frozen base (ComfyUI's weights may be inference tensors: no-op then)
            if p.requires_grad:
                p.requires_grad_(False)
        self._load_fully()
        self.device = torch.device(self.patcher.load_device)
        self.lora_modules.to(self.device)
        # the tables are indexed every step: on the device, with no host-to-device copy per step
        self.schedule = self.schedule.to(self.device)
        self.alphas_cumprod = self.schedule.alphas_cumprod
        self._sigmas = None if self._sigmas is None else self._sigmas.to(self.device)
        self._exit = ExitStack()  # last: nothing below may fail and leave the shared model patched
        if gradient_checkpointing:
            self._exit.enter_context(checkpointed(outermost_blocks(base.diffusion_model)))

    def __enter__(self) -> "ComfyBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give the shared model its own forwards back."""
        self._exit.close()

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.lora_modules

    def _load_fully(self) -> None:
        """Load the whole model on its device (evicting the others), or say what it needs when it cannot."""
        device = torch.device(self.patcher.load_device)
        need = int(self.patcher.model_size()) if hasattr(self.patcher, "model_size") else 0
        total = int(self.mm.get_total_memory(device)) if device.type != "cpu" else 0
        if device.type != "cpu" and need > total:
            raise ValueError(self._memory_message(need, total))
        try:
            self.mm.load_models_gpu([self.patcher], memory_required=1e20, force_full_load=True)
        except torch.cuda.OutOfMemoryError:
            raise ValueError(self._memory_message(need, total)) from None
        own_inference_tensors(self.base)

    def _memory_message(self, need: int, total: int) -> str:
        dtype = str(self.base.get_dtype()).replace("torch.", "")
        return (f"training keeps the whole diffusion model on the GPU (ComfyUI's low-VRAM partial loading is not used "
                f"for training): its weights take {need / GIB:.1f} GiB in {dtype}, plus the LoRA and the activations "
                f"of one step, and this GPU has {total / GIB:.1f} GiB. Load the model with a smaller weight_dtype "
                "(Load Diffusion Model: fp8_e4m3fn takes half of bf16), turn gradient_checkpointing on and lower the "
                "resolution, or use a GPU with more memory")

    def _ensure_loaded(self) -> None:
        self.mm.load_models_gpu([self.patcher], force_full_load=True)
        own_inference_tensors(self.base)  # weights ComfyUI re-patched while reloading

    def _sigma(self, timesteps: Tensor) -> Tensor:
        """ComfyUI's sigma of a trainer timestep (k-diffusion sigma, or the flow model's s)."""
        if self.discrete:
            return self._sigmas.to(timesteps.device)[timesteps.long()]
        return self.schedule.sigma(timesteps)

    # -- encoding (no grad) -------------------------------------------------------------------------
    def _check_cancel(self) -> None:
        """Cancel during the (possibly long) encoding of the dataset, before the first step: stop right away."""
        if self.cancel_while_encoding:
            from .comfy_env import throw_if_interrupted

            throw_if_interrupted()

    def release_encoders(self) -> None:
        """Nothing to do: ComfyUI's model management already moved CLIP and the VAE off the GPU when it
        loaded the diffusion model for training."""

    def _encode_prompt(self, prompt: str) -> dict[str, Tensor]:
        """One prompt as ComfyUI's CLIPTextEncode conditions a sampler: every tensor of the CLIP's output, full length."""
        out = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True, return_dict=True)
        row = {"prompt_embeds": out["cond"]}
        if out.get("pooled_output") is not None:
            row["pooled"] = out["pooled_output"].reshape(1, -1)
        row.update({EXTRA + k: v for k, v in out.items() if k not in ("cond", "pooled_output") and isinstance(v, Tensor)})
        return {k: (v.float() if v.is_floating_point() else v).clone().cpu() for k, v in row.items()}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        self._check_cancel()
        if self.clip is None:
            raise ValueError("the CLIP input is empty: connect the checkpoint's CLIP (or a CLIP loader) to encode prompts")
        rows = [self._encode_prompt(p) for p in prompts]
        result = {}
        for name in dict.fromkeys(n for r in rows for n in r):
            result[name] = concat_rows([r.get(name) for r in rows])
            result[SIZE + name] = torch.tensor([list(r[name].shape[1:]) if name in r else [0] * (result[name].dim() - 1)
                                                for r in rows])
        return {k: v.to(self.device) for k, v in result.items()}

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        self._check_cancel()
        if self.vae is None:
            raise ValueError("the VAE input is empty: connect the checkpoint's VAE (or Load VAE) to encode images")
        images = ((pixels.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()[..., :3]  # ComfyUI IMAGE: NHWC 0..1
        if self.frames:  # a video VAE takes a batch of images as the frames of one video: one image at a time
            latents = torch.cat([self.vae.encode(images[i:i + 1]) for i in range(images.shape[0])])
        else:
            latents = self.vae.encode(images)
        latents = self.base.process_latent_in(latents.float().clone().to(self.device)).float()
        return latents[:, :, 0] if self.frames else latents

    # -- forward process ---------------------------------------------------------------------------
    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.schedule.add_noise(latents, noise, timesteps)

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.schedule.target(latents, noise, timesteps, self.prediction_type)

    # -- model calls --------------------------------------------------------------------------------
    def _row_conds(self, cond: dict[str, Tensor], i: int, x: Tensor) -> dict[str, Any]:
        """Row i's conditioning through ComfyUI's `extra_conds`, at the row's own sizes."""
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        # as CLIPTextEncode's conditioning: `pooled_output` is always there, None when the encoder has none
        kw: dict[str, Any] = {"device": x.device, "noise": x[i:i + 1], "width": w, "height": h, "pooled_output": None}
        for name, value in cond.items():
            if name not in COND_KWARGS and not name.startswith(EXTRA):
                continue  # sizes, SDXL time_ids (below), features other parts of the trainer add
            sizes = cond.get(SIZE + name)
            dims = sizes[i].tolist() if sizes is not None else list(value.shape[1:])
            if not any(dims):
                continue  # this prompt's encoder gave no such tensor
            kw[COND_KWARGS.get(name, name[len(EXTRA):])] = value[(slice(i, i + 1), *[slice(0, d) for d in dims])]
        time_ids = cond.get("time_ids")
        if time_ids is not None:
            oh, ow, ct, cl, th, tw = (int(v) for v in time_ids[i].tolist())
            kw.update(height=oh, width=ow, crop_h=ct, crop_w=cl, target_height=th, target_width=tw)
        if self.guidance is not None:
            kw["guidance"] = self.guidance
        if self.frames:
            kw["noise"] = kw["noise"].unsqueeze(2)
        return {k: c.process_cond(batch_size=1, device=x.device, area=None).cond
                for k, c in self.base.extra_conds(**kw).items()}

    def _conds(self, cond: dict[str, Tensor], x: Tensor) -> list[tuple[list[int], dict[str, Any]]]:
        """The batch's rows grouped by equal conditioning sizes: (row indices, concatenated conds) per group."""
        groups: dict[tuple, tuple[list[int], list[dict[str, Any]]]] = {}
        for i in range(x.shape[0]):
            row = self._row_conds(cond, i, x)
            key = tuple((k, tuple(v.shape) if isinstance(v, Tensor) else repr(v)) for k, v in sorted(row.items()))
            groups.setdefault(key, ([], []))
            groups[key][0].append(i)
            groups[key][1].append(row)
        return [(rows, {k: torch.cat([c[k] for c in conds]) if isinstance(conds[0][k], Tensor) else conds[0][k]
                        for k in conds[0]})
                for rows, conds in groups.values()]

    def _x0(self, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Run ComfyUI's model on a DDPM/flow x_t: returns its denoised x0."""
        self._ensure_loaded()
        sigma = self._sigma(timesteps.to(noisy.device)).to(noisy.device).float()
        s = per_sample(sigma, noisy).float()
        x = noisy.float() * (1 + s ** 2).sqrt() if self.discrete else noisy.float()
        dtype = self.base.get_dtype()
        bf16 = (x.device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and torch.cuda.is_bf16_supported())
        order, parts = [], []
        for rows, conds in self._conds(cond, x):
            sub = x[rows].unsqueeze(2) if self.frames else x[rows]
            snapshots = snapshot_saved_tensors() if self.snapshots and torch.is_grad_enabled() else nullcontext()
            with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext(), snapshots:
                denoised = self.base.apply_model(sub, sigma[rows], **conds).float()
            parts.append(denoised[:, :, 0] if self.frames else denoised)
            order += rows
        out = torch.cat(parts)
        return out if order == sorted(order) else out[torch.tensor(order).argsort().to(out.device)]

    def predict(self, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        x0 = self._x0(noisy, timesteps, cond)
        return self.schedule.output_from_x0(noisy.float(), x0, timesteps.to(noisy.device), self.prediction_type)

    @contextmanager
    def reference(self) -> Iterator[None]:
        for a in self.adapters.values():
            a.enabled = False
        try:
            yield
        finally:
            for a in self.adapters.values():
                a.enabled = True

    def encoder_features(self, sample: Tensor, timesteps: Tensor, cond: dict[str, Tensor], middle: bool = False) -> Tensor:
        """Frozen pretrained encoder (adapter off): the UNet's input blocks (+ middle block), flattened."""
        unet = self.base.diffusion_model
        blocks = getattr(unet, "input_blocks", None)
        if blocks is None:
            raise ValueError("noise-conditioned features need a UNet with input_blocks (SD1.5/SDXL family)")
        target = unet.middle_block if middle else blocks[-1]
        captured: dict[str, Tensor] = {}

        class _Stop(Exception):
            pass

        def hook(_module, _inputs, output):
            captured["h"] = output
            raise _Stop

        handle = target.register_forward_hook(hook)
        try:
            with self.reference():
                self._x0(sample, timesteps, cond)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["h"].float().flatten(1)

    # -- the adapter --------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters.values() for p in (a.lora_down, a.lora_up)]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        out = {}
        for name, a in self.adapters.items():
            out[f"{name}.lora_down.weight"] = a.lora_down.detach().clone()
            out[f"{name}.lora_up.weight"] = a.lora_up.detach().clone()
        return out

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = self.adapter_state_dict()
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state))[:3], sorted(set(state) - set(expected))[:3]
            raise ValueError(f"adapter does not match this model (rank/targets differ): missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, a in self.adapters.items():
                for part in ("lora_down", "lora_up"):
                    value = state[f"{name}.{part}.weight"]
                    param = getattr(a, part)
                    if value.shape != param.shape:
                        raise ValueError(f"adapter weight {name}.{part}: shape {tuple(value.shape)} != {tuple(param.shape)}")
                    param.copy_(value)

    def export_lora(self) -> dict[str, Tensor]:
        """kohya names, or for SD3/Flux diffusers names through ComfyUI's own converter (`comfy_lora`)."""
        parts = None
        if self.family is not None and self.family.diffusers:
            import comfy.utils

            convert = getattr(comfy.utils, self.family.diffusers)
            converter_map = convert(self.base.model_config.unet_config, output_prefix=PREFIX)
            parts = diffusers_parts(converter_map, {n: a.shape[0] for n, a in self.adapters.items()})
        return export_names(self.adapters, parts)

    def model_info(self) -> dict[str, str]:
        """Worked out once per backend (the trainer asks 3-4 times a run): the fingerprint hashes frozen weights only,
        since the LoRA factors hang in comfy.ops' `weight_function` lists, which `state_dict` does not walk."""
        if self._info is None:
            self._info = self._model_info()
        return dict(self._info)

    def _model_info(self) -> dict[str, str]:
        # cheap fingerprint of the diffusion model, VAE and text encoder (it keys the trainer's latent/text cache):
        # names, shapes and a few values of up to 64 tensors of each
        h = hashlib.sha256()
        parts = [self.base.diffusion_model, getattr(self.vae, "first_stage_model", None),
                 getattr(self.clip, "cond_stage_model", None)]
        for module in parts:
            if not isinstance(module, nn.Module):
                h.update(b"-")
                continue
            sd = module.state_dict()
            keys = sorted(sd)
            for k in keys[:: max(1, len(keys) // 64)]:
                t = sd[k]
                h.update(f"{k}{tuple(t.shape)}".encode())
                h.update(t.detach().flatten()[:16].float().cpu().numpy().tobytes())
        return {"name": self.model_name or type(self.base).__name__, "hash": h.hexdigest()[:16],
                "architecture": architecture_of(self.base), "prediction_type": self.prediction_type}


def prediction_type_of(model_sampling) -> str:
    """What the network predicts, from ComfyUI's model sampling classes (CONST: rectified flow)."""
    kinds = {k.__name__ for k in type(model_sampling).__mro__}
    for kind, prediction in (("CONST", "flow"), ("V_PREDICTION", "v_prediction"), ("EPS", "epsilon")):
        if kind in kinds:
            return prediction
    raise ValueError(f"model sampling {type(model_sampling).__name__} is not supported for training")

