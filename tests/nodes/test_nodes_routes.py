"""The HTTP routes, through aiohttp's test client (what ComfyUI's server runs them on)."""
from __future__ import annotations

import asyncio
import json

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

import prefalign_pack  # noqa: E402

routes = prefalign_pack.nodes.routes
PairStore = prefalign_pack.nodes.pair_store.PairStore


def run(base, scenario):
    async def main():
        app = web.Application()
        app.add_routes(routes.make_routes(lambda: base))
        async with TestClient(TestServer(app)) as client:
            return await scenario(client)

    return asyncio.run(main())


@pytest.fixture
def batch(tmp_path):
    from PIL import Image
    import io

    def png(v):
        b = io.BytesIO()
        Image.new("RGB", (8, 8), (v, v, v)).save(b, format="PNG")
        return b.getvalue()

    s = PairStore(tmp_path, "art")
    return tmp_path, s, s.add_batch("a fox", [png(10), png(20), png(30), png(40)])


def test_mark_flow(batch):
    base, store, b = batch

    async def scenario(client):
        r = await client.get("/prefalign/stores")
        assert (await r.json()) == {"stores": ["art"]}
        r = await client.get("/prefalign/batch", params={"store": "art", "batch": b})
        assert (await r.json())["marks"] == ["none"] * 4
        for idx, mark in [(0, "chosen"), (1, "chosen"), (2, "rejected"), (3, "rejected")]:
            r = await client.post("/prefalign/mark", json={"store": "art", "batch": b, "index": idx, "mark": mark})
            assert r.status == 200, await r.text()
        state = await r.json()
        assert state["pairs"] == 4 and state["total_pairs"] == 4
        r = await client.get("/prefalign/image", params={"store": "art", "batch": b, "index": "2"})
        assert r.status == 200 and r.headers["Content-Type"] == "image/png"
        body = await r.read()
        assert body[:8] == b"\x89PNG\r\n\x1a\n"
        r = await client.get("/prefalign/store", params={"store": "art"})
        assert (await r.json()) == {"store": "art", "pairs": 4}
        r = await client.get("/prefalign/store", params={"store": "../x"})
        assert r.status == 400
        r = await client.get("/prefalign/train/status")
        assert "runs" in await r.json()

    run(base, scenario)
    assert store.count() == 4  # saved at once, no separate "save" step


@pytest.mark.parametrize("body,status", [
    ({"store": "../x", "batch": "0" * 32, "index": 0, "mark": "chosen"}, 400),
    ({"store": "art", "batch": "../../etc", "index": 0, "mark": "chosen"}, 400),
    ({"store": "art", "batch": "BATCH", "index": 9, "mark": "chosen"}, 400),
    ({"store": "art", "batch": "BATCH", "index": "0", "mark": "chosen"}, 400),
    ({"store": "art", "batch": "BATCH", "index": 0, "mark": "great"}, 400),
    ({"store": "art", "batch": "BATCH", "index": 0, "mark": "chosen", "path": "/etc/passwd"}, 400),
    ({"store": "nostore", "batch": "BATCH", "index": 0, "mark": "chosen"}, 400),
    ([1, 2], 400),
])
def test_mark_rejects_bad_requests(batch, body, status):
    base, store, b = batch
    if isinstance(body, dict) and body.get("batch") == "BATCH":
        body = {**body, "batch": b}

    async def scenario(client):
        r = await client.post("/prefalign/mark", json=body)
        assert r.status == status
        assert "error" in await r.json()

    run(base, scenario)
    assert store.count() == 0
    assert sorted(p.name for p in base.iterdir()) == ["art"]  # nothing created outside / beside the store


def test_body_limits(batch):
    base, store, b = batch

    async def scenario(client):
        big = json.dumps({"store": "art", "batch": b, "index": 0, "mark": "chosen", "x": "a" * 10000})
        r = await client.post("/prefalign/mark", data=big, headers={"Content-Type": "application/json"})
        assert r.status == 413
        r = await client.post("/prefalign/mark", data=b"not json", headers={"Content-Type": "application/json"})
        assert r.status == 400

    run(base, scenario)


def test_image_route_rejects_traversal(batch):
    base, store, b = batch
    (base / "secret.png").write_bytes(b"x")

    async def scenario(client):
        for params in ({"store": "..", "batch": b, "index": "0"}, {"store": "art", "batch": "../secret", "index": "0"},
                       {"store": "art", "batch": b, "index": "../../secret.png"}, {"store": "art", "batch": b, "index": "7"}):
            r = await client.get("/prefalign/image", params=params)
            assert r.status == 400, params

    run(base, scenario)


def test_methods_route(batch):
    base, _, _ = batch

    async def scenario(client):
        r = await client.get("/prefalign/methods")
        table = await r.json()
        assert "dpo" in table and "beta" in table["dpo"]["defaults"] and "beta = " in table["dpo"]["text"]

    run(base, scenario)


def test_register_adds_routes_to_comfy_server(pack, monkeypatch):
    import sys

    added = []

    class Routes:
        def route(self, method, path):
            def deco(fn):
                added.append((method, path))
                return fn
            return deco

    sys.modules["server"].PromptServer.instance.routes = Routes()
    assert routes.register() is True
    assert ("POST", "/prefalign/mark") in added and ("GET", "/prefalign/image") in added
