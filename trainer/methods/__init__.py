"""Preference-alignment methods, one file each, registered by name on import."""
from . import cal_dpo, cpo, dense, dpo, dspo, kto, mapo, npo, rpo, sft  # noqa: F401  (registers them)
from .base import EMBEDDINGS, PREDICTIONS, Method, MethodConfig, StepOutputs
from .registry import build_method, method_class, method_names, register

__all__ = [
    "EMBEDDINGS", "PREDICTIONS", "Method", "MethodConfig", "StepOutputs",
    "build_method", "method_class", "method_names", "register",
]
