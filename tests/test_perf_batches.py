"""The batch pipeline's fast paths keep its behaviour: workers, pinned memory, lazy cache, shards, resume."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import make_pairs, tiny_config
from trainer import encoding
from trainer.batches import BatchStream
from trainer.distributed import Ranks
from trainer.encoding import EncodingCache, cache_setting, encode_batches, entry_keys_by_flip
from trainer.methods import build_method


class FakeBackend:
    """Deterministic stand-in for the VAE and text encoders (fast, no diffusers)."""

    device = torch.device("cpu")
    weight_dtype = torch.float32

    def __init__(self, fail_above: int | None = None) -> None:
        self.fail_above = fail_above
        self.image_calls: list[int] = []
        self.releases = 0

    def release_encoders(self) -> None:
        self.releases += 1

    def model_info(self) -> dict[str, str]:
        return {"name": "fake", "hash": "fakehash", "architecture": "sd15"}

    def encode_images(self, pixels):
        self.image_calls.append(pixels.shape[0])
        if self.fail_above is not None and pixels.shape[0] > self.fail_above:
            raise torch.cuda.OutOfMemoryError("fake OOM")
        return F.avg_pool2d(pixels.float(), 2)

    def encode_prompts(self, prompts):
        codes = torch.tensor([[float(ord(c)) for c in (p + " " * 8)[:8]] for p in prompts])
        return {"prompt_embeds": codes[:, None, :].repeat(1, 3, 1), "pooled": codes}


def stream(tmp_path, examples, backend=None, **overrides):
    config = tiny_config(tmp_path, **overrides)
    return BatchStream(config, backend or FakeBackend(), examples, build_method(config.method, config.method_args),
                       Ranks.single())


def take(s, n):
    return [s.next_batch().local for _ in range(n)]


def assert_same(a, b):
    assert a.prompts == b.prompts and a.paired == b.paired
    assert torch.equal(a.latents, b.latents) and torch.equal(a.labels, b.labels)
    assert a.cond.keys() == b.cond.keys()
    for name in a.cond:
        assert torch.equal(a.cond[name], b.cond[name]), name


def test_workers_give_the_same_batches_and_position(tmp_path):
    pairs = make_pairs(6)
    plain = stream(tmp_path / "a", pairs, cache=False, num_workers=0, random_flip=True)
    workers = stream(tmp_path / "b", pairs, cache=False, num_workers=2, random_flip=True)
    for step in range(5):  # crosses an epoch boundary (3 batches of 2 per epoch)
        assert_same(plain.next_batch().local, workers.next_batch().local)
        # the workers read ahead, but the position is that of the last batch handed out
        assert workers.state_dict() == plain.state_dict()
    workers.close()


def test_resume_with_workers_continues_exactly(tmp_path):
    pairs = make_pairs(6)
    straight = stream(tmp_path / "a", pairs, cache=False, num_workers=2)
    expected = take(straight, 5)
    first = stream(tmp_path / "b", pairs, cache=False, num_workers=2)
    take(first, 2)
    state = first.state_dict()
    first.close()
    resumed = stream(tmp_path / "c", pairs, cache=False, num_workers=2)
    take(resumed, 1)  # a started stream also jumps
    resumed.load_state_dict(state)
    for want, got in zip(expected[2:], take(resumed, 3)):
        assert_same(want, got)
    resumed.close()


def test_cached_and_per_step_batches_match(tmp_path):
    pairs = make_pairs(6)
    cached = stream(tmp_path / "a", pairs, cache=True, num_workers=2, random_flip=True)
    fresh = stream(tmp_path / "b", pairs, cache=False, num_workers=0, random_flip=True)
    for _ in range(4):
        a, b = cached.next_batch().local, fresh.next_batch().local
        assert a.prompts == b.prompts
        torch.testing.assert_close(a.latents, b.latents)
        for name in a.cond:
            torch.testing.assert_close(a.cond[name], b.cond[name])
        assert cached.state_dict() == fresh.state_dict()


def test_encoders_released_once_the_cache_is_complete(tmp_path):
    """With the cache filled, training needs only the UNet: the backend may move its encoders off the
    accelerator. Per-step encoding keeps them."""
    cached_backend, fresh_backend = FakeBackend(), FakeBackend()
    cached = stream(tmp_path / "a", make_pairs(4), backend=cached_backend, cache=True)
    take(cached, 3)
    assert cached_backend.releases == 1
    fresh = stream(tmp_path / "b", make_pairs(4), backend=fresh_backend, cache=False)
    take(fresh, 3)
    assert fresh_backend.releases == 0


def test_diffusers_backend_encodes_the_same_after_releasing_its_encoders(tmp_path):
    from trainer.run import make_backend

    backend = make_backend(tiny_config(tmp_path), torch.device("cpu"))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    before, text = backend.encode_images(pixels), backend.encode_prompts(["a fox"])
    backend.release_encoders()
    parts = [backend.parts.vae, *backend.parts.text_encoders]
    assert {p.device.type for m in parts for p in m.parameters()} == {"cpu"}
    torch.testing.assert_close(backend.encode_images(pixels), before)
    torch.testing.assert_close(backend.encode_prompts(["a fox"])["prompt_embeds"], text["prompt_embeds"])


def test_cache_reopens_lazily_and_writes_few_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(encoding, "SHARD_ENTRIES", 4)
    pairs = make_pairs(10)
    first = stream(tmp_path, pairs, random_flip=True)  # 20 entries -> 5 shards of 4
    shards = sorted((tmp_path / "cache").rglob("shard-*.safetensors"))
    assert len(shards) == 5
    reopened = EncodingCache(shards[0].parent)
    assert len(reopened) == 20 and not reopened.entries  # only the index was read
    key = next(iter(first.loader.dataset.entry_keys.values()))
    got, want = reopened.get(key), first.cache.get(key)
    assert torch.equal(got.latents, want.latents) and got.prompt == want.prompt
    assert key in reopened.entries  # kept in memory after first use
    tight = EncodingCache(shards[0].parent, memory_budget=0)
    assert torch.equal(tight.get(key).latents, want.latents) and not tight.entries
    backend = FakeBackend()
    again = stream(tmp_path, pairs, backend=backend, random_flip=True)  # nothing left to encode
    assert backend.image_calls == []
    assert_same(again.next_batch().local, stream(tmp_path / "x", pairs, random_flip=True).next_batch().local)


def test_cache_key_covers_crop_seed_and_vae(tmp_path):
    backend, pair = FakeBackend(), make_pairs(1)[0]

    def key(**kw):
        args = dict(resolution=32, center_crop=True, seed=0, vae=None) | kw
        return entry_keys_by_flip(pair, (False,), cache_setting(backend, **args))[False]

    assert key(seed=1) == key(seed=0)  # a centre crop does not depend on the seed
    assert key(center_crop=False, seed=1) != key(center_crop=False, seed=0)  # a random crop does
    assert key(vae="madebyollin/sdxl-vae-fp16-fix") != key()
    assert key(resolution=64) != key()
    assert entry_keys_by_flip(pair, (True,), cache_setting(backend, 32, True, 0))[True] != key()


def pairs_on_disk(folder, n):
    """make_pairs(n) with each image in its own file."""
    from dataclasses import replace

    folder.mkdir()
    rows = []
    for i, pair in enumerate(make_pairs(n)):
        paths = (folder / f"{i}-chosen.png", folder / f"{i}-rejected.png")
        for path, data in zip(paths, pair.images):
            path.write_bytes(data)
        rows.append(replace(pair, images=tuple(str(p) for p in paths)))
    return rows


def test_cache_keys_hash_setting_prompt_flip_and_image_bytes(tmp_path):
    """The keys of existing cache folders: sha256 of setting, prompt, flip byte, images' bytes; first 32 hex digits."""
    import hashlib

    on_disk, in_memory = pairs_on_disk(tmp_path / "images", 1)[0], make_pairs(1)[0]
    for flip in (False, True):
        want = hashlib.sha256(b"model|32|True" + in_memory.prompt.encode() + bytes([flip]) + b"".join(in_memory.images))
        for pair in (on_disk, in_memory):
            assert entry_keys_by_flip(pair, (False, True), "model|32|True")[flip] == want.hexdigest()[:32]


