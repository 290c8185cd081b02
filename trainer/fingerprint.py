"""Cheap content fingerprints of weights, for cache keys and LoRA metadata."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_fingerprint(location: str) -> str:
    """A cheap content fingerprint of a weights file or folder (first MiB + size of each safetensors
    file), or the string itself when it is not a local path (hub id)."""
    path = Path(location)
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors")) if path.is_dir() else []
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
        digest.update(str(file.stat().st_size).encode())
    if not files:
        digest.update(location.encode())
    return digest.hexdigest()[:16]
