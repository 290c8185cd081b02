"""PrefAlign's ComfyUI nodes: thin shells over `trainer/` (which never imports ComfyUI)."""
from __future__ import annotations

from . import dataset_nodes, lora_nodes, score_nodes, store_nodes, train_node

_NODES = {}
for _module in (dataset_nodes, store_nodes, train_node, lora_nodes, score_nodes):
    _NODES.update(_module.NODES)

NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in _NODES.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
