"""Hostile input on the trainer side: NaN losses, LoRA files for another base model, pickles anywhere.

(Corrupt images, truncated parquet, bad labels and decompression bombs are the data loader's tests.)
"""
from __future__ import annotations

import ast
import math
import pickle  # noqa: F401  (only to build a pickle file the loader must refuse; allowed in tests/)
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from trainer import loop
from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.export import check_lora_matches, load_lora_into, lora_target_shapes, read_lora
from trainer.loop import NonFiniteLossError, TrainHooks, train
from trainer.run import make_backend

ROOT = Path(__file__).resolve().parents[1]


def backend_for(config):
    torch.manual_seed(config.seed)
    return make_backend(config, torch.device("cpu"))


# --- NaN / inf ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, pairs, bad):
    real_build = loop.build_method
    calls = []

    def build_method(name, args):
        method = real_build(name, args)
        real_loss = method.loss

        def loss(outputs):
            value, metrics = real_loss(outputs)
            calls.append(1)
            if len(calls) == 3:  # step 3 (one micro-batch per step)
                value = value * bad
                metrics = {**metrics, "loss": value.detach()}
            return value, metrics

        method.loss = loss
        return method

    monkeypatch.setattr(loop, "build_method", build_method)
    config = tiny_config(tmp_path, max_steps=6, checkpoint_every=1, log_every=2)
    with pytest.raises(NonFiniteLossError, match=rf"loss is {bad} at step 3; stopped\. Last good checkpoint: .*step-2"):
        train(config, backend_for(config), pairs)
    root = tmp_path / "out" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-1", "step-2"]
    assert all(t.isfinite().all() for t in load_checkpoint(root / "step-2").adapter.values())
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_nonfinite_weights_are_never_checkpointed(tmp_path, pairs):
    """A finite loss can come with non-finite gradients; the weights are checked before every save."""
    config = tiny_config(tmp_path, max_steps=5, checkpoint_every=1)
    backend = backend_for(config)

    def poison(report):
        if report.step == 3:
            with torch.no_grad():
                backend.trainable_parameters()[0][0, 0] = math.nan

    with pytest.raises(NonFiniteLossError, match=r"LoRA weights became NaN or infinite at step 3.*step-2"):
        train(config, backend, pairs, TrainHooks(on_step=poison))
    assert [p.name for p in list_checkpoints(tmp_path / "out" / "checkpoints")] == ["step-1", "step-2"]


# --- a LoRA for another base model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory) -> Path:
    """A tiny-sd LoRA file with non-zero weights, as the trainer writes it."""
    from trainer.atomic import save_safetensors

    tmp = tmp_path_factory.mktemp("sd-lora")
    backend = backend_for(tiny_config(tmp, model="tiny-sd"))
    torch.manual_seed(1)
    for p in backend.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp / "sd.safetensors"
    save_safetensors(path, backend.export_lora(), {"prefalign.architecture": "sd15", "prefalign.base_model": "tiny-sd"})
    return path


def test_lora_for_another_base_model_is_refused_naming_the_mismatch(tmp_path, sd_lora):
    sdxl = backend_for(tiny_config(tmp_path, model="tiny-sdxl"))
    before = sdxl.adapter_state_dict()
    with pytest.raises(ValueError, match=r"sd\.safetensors: LoRA does not match this base model \(the LoRA was trained "
                                         r"for sd15 tiny-sd, this model is sdxl tiny-sdxl\): module lora_unet_\w+ has "
                                         r"in/out features 32/64 in the LoRA, 64/64 in the model"):
        load_lora_into(sdxl, sd_lora)
    after = sdxl.adapter_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded


