"""Which methods fit the model a graph connects to the Train node, before the graph runs.

The frontend follows the Train node's `model` input up to its loader (Load Checkpoint or Load Diffusion
Model) and notes any sampling patch on the way (ModelSamplingSD3/Flux/AuraFlow: rectified flow;
ModelSamplingDiscrete: eps or v-prediction); the server reads that file's safetensors header only (names,
shapes, dtypes; tensors of at most SMALL_TENSOR elements are read, for the flags ComfyUI's detection looks at),
runs ComfyUI's own model detection on shape-only tensors, as `comfy.sd.load_diffusion_model_state_dict` would,
builds the detected model on the meta device (its class gives the sampling), and asks the trainer (`trainer/methods/fit.py`) which methods train that family and sampling. The Train node
refuses the others with the same messages when it runs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..trainer.methods import build_method, method_names
from ..trainer.methods.fit import ModelTraits, model_refusal
from .comfy_backend import prediction_type_of
from .comfy_families import architecture_of, family_of, text_embeddings

LOADER_FOLDERS = ("checkpoints", "diffusion_models")  # Load Checkpoint, Load Diffusion Model
SAMPLINGS = ("epsilon", "v_prediction", "flow")
SMALL_TENSOR = 16  # elements: flags such as `v_pred`, `edm_vpred.sigma_max`, `scaled_fp8`
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
          "BOOL": "bool"}


class ProbeError(ValueError):
    """The request names no model file this server lists, or a sampling that is not one."""


def model_file(folder: str, name: str) -> Path:
    """The file a loader widget names: only a name ComfyUI lists in that models folder (its dropdown)."""
    from . import comfy_env

    fp = comfy_env.folder_paths()
    if folder not in LOADER_FOLDERS:
        raise ProbeError(f"folder must be one of {', '.join(LOADER_FOLDERS)}")
    if name not in fp.get_filename_list(folder):
        raise ProbeError(f"no model {name!r:.80} in {folder}")
    if not name.endswith(".safetensors"):
        raise ProbeError("only .safetensors files are read")
    return Path(fp.get_full_path(folder, name))


def header_state_dict(path: Path) -> dict[str, Any]:
    """Every tensor of the file on the meta device (shape and dtype), small ones read for real."""
    import torch
    from safetensors import safe_open

    sd = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            part = f.get_slice(key)
            shape = part.get_shape()
            dtype = getattr(torch, DTYPES.get(part.get_dtype(), "float16"))
            sd[key] = f.get_tensor(key) if math.prod(shape) <= SMALL_TENSOR else torch.empty(shape, dtype=dtype, device="meta")
    return sd


def detect(path: Path) -> Any:
    """ComfyUI's model for the file, built on the meta device (no weights, no memory), as its diffusion-model
    loader detects it (a checkpoint's `model.diffusion_model.` prefix included); None when it detects none."""
    import comfy.utils
    import torch
    from comfy import model_detection

    sd = header_state_dict(path)
    prefix = model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    config = model_detection.model_config_from_unet(sd, "")
    if config is None:
        sd = model_detection.convert_diffusers_mmdit(sd, "")
        config = model_detection.model_config_from_unet(sd, "") if sd is not None else None
    if config is None:
        return None
    try:
        return config.get_model(sd, "", device=torch.device("meta"))
    except (NotImplementedError, RuntimeError):  # a check reading values of large tensors (SD2's v-prediction)
        return None


def model_traits(base_model: Any, prediction_type: str) -> ModelTraits:
    """What decides which methods train a ComfyUI model (`trainer/methods/fit.py`), known before it is loaded: its
    family's text embeddings, and its sampling (every ComfyUI sampling but flow has a discrete sigma table)."""
    return ModelTraits(prediction_type, architecture_of(base_model), text_embeddings(family_of(base_model)),
                       prediction_type != "flow")


def probe(folder: str, name: str, sampling: str = "") -> dict[str, Any]:
    """The model's family, sampling and, per method with its default options, None (it trains this model) or
    the reason it does not. `sampling`: set by a ModelSampling patch between the loader and the Train node."""
    if sampling and sampling not in SAMPLINGS:
        raise ProbeError(f"sampling must be one of {', '.join(SAMPLINGS)}")
    model = detect(model_file(folder, name))
    if model is None:
        return {"family": None, "label": "a model ComfyUI does not detect", "prediction_type": None, "methods": {}}
    family = family_of(model)
    architecture = architecture_of(model)
    label = family.label if family is not None else type(model.model_config).__name__
    try:
        prediction = sampling or prediction_type_of(model.model_sampling)
    except ValueError as e:  # a sampling the trainer does not train (EDM, ...)
        return {"family": architecture, "label": label, "prediction_type": None, "methods": {}, "error": str(e)}
    traits = model_traits(model, prediction)
    return {"family": architecture, "label": label, "prediction_type": prediction,
            "methods": {m: model_refusal(build_method(m, {}), traits) for m in method_names()}}
