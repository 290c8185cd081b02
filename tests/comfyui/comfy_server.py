"""Start a real ComfyUI on CPU with this pack, in a temporary folder, for the integration tests.

Needs COMFYUI_DIR (a ComfyUI checkout) and COMFYUI_PYTHON (a Python that runs it: torch + torchvision +
ComfyUI's requirements + this pack's requirements; default: the current interpreter).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def load_module(name: str, path: Path):
    """sys.modules[name], loaded from `path` if not there yet: for test helpers outside this folder (tests/nodes has
    no __init__.py and is on sys.path only when one of its own tests ran in this process) and for the pack, a folder,
    loaded as a package the way ComfyUI loads it (its __init__.py, relative imports inside)."""
    if name not in sys.modules:
        package = path.is_dir()
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py" if package else path,
                                                      submodule_search_locations=[str(path)] if package else None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def workflow_tools():
    """tests/nodes/workflow_tools.py, which builds the pack's API graphs."""
    return load_module("prefalign_workflow_tools", ROOT / "tests" / "nodes" / "workflow_tools.py")


@contextmanager
def caught_logs(logger: str | None = None):
    """The messages logged to `logger` (default: the root logger) while the block runs, as a list (for the probes
    run with ComfyUI's Python, which read what ComfyUI or diffusers reported, e.g. "lora key not loaded")."""
    messages: list[str] = []
    catcher = logging.Handler()
    catcher.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger(logger).addHandler(catcher)
    try:
        yield messages
    finally:
        logging.getLogger(logger).removeHandler(catcher)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHECKPOINTS = {"tiny_sd15.safetensors": "sd15", "tiny_sdxl.safetensors": "sdxl"}  # file -> family
# models/ folder -> {file: what make_tiny_checkpoint.py makes}; the default server has the SD checkpoints
SD_MODELS = {"checkpoints": CHECKPOINTS}
PACK_FOLDER = "prefalign"  # the pack's folder name under custom_nodes/ (ComfyUI's module name for it)


def pack_import_report(log: str, pack_dir: Path) -> tuple[bool, list[str]]:
    """(loaded, problems) for the pack at `pack_dir` in a ComfyUI log: whether the import-times list shows that
    folder loaded, and the lines reporting that folder failed. The folder's full path is matched, never a word:
    ComfyUI's own import failures (audio nodes without torchaudio) name the checkout's path, which may contain
    "prefalign"."""
    folder = str(pack_dir)
    lines = log.splitlines()
    loaded = any(re.fullmatch(r"\s*[\d.]+ seconds: " + re.escape(folder), line) for line in lines)
    problems = [line for line in lines
                if re.fullmatch(r"\s*[\d.]+ seconds \(IMPORT FAILED\): " + re.escape(folder), line)
                or line.startswith(f"Cannot import {folder} module for custom nodes")]
    return loaded, problems


def checkpoint_nodes(ckpt: str, lora: str | None = None, strength: float = 1.0) -> tuple[dict, list, list, list]:
    """API nodes `ckpt` (Load Checkpoint) and, when `lora` names a file, `lora` (stock LoraLoader on model and clip):
    (nodes, model, clip, vae) outputs to wire into a sampler."""
    nodes = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    model, clip = ["ckpt", 0], ["ckpt", 1]
    if lora:
        nodes["lora"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                                "strength_model": strength, "strength_clip": strength}}
        model, clip = ["lora", 0], ["lora", 1]
    return nodes, model, clip, ["ckpt", 2]