def test_modules_the_model_lacks_are_named(tmp_path, sd_lora):
    weights, _ = read_lora(sd_lora)
    expected = lora_target_shapes(backend_for(tiny_config(tmp_path)).model)
    weights["lora_unet_extra_block_to_q.lora_down.weight"] = torch.zeros(4, 32)
    weights["lora_unet_extra_block_to_q.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(ValueError, match=r"1 of its \d+ modules do not exist in it, e\.g\. lora_unet_extra_block_to_q"):
        check_lora_matches(weights, expected, "x.safetensors")


def test_lora_of_the_right_base_loads_whatever_its_rank_and_alpha(tmp_path, sd_lora):
    """Rank is not a base-model mismatch: a rank-8 LoRA passes the check; loading it needs a rank-8 adapter."""
    weights, _ = read_lora(sd_lora)
    rank4 = backend_for(tiny_config(tmp_path, rank=4, alpha=1.0))
    check_lora_matches(weights, lora_target_shapes(rank4.model), sd_lora)
    padded = {k: torch.cat([v, v], 0) if k.endswith("lora_down.weight") else
              torch.cat([v, torch.zeros_like(v)], 1) if k.endswith("lora_up.weight") else v for k, v in weights.items()}
    check_lora_matches(padded, lora_target_shapes(rank4.model), sd_lora)  # rank 8, same base: fine

    load_lora_into(rank4, sd_lora)  # file alpha 4, adapter alpha 1: the update is kept
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10])
    cond = rank4.encode_prompts(["a square"])
    reference = backend_for(tiny_config(tmp_path, rank=4, alpha=4.0))
    load_lora_into(reference, sd_lora)
    with torch.no_grad():
        torch.testing.assert_close(rank4.predict(x, t, cond), reference.predict(x, t, cond))
        with rank4.reference():
            assert (rank4.predict(x, t, cond) - reference.predict(x, t, cond)).abs().max() > 1e-4  # it did load

    rank8 = backend_for(tiny_config(tmp_path, rank=8, alpha=4.0))
    with pytest.raises(ValueError, match="LoRA has rank 4, this run's adapter rank 8; set rank = 4"):
        load_lora_into(rank8, sd_lora)


def test_pickled_lora_files_are_refused_without_being_opened(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match="from .safetensors only"):
        read_lora(path)
    fake = tmp_path / "evil.safetensors"  # a pickle in disguise
    fake.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_lora(fake)


# --- nothing is unpickled anywhere ---------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SKIP = {".venv", ".git", "node_modules", "__pycache__", ".pytest_cache"}


def python_files() -> list[Path]:
    """The project's own Python files: not this test, nor any virtual environment (whatever its name)."""
    venvs = {d.name for d in ROOT.iterdir() if (d / "pyvenv.cfg").is_file()}
    return [p for p in ROOT.rglob("*.py")
            if not (SKIP | venvs) & set(p.relative_to(ROOT).parts) and p.resolve() != Path(__file__).resolve()]


def unpickling_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}

            def is_true(name: str) -> bool:
                value = keywords.get(name)
                return isinstance(value, ast.Constant) and value.value is True

            if func.endswith(("torch.load", "torch.serialization.load")) and not is_true("weights_only"):
                found.append((node.lineno, f"{func}(...) without weights_only=True"))
            elif func.endswith(("np.load", "numpy.load")) and "allow_pickle" in keywords and not (
                    isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False):
                found.append((node.lineno, f"{func}(..., allow_pickle=...)"))
            elif func.split(".")[-1] in ("read_pickle", "to_pickle", "load_pickle", "pickle_load"):
                found.append((node.lineno, func))
    return found


def test_nothing_is_unpickled_anywhere():
    files = python_files()
    assert len(files) > 20 and any(p.parts[-2:] == ("trainer", "loop.py") for p in files)
    offences = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in files
                for line, what in unpickling_calls(ast.parse(p.read_text(), str(p)))]
    assert not offences, "\n".join(offences)


def test_the_unpickling_scan_catches_what_it_should():
    code = ("import pickle\nfrom dill import loads\nimport torch, numpy as np\ntorch.load('x')\n"
            "torch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\npd.read_pickle('x')\n"
            "torch.load('x', weights_only=True)\nnp.load('x')\n")
    assert [line for line, _ in unpickling_calls(ast.parse(code))] == [1, 2, 4, 5, 6, 7]
