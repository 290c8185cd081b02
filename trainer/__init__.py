"""PrefAlign's standalone trainer: preference alignment of text-to-image diffusion models with LoRA."""