class ComfyServer:
    def __init__(self, base: Path, comfy_dir: Path, python: str, checkpoint_dir: Path | None = None,
                 models: dict[str, dict[str, str]] | None = None, extra_packs: tuple[Path, ...] = ()) -> None:
        """`checkpoint_dir` keeps the tiny checkpoints between runs (made there when missing); `models` says which
        go where (default: the SD1.5 and SDXL checkpoints); `extra_packs` are more custom-node folders to load."""
        self.base, self.comfy_dir, self.python = base, comfy_dir, python
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        models = SD_MODELS if models is None else models
        for d in ("models/loras", "custom_nodes", "output", "input", "temp", "user", *(f"models/{m}" for m in models)):
            (base / d).mkdir(parents=True, exist_ok=True)
        self.pack_dir = base / "custom_nodes" / PACK_FOLDER
        if not self.pack_dir.exists():
            self.pack_dir.symlink_to(ROOT, target_is_directory=True)
        for extra in extra_packs:
            link = base / "custom_nodes" / extra.name
            if not link.exists():
                link.symlink_to(extra, target_is_directory=True)
        for folder, files in models.items():
            store = checkpoint_dir or base / "models" / folder
            for name, family in files.items():
                made = store / name
                if not made.exists():
                    subprocess.run([python, str(HERE / "make_tiny_checkpoint.py"), str(comfy_dir), family, str(made)],
                                   check=True, cwd=base, timeout=900)
                placed = base / "models" / folder / name
                if not placed.exists():
                    placed.symlink_to(made)
        self.log_path = base / "server.log"
        self.proc = None

    @classmethod
    def from_env(cls, base: Path, **kw) -> "ComfyServer":
        """A server (not started) for the ComfyUI at $COMFYUI_DIR run by $COMFYUI_PYTHON (default: this Python), the
        tiny checkpoints kept in $PREFALIGN_CKPT_DIR when it is set; `kw`: `models`, `extra_packs`."""
        cached = os.environ.get("PREFALIGN_CKPT_DIR")
        return cls(base, Path(os.environ["COMFYUI_DIR"]), os.environ.get("COMFYUI_PYTHON", sys.executable),
                   Path(cached) if cached else None, **kw)

    def start(self, timeout: float = 180) -> "ComfyServer":
        cmd = [self.python, "-u", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base),  # models/, custom_nodes/, input/, output/, temp/, user/ under base
               "--disable-auto-launch"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PREFALIGN_STORE_DIR", None)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {self.log_path.read_text()[-3000:]}")
            try:
                self.get("/object_info/KSampler")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not start in {timeout}s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    # --- HTTP -----------------------------------------------------------------------------------
    def request(self, path: str, body: dict | None = None, method: str | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return json.loads(raw) if r.headers.get("Content-Type", "").startswith("application/json") else raw

    def get(self, path: str):
        return self.request(path)

    def post(self, path: str, body: dict):
        return self.request(path, body)

    def queue(self, prompt: dict) -> str:
        client = uuid.uuid4().hex
        try:
            out = self.post("/prompt", {"prompt": prompt, "client_id": client})
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/prompt refused the graph: {e.read().decode()[:3000]}") from None
        return out["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") in ("error", "success"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s; log tail: {self.log_text()[-3000:]}")

    def failure(self, prompt: dict, timeout: float = 300) -> str:
        """Run a prompt that must fail; the failing node's exception message."""
        status = self.wait(self.queue(prompt), timeout).get("status", {})
        errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
        assert status.get("status_str") == "error" and errors, f"the prompt did not fail: {status}"
        return errors[0]["exception_message"]

    def interrupt_at_step(self, prompt_id: str, step: int = 2, timeout: float = 300) -> threading.Thread:
        """Press Cancel (POST /interrupt) once the Train node of `prompt_id` reports `step`; join the thread it runs in."""
        def watch() -> None:
            deadline = time.time() + timeout
            while time.time() < deadline and prompt_id not in self.get(f"/history/{prompt_id}"):
                runs = self.get("/prefalign/train/status")["runs"]
                if any(r["prompt_id"] == prompt_id and r["step"] >= step for r in runs.values()):
                    self.post("/interrupt", {})
                    return
                time.sleep(0.3)

        thread = threading.Thread(target=watch)
        thread.start()
        return thread

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            messages = json.dumps(status.get("messages", []))[-4000:]
            raise AssertionError(f"prompt failed: {messages}")
        return entry

    def image(self, entry: dict, node: str):
        """The first image the SaveImage node `node` wrote in a finished prompt's history `entry`, fetched through
        /view: a float32 RGB array [height, width, 3]."""
        import io

        import numpy as np
        from PIL import Image

        im = entry["outputs"][node]["images"][0]
        raw = self.get(f"/view?filename={im['filename']}&subfolder={im['subfolder']}&type={im['type']}")
        return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float32)


def main() -> None:  # manual use: python tests/comfyui/comfy_server.py BASE -> serves until Ctrl-C
    base = Path(sys.argv[1])
    server = ComfyServer(base, Path(os.environ["COMFYUI_DIR"]), os.environ.get("COMFYUI_PYTHON", sys.executable)).start()
    print(server.url, flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