def test_filling_the_cache_with_random_flip_fetches_each_row_and_reads_each_image_once(tmp_path, monkeypatch):
    from pathlib import Path

    rows = pairs_on_disk(tmp_path / "images", 3)
    stream(tmp_path, rows, random_flip=True)  # fills the cache: the next stream only computes the keys

    class Counted(list):
        fetched: list[int] = []

        def __getitem__(self, i):
            self.fetched.append(i)
            return super().__getitem__(i)

    reads, read_bytes = [], Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or read_bytes(self))
    backend, examples = FakeBackend(), Counted(rows)
    again = stream(tmp_path, examples, backend=backend, random_flip=True)
    assert backend.image_calls == [] and len(again.loader.dataset) == 3
    assert examples.fetched == [0, 1, 2]
    assert sorted(reads) == sorted(Path(p).name for row in rows for p in row.images)


def test_out_of_memory_while_caching_splits_the_batch(tmp_path):
    backend = FakeBackend(fail_above=2)  # at most one pair per VAE call
    pairs = make_pairs(5)
    s = stream(tmp_path, pairs, backend=backend)
    assert len(s.cache) == 5 and max(backend.image_calls) > 2  # it tried big batches, then split them
    fresh = stream(tmp_path / "b", pairs, cache=False)
    a, b = s.next_batch().local, fresh.next_batch().local
    torch.testing.assert_close(a.latents, b.latents)


def test_encode_batches_flushes_what_it_encoded_on_error(tmp_path):
    cache = EncodingCache(tmp_path)
    from trainer.data.dataset import collate
    from trainer.data.transforms import ImageTransform

    items = [ImageTransform(32)(e, False, None) for e in make_pairs(3)]

    def batches():
        yield ["k0"], collate(items[:1])
        yield ["k1"], collate(items[1:2])
        raise KeyboardInterrupt

    try:
        encode_batches(cache, FakeBackend(), batches())
    except KeyboardInterrupt:
        pass
    assert len(EncodingCache(tmp_path)) == 2
