"""PrefAlign's ComfyUI nodes: thin shells over `trainer/` (which never imports ComfyUI)."""
from __future__ import annotations

from . import dataset_nodes, lora_nodes, npo_node, score_nodes, store_nodes, train_node

_NODES = {}
for _module in (dataset_nodes, store_nodes, train_node, lora_nodes, score_nodes, npo_node):
    _NODES.update(_module.NODES)

#: words the node search finds each node by: newer ComfyUI versions send a node class's SEARCH_ALIASES to the
#: frontend's search; older ones (0.3.x) search the display name only, which is why every display name says "Preference"
SEARCH_ALIASES = ["prefalign", "preference", "dpo", "diffusion-dpo", "alignment", "human feedback"]
NODE_SEARCH_ALIASES = {
    "PrefAlignPairsFromDataset": ["pick-a-pic", "pickapic", "parquet", "dataset", "pairs"],
    "PrefAlignAddPair": ["pair store", "chosen", "rejected", "pairs"],
    "PrefAlignLoadStore": ["pair store", "pairs", "dataset"],
    "PrefAlignGalleryPicker": ["gallery", "pick", "rate", "choose", "chosen", "rejected", "pairs"],
    "PrefAlignExportParquet": ["parquet", "export", "pair store", "dataset"],
    "PrefAlignImportParquet": ["parquet", "import", "pick-a-pic", "pair store", "dataset"],
    "PrefAlignTrainLoRA": ["lora", "train", "training", "fine-tune", "kto", "rpo", "dspo", "mapo", "cpo", "sft"],
    "PrefAlignLoadLoRA": ["lora", "load lora", "apply lora"],
    "PrefAlignLoadScorer": ["scorer", "pickscore", "clip", "aesthetic", "reward model", "ai feedback"],
    "PrefAlignScoreImages": ["score", "scorer", "pickscore", "aesthetic", "rank", "reward"],
    "PrefAlignPairsFromScores": ["pairs", "scores", "ai feedback", "best worst", "pair store"],
    "PrefAlignNegativeBranchLoRA": ["npo", "diffusion-npo", "negative", "negative prompt", "unconditional", "cfg", "lora"],
}
for _key, (_cls, _) in _NODES.items():
    _cls.SEARCH_ALIASES = SEARCH_ALIASES + NODE_SEARCH_ALIASES[_key]

NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in _NODES.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
