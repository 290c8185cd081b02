"""Write one benchmark's section of benchmarks/RESULTS.md, leaving the other sections as they are; load the pack
as ComfyUI does (for the benchmarks of its nodes)."""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = Path(__file__).resolve().parents[1]
HEADER = "# Benchmark results\n\nEach section is written by the script it names; rerun the script to refresh it.\n"


def machine() -> str:
    """A one-line description of where the figures were measured."""
    return f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.python_version()}"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section `name` atomically."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = f"{begin}\n## {name}\n\n_Measured {stamp} on {machine()}._\n\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(name: str, body: str, write: bool = True) -> None:
    """Print a benchmark's table and, unless told not to (`--no-write`), make it its RESULTS.md section."""
    print(body)
    if write:
        write_section(name, body)


def load_pack():
    """The pack as ComfyUI imports it: a package by path, `prefalign_pack`."""
    spec = importlib.util.spec_from_file_location("prefalign_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["prefalign_pack"] = pack
    spec.loader.exec_module(pack)
    return pack
