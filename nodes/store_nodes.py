"""Nodes over the pair store: add a pair, load a store, pick from a gallery, export/import parquet.

Each node shows what it did on itself (`{"ui": {"prefalign_text": [...]}}`, rendered by the pack's web
widget: ComfyUI's frontend does not display `ui.text`), and its errors name no server path.
"""
from __future__ import annotations

import re
from pathlib import Path

from . import comfy_env, paths
from .images import tensor_to_pngs
from .pair_store import PairStore, StoreError, check_store_name

CATEGORY = "preference/store"
PAIRS = "PREFERENCE_PAIRS"

STORE_INPUT = ("STRING", {
    "default": "default",
    "tooltip": "Name of the pair store (letters, digits, '_', '-', '.'). It lives in ComfyUI's user directory "
               "under prefalign_stores/<name>; it is created on first use.",
})


def open_store(name: str, create: bool = True) -> PairStore:
    with paths.shown_errors():
        return PairStore(comfy_env.stores_base(), name.strip() if isinstance(name, str) else name, create=create)


def validate_store(store) -> bool | str:
    """VALIDATE_INPUTS for a store name: a bad one is refused when the graph is queued, before anything
    upstream (a batch of images) is generated. A linked input (None here) is checked when the node runs."""
    if store is None:
        return True
    try:
        check_store_name(store.strip() if isinstance(store, str) else store)
    except StoreError as e:
        return str(e)
    return True


def shown(text: str, result: tuple) -> dict:
    """A node's return value with its text for the pack's widget."""
    return {"ui": {"prefalign_text": [text]}, "result": result}


class PreferencePairs(list):
    """PREFERENCE_PAIRS: a list of trainer PreferenceExample records plus where they came from."""

    def __init__(self, examples=(), description: str = "") -> None:
        super().__init__(examples)
        self.description = description


class AddPair:
    DESCRIPTION = ("Add preference pairs to a store: each chosen image is paired with the rejected image at the same "
                   "batch index (a batch of 1 pairs with every image of the other input).")
    CATEGORY = CATEGORY
    FUNCTION = "add"
    OUTPUT_NODE = True
    RETURN_TYPES = ("INT",)
    RETURN_NAMES = ("pairs_in_store",)
    OUTPUT_TOOLTIPS = ("How many pairs the store holds after this node ran.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "chosen": ("IMAGE", {"tooltip": "The preferred image(s)."}),
            "rejected": ("IMAGE", {"tooltip": "The image(s) that lose against the chosen ones."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt both images were generated from."}),
            "store": STORE_INPUT,
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, store):
        return validate_store(store)

    def add(self, chosen, rejected, prompt, store):
        s = open_store(store)
        good, bad = tensor_to_pngs(chosen), tensor_to_pngs(rejected)
        if not good or not bad:
            raise ValueError(f"0 pairs: chosen has {len(good)} images and rejected {len(bad)}")
        if len(good) != len(bad) and 1 not in (len(good), len(bad)):
            raise ValueError(f"chosen has {len(good)} images and rejected {len(bad)}: use equal batches or a batch of 1")
        n = max(len(good), len(bad))
        with paths.shown_errors():
            s.add_pairs([(prompt, good[min(i, len(good) - 1)], bad[min(i, len(bad) - 1)]) for i in range(n)],
                        source="AddPair node")
            total = s.count()
        return shown(f"added {n} pair{'s' if n != 1 else ''}; store {s.name!r} holds {total}", (total,))


class LoadStore:
    DESCRIPTION = "Load every pair of a store as PREFERENCE_PAIRS for the Train node."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PAIRS, "INT")
    RETURN_NAMES = ("pairs", "count")
    OUTPUT_TOOLTIPS = ("The store's pairs, chosen image first.", "How many pairs were loaded.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"store": STORE_INPUT}}

    @classmethod
    def VALIDATE_INPUTS(cls, store):
        return validate_store(store)

    @classmethod
    def IS_CHANGED(cls, store):
        try:
            return open_store(store, create=False).fingerprint()
        except ValueError:
            return f"missing:{store}"

    def load(self, store):
        s = open_store(store, create=False)
        with paths.shown_errors():
            examples = s.examples()
        if not examples:
            raise ValueError(f"store {s.name!r} has no pairs yet: pick some in the gallery or use Add Pair")
        n = len(examples)
        return shown(f"loaded {n} pair{'s' if n != 1 else ''} from store {s.name!r}",
                     (PreferencePairs(examples, f"store:{s.name}"), n))


class GalleryPicker:
    DESCRIPTION = ("Show a generated batch with its prompt. In the browser mark images chosen (click / key C) or "
                   "rejected (right-click / key R); every mark is saved to the store at once, and every chosen image "
                   "is paired with every rejected one. Picking does not block the queue.")
    CATEGORY = CATEGORY
    FUNCTION = "show"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The generated batch to pick from (2 or more images)."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt the batch was generated from; stored with every pair."}),
            "store": STORE_INPUT,
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, store):
        return validate_store(store)

    def show(self, images, prompt, store):
        s = open_store(store)
        pngs = tensor_to_pngs(images)
        if len(pngs) < 2:
            raise ValueError(f"a batch of {len(pngs)} image{'s' if len(pngs) != 1 else ''} gives 0 pairs: "
                             "generate 2 or more images to pick from (batch_size of the latent)")
        with paths.shown_errors():
            batch = s.add_batch(prompt, pngs)
        info = {"store": s.name, "batch": batch, "prompt": prompt, "count": len(pngs)}
        return {"ui": {"prefalign_batch": [info]}}


