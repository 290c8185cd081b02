"""What a Hugging Face hub id looks like, and whether the hub can be asked: decided before any
library call that would retry for half a minute or answer with a page of traceback."""
from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.utils import build_hf_headers, get_session

#: owner/name, as the hub spells repository ids: each part starts with a letter or digit (and `..` is
#: refused by `looks_like_hub_id`).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
#: Seconds to wait for the hub before calling it unreachable.
PROBE_TIMEOUT = 5.0


def looks_like_hub_id(text: str) -> bool:
    return HUB_ID.fullmatch(text) is not None and ".." not in text


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, read now rather than at import."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "on", "yes", "true")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Some snapshot of the repository was downloaded before (huggingface_hub's cache layout)."""
    return (Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots").is_dir()


def hub_problem(repo_id: str, repo_type: str = "model") -> str | None:
    """Why `repo_id` cannot be loaded now (offline and not cached, no network, no such repository), or None.

    One request with a short timeout and no retries, through huggingface_hub's own session (so proxy
    settings and a login token apply). The hub answers 401 for a repository that does not exist or is
    private to someone else, 404 with a token."""
    cached = in_hub_cache(repo_id, repo_type)
    if hub_offline():
        return None if cached else ("not in the local hub cache, and HF_HUB_OFFLINE is set: hub ids need a "
                                    "download (unset HF_HUB_OFFLINE, or give a local folder)")
    url = f"{constants.ENDPOINT}/api/{repo_type}s/{repo_id}"
    try:
        status = get_session().head(url, headers=build_hf_headers(), timeout=PROBE_TIMEOUT).status_code
    except Exception as e:  # no route, DNS failure, timeout, proxy refusal: the HTTP client's many errors
        where = ("; a copy is in the local cache: set HF_HUB_OFFLINE=1 to use it" if cached
                 else " (check the network, or give a local folder)")
        return f"cannot reach {constants.ENDPOINT} ({type(e).__name__}), and hub ids need a download{where}"
    if status in (401, 404):
        return f"no such {repo_type} on {constants.ENDPOINT} (a typo? a private one needs `hf auth login`)"
    return None


def hub_refusal(location: str, repo_type: str = "model") -> str | None:
    """Why `location`, which names no local file or folder, cannot be loaded as a hub id now (a sentence), or None."""
    problem = hub_problem(location, repo_type)
    return None if problem is None else f"{location} is not a local file or folder; as a hub id: {problem}"
