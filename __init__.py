"""PrefAlign for ComfyUI: curate preference pairs, train a preference LoRA (Diffusion-DPO and friends), load it.

ComfyUI imports this folder as a package by path; everything inside uses relative imports.
The standalone trainer (`python -m trainer`) lives in `trainer/` and never imports ComfyUI.
"""
import logging

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

try:
    from .nodes import routes as _routes

    _routes.register()
except Exception as _e:  # routes need ComfyUI's server (aiohttp); the nodes work without them
    logging.getLogger(__name__).warning("PrefAlign: web routes not registered: %s", _e)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