def _safe_file_name(name: str, suffix: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name.strip()).name) or "pairs"
    stem = stem.lstrip(".") or "pairs"
    return stem if stem.endswith(suffix) else stem + suffix


class ExportParquet:
    DESCRIPTION = ("Export a store as a Pick-a-Pic style parquet file (caption, jpg_0 = chosen, jpg_1, label_0 = 1, "
                   "label_1 = 0) in output/prefalign/, ready for `python -m trainer train --data FILE`.")
    CATEGORY = CATEGORY
    FUNCTION = "export"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the written parquet file.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "store": STORE_INPUT,
            "file_name": ("STRING", {"default": "pairs.parquet", "tooltip": "File name inside output/prefalign/ (no folders)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, store):
        return validate_store(store)

    @classmethod
    def IS_CHANGED(cls, store, file_name):
        return LoadStore.IS_CHANGED(store)

    def export(self, store, file_name):
        s = open_store(store, create=False)
        path = comfy_env.output_dir() / "prefalign" / _safe_file_name(file_name, ".parquet")
        with paths.shown_errors():
            n = s.export_parquet(path)
        return shown(f"wrote {n} pairs to {paths.display_path(path)}", (str(path),))


class ImportParquet:
    DESCRIPTION = ("Add the pairs of a Pick-a-Pic style parquet file (or folder of them) to a store: all rows or, "
                   "on a bad row or Cancel, none. Importing the same rows again adds nothing.")
    CATEGORY = CATEGORY
    FUNCTION = "import_"
    OUTPUT_NODE = True
    RETURN_TYPES = ("INT",)
    RETURN_NAMES = ("pairs_added",)
    OUTPUT_TOOLTIPS = ("How many pairs were added.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "parquet_path": ("STRING", {"default": "", "tooltip": "A parquet file or folder inside ComfyUI's input folder (or a folder in $PREFALIGN_DATASETS_DIR), e.g. pickapic/train-0.parquet."}),
            "store": STORE_INPUT,
            "keep_ties": ("BOOLEAN", {"default": False, "tooltip": "Keep tied rows (label 0.5) with jpg_0 as chosen; dropped by default."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, parquet_path, store):
        if parquet_path is not None:  # a linked input is checked when the node runs
            try:
                paths.require_data_path(parquet_path, "parquet_path")
            except ValueError as e:
                return paths.redact(str(e))
        return validate_store(store)

    def import_(self, parquet_path, store, keep_ties):
        s = open_store(store)
        _, node_id = comfy_env.executing_context()
        bars = []

        def progress(done: int, total: int) -> None:
            if not bars:
                bars.append(comfy_env.progress_bar(total, node_id))
            if bars[0] is not None:
                bars[0].update_absolute(done, total)
            comfy_env.throw_if_interrupted()  # Cancel: the import stops with nothing added

        with paths.shown_errors():
            path = paths.require_data_path(parquet_path, "parquet_path")
            done = s.import_parquet(path, keep_ties=keep_ties, progress=progress)
            total = s.count() if done.added else None
        again = f", {done.already_there} already in the store" if done.already_there else ""
        ties = f", {done.ties_dropped} ties dropped (keep_ties keeps them)" if done.ties_dropped else ""
        held = f"; it holds {total}" if total is not None else ""
        return shown(f"added {done.added} of {done.rows} pairs from {paths.display_path(path)} to store {s.name!r}"
                     f"{again}{ties}{held}", (done.added,))


NODES = {
    "PrefAlignAddPair": (AddPair, "Add Preference Pair"),
    "PrefAlignLoadStore": (LoadStore, "Load Preference Pair Store"),
    "PrefAlignGalleryPicker": (GalleryPicker, "Preference Gallery Picker"),
    "PrefAlignExportParquet": (ExportParquet, "Export Preference Pairs (Parquet)"),
    "PrefAlignImportParquet": (ImportParquet, "Import Preference Pairs (Parquet)"),
}

__all__ = ["NODES", "PreferencePairs", "check_store_name", "open_store", "validate_store"]
