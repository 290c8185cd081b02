"""The toy world: procedurally generated shapes, a tiny text-to-image model trained on them, and an
exact attribute classifier, so preference alignment is visible and measurable on a CPU in minutes."""
from .dataset import open_prompts, write_preference_dataset
from .sampling import GUIDANCE_SCALE, load_toy_pipeline, sample_images, toy_model_path
from .scoring import (FIDELITY_BOUND, attribute_rate, classify, fidelity_counts, fidelity_drops, fidelity_rates,
                      has_attribute, prompted_attributes, rate_interval, wilson_interval)
from .world import ATTRIBUTES, attribute_kind, caption

__all__ = [
    "ATTRIBUTES", "FIDELITY_BOUND", "GUIDANCE_SCALE", "attribute_kind", "attribute_rate", "caption", "classify",
    "fidelity_counts", "fidelity_drops", "fidelity_rates",
    "has_attribute", "load_toy_pipeline", "open_prompts", "prompted_attributes", "rate_interval", "sample_images",
    "toy_model_path", "wilson_interval", "write_preference_dataset",
]
