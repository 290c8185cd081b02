"""Thin, lazy access to ComfyUI's modules, so the pack imports (and is testable) without ComfyUI.

Everything ComfyUI-specific the nodes need goes through here: folders, progress, interrupts,
messages to the browser. Tests replace these modules in `sys.modules` with small fakes.
"""
from __future__ import annotations

import os
from pathlib import Path

PACK = "prefalign"


def folder_paths():
    import folder_paths as fp  # ComfyUI's top-level module

    return fp


def stores_base() -> Path:
    """Where pair stores live: $PREFALIGN_STORE_DIR, else ComfyUI's user directory /prefalign_stores."""
    env = os.environ.get("PREFALIGN_STORE_DIR")
    if env:
        return Path(env)
    fp = folder_paths()
    base = fp.get_user_directory() if hasattr(fp, "get_user_directory") else fp.get_output_directory()
    return Path(base) / "prefalign_stores"


def output_dir() -> Path:
    return Path(folder_paths().get_output_directory())


def temp_dir() -> Path:
    return Path(folder_paths().get_temp_directory())


def loras_dir() -> Path:
    """The first models/loras folder: where LoraLoader looks."""
    return Path(folder_paths().get_folder_paths("loras")[0])


def lora_names() -> list[str]:
    try:
        return list(folder_paths().get_filename_list("loras"))
    except Exception:
        return []


def lora_full_path(name: str) -> Path:
    fp = folder_paths()
    path = fp.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"LoRA file {name!r} not found in models/loras")
    return Path(path)


def throw_if_interrupted() -> None:
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def interrupted() -> bool:
    """True once the user pressed Cancel; does not clear the flag (ComfyUI's own check still raises)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    if hasattr(mm, "processing_interrupted"):
        return bool(mm.processing_interrupted())
    return bool(getattr(mm, "interrupt_processing", False))


def is_interrupt(exc: BaseException) -> bool:
    return type(exc).__name__ == "InterruptProcessingException"


def raise_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException (reported as execution_interrupted)."""
    import comfy.model_management as mm

    raise mm.InterruptProcessingException()


def progress_bar(total: int, node_id: str | None = None):
    try:
        import comfy.utils
    except ImportError:
        return None
    try:
        return comfy.utils.ProgressBar(total, node_id=node_id)
    except TypeError:  # older signature
        return comfy.utils.ProgressBar(total)


def send(event: str, payload: dict) -> None:
    """Broadcast `prefalign.<event>` to the browser; silently nothing outside ComfyUI."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(f"{PACK}.{event}", payload)


def executing_context() -> tuple[str | None, str | None]:
    """(prompt_id, node_id) of the node now running, when ComfyUI tells us."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None, None
    ctx = get_executing_context()
    if ctx is None:
        return None, None
    return getattr(ctx, "prompt_id", None), getattr(ctx, "node_id", None)
