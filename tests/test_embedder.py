"""CLIP embeddings for RPO: a tiny CLIP built from config, cached beside the latents, in chosen-first order."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_pairs, tiny_config
from trainer.data.dataset import collate
from trainer.data.transforms import ImageTransform
from trainer.loop import TrainHooks, train
from trainer.models.embedder import ClipEmbedder, EmbeddingBackend
from trainer.run import make_backend


def test_embeddings_are_unit_vectors_of_the_clip_projection(tiny_clip):
    from transformers import CLIPModel

    embedder = ClipEmbedder(str(tiny_clip))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():  # at the model's own size no resize happens: only [-1,1] -> CLIP normalisation
        out = model.vision_model(pixel_values=((pixels + 1) / 2 - mean) / std).pooler_output
        want = F.normalize(model.visual_projection(out), dim=-1)
    torch.testing.assert_close(embedder.images(pixels), want, atol=1e-5, rtol=1e-4)
    texts = embedder.text(["a red square", "a blue circle"])
    assert torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(texts[0], texts[1])


@pytest.mark.parametrize("cache", [True, False])
def test_rpo_trains_with_image_embeddings_in_chosen_first_order(tmp_path, tiny_clip, cache, monkeypatch):
    import trainer.step as step

    config = tiny_config(tmp_path, method="rpo", embedder=str(tiny_clip), cache=cache, max_steps=2,
                         method_args={"embedding": "both"})
    seen = []
    real = step.compute_outputs
    monkeypatch.setattr("trainer.loop.compute_outputs", lambda *a: seen.append(real(*a)) or seen[-1])
    pairs = make_pairs(2)
    result = train(config, make_backend(config, torch.device("cpu")), pairs, TrainHooks())
    assert result.steps == 2
    embedder = ClipEmbedder(str(tiny_clip))
    raw = collate([ImageTransform(32)(e, False, None) for e in pairs])
    chosen, rejected = embedder.images(raw["pixels"][:, 0]), embedder.images(raw["pixels"][:, 1])
    out = seen[0]
    for i in range(2):  # each row's image embedding is its own image's, whatever order the sampler drew
        row_w, row_l = out.image_emb[i], out.image_emb[2 + i]
        j = int(torch.argmax(chosen @ row_w))
        torch.testing.assert_close(row_w, chosen[j], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(row_l, rejected[j], atol=1e-5, rtol=1e-4)
    assert out.prompt_emb.shape == (4, 16)  # the CLIP text embedding, not the pipeline's pooled one


@pytest.mark.parametrize("embedding", ["image", "both"])
def test_rpo_image_embeddings_without_an_embedder_stop_before_encoding(tmp_path, embedding):
    """Image embeddings come only from a CLIP embedder: without one, RPO is refused before any encoding or output,
    where it used to fail at the first step."""
    config = tiny_config(tmp_path, method="rpo", max_steps=1, method_args={"embedding": embedding})
    backend = make_backend(config, torch.device("cpu"))
    backend.encode_prompts = lambda prompts: pytest.fail("encoded before refusing")
    with pytest.raises(ValueError, match="rpo.*compares CLIP image embeddings, which need a CLIP model: set embedder"):
        train(config, backend, make_pairs(2))
    assert not Path(config.output_dir).exists()


def test_embedding_backend_delegates_everything_else(tmp_path, tiny_clip):
    backend = make_backend(tiny_config(tmp_path), torch.device("cpu"))
    wrapped = EmbeddingBackend(backend, str(tiny_clip))
    assert wrapped.model is backend.model and wrapped.num_train_timesteps == backend.num_train_timesteps
    cond = wrapped.encode_prompts(["a square"])
    assert set(cond) == {"prompt_embeds", "pooled", "embed_text"}


def test_released_encoders_wait_on_the_cpu_and_come_back(tmp_path, tiny_clip):
    """After the cache fill the wrapped backend's encoders and the CLIP embedder are offloaded; using
    them again brings them back, with the same results."""
    from torch import nn

    from trainer.models.offload import Offloadable

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moves: list[str] = []

        def to(self, device):
            self.moves.append(str(device))
            return self

    spy = Spy()
    held = Offloadable([spy], torch.device("meta"))  # any non-CPU device: only the moves are recorded
    held.ready()
    held.offload()
    held.offload()
    held.ready()
    assert spy.moves == ["cpu", "meta"]

    wrapped = EmbeddingBackend(make_backend(tiny_config(tmp_path), torch.device("cpu")), str(tiny_clip))
    before = wrapped.encode_prompts(["a square"])
    calls = []
    for placement in (wrapped.encoders, wrapped.embedder.placement):
        placement.offload = lambda real=placement.offload: calls.append(1) or real()
    wrapped.release_encoders()
    assert len(calls) == 2
    after = wrapped.encode_prompts(["a square"])
    assert all(torch.equal(before[k], after[k]) for k in before)
