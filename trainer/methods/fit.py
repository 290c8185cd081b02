"""Whether a method can train a given model, decided from what is known before anything is encoded.

One place for the refusals that depend on the model, not the data: the training loop raises them (CLI and
Train node) and the ComfyUI pack shows them for the model a graph connects before it runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method


@dataclass(frozen=True)
class ModelTraits:
    prediction_type: str  # "epsilon", "v_prediction" or "flow"
    architecture: str  # as LoRA metadata names it: sd15, sdxl, sd3, flux, chroma, ...
    embeddings: frozenset[str]  # CLIP-space embeddings its encodings carry ("prompt": a pooled text vector)
    discrete_schedule: bool  # a DDPM noise schedule (NCP's posterior step needs one)


def model_refusal(method: Method, model: ModelTraits, embedder: str | None = None) -> str | None:
    """Why `method` (with its options) cannot train `model`, or None when it can. `embedder`: a CLIP model
    that supplies prompt and image embeddings."""
    try:
        method.for_model(model.prediction_type, model.architecture)
    except ValueError as e:
        return str(e)
    missing = frozenset() if embedder else method.embeddings - model.embeddings
    if "image" in missing:
        return (f"method {method.name!r} with these method_args compares CLIP image embeddings, which need a CLIP "
                "model: set embedder (headless: --embedder, a CLIP folder or hub id), or use method_args "
                "embedding = 'prompt'")
    if "prompt" in missing:
        return (f"method {method.name!r} compares the prompts' pooled text vectors, and the text encoder of this "
                f"{model.architecture} model gives none: set embedder (headless: --embedder, a CLIP folder or hub "
                "id), or choose another method")
    if method.error_space == "ncp" and not model.discrete_schedule:
        return ("method_args.space = 'ncp' takes a DDPM posterior step, which needs a model with a discrete noise "
                f"schedule (SD1.5/SDXL family); this one has none (prediction: {model.prediction_type}). "
                "Use space = 'latent'.")
    return None
