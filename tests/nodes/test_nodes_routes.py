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
    assert ("GET", "/prefalign/automark") in added and ("POST", "/prefalign/compare/undo") in added  # one register


def test_deep_json_is_a_bad_request(batch):
    """Issue 14 item 11: nesting under the 4 KB limit raised RecursionError (500 with a traceback)."""
    base, store, b = batch

    async def scenario(client):
        for raw in (b"[" * 4000, b'{"store": ' + b"[" * 2000 + b"]" * 2000 + b"}"):
            assert len(raw) <= routes.MAX_BODY
            r = await client.post("/prefalign/mark", data=raw, headers={"Content-Type": "application/json"})
            assert r.status == 400 and "nested too deeply" in (await r.json())["error"]

    run(base, scenario)


@pytest.mark.parametrize("index", [" 1", "1 ", "+1", "-0", "1_0", "\u0661", "0x1", "1e0", "", "1" * 7])
def test_image_index_is_plain_decimal(batch, index):
    """Issue 14 item 11: int() accepted signs, spaces, '_' and other scripts' digits."""
    base, store, b = batch

    async def scenario(client):
        r = await client.get("/prefalign/image", params={"store": "art", "batch": b, "index": index})
        assert r.status == 400 and "plain decimal" in (await r.json())["error"]

    run(base, scenario)


def test_corrupt_store_answers_with_a_message(batch):
    """Issue 14 item 11: a corrupt pairs.sqlite gave 500 with a traceback; now JSON naming the store."""
    base, store, b = batch
    store.db_path.write_bytes(b"this is not a database" * 100)
    for extra in ("-wal", "-shm"):
        store.db_path.with_name(store.db_path.name + extra).unlink(missing_ok=True)

    async def scenario(client):
        answers = [await client.get("/prefalign/store", params={"store": "art"}),
                   await client.get("/prefalign/batch", params={"store": "art", "batch": b}),
                   await client.get("/prefalign/image", params={"store": "art", "batch": b, "index": "0"}),
                   await client.post("/prefalign/mark", json={"store": "art", "batch": b, "index": 0, "mark": "chosen"})]
        for r in answers:
            assert r.status == 500 and r.content_type == "application/json"
            assert (await r.json())["error"].startswith("store 'art' is damaged: its pairs.sqlite does not read")

    run(base, scenario)


def test_tampered_image_name_serves_nothing(batch):
    """Issue 14 item 12: a batch record naming '../..' served any PNG by path; names must be sha256 digests."""
    import sqlite3

    base, store, b = batch
    secret = base.parent / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nSECRET")
    rel = "../../secret"  # images/<rel[:2]>/<rel>.png resolves to base.parent/secret.png
    assert (store.images_dir / rel[:2] / f"{rel}.png").resolve() == secret.resolve()
    with sqlite3.connect(store.db_path) as con:
        con.execute("UPDATE batches SET images = ?", (json.dumps([rel, rel]),))

    async def scenario(client):
        r = await client.get("/prefalign/image", params={"store": "art", "batch": b, "index": "0"})
        body = await r.read()
        assert r.status == 500 and b"SECRET" not in body
        assert "does not list image names" in json.loads(body)["error"]

    run(base, scenario)


LOCK_HOLDER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
con.execute("INSERT INTO meta VALUES ('lock holder', 'x')")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_writer_in_another_process_blocks_neither_the_server_nor_reads(batch):
    """Issue 14 item 5: another process holds the store's write lock for 20 s. The event loop stays free
    (an unrelated route answers at once), reads answer (read-only, WAL: no writes on GET), and a mark
    answers 503 "busy" after the short busy timeout instead of hanging the whole server."""
    import subprocess
    import sys
    import time

    base, store, b = batch
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(store.db_path), "20"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"

        async def timed(request):
            start = time.monotonic()
            r = await request
            return r, time.monotonic() - start

        async def scenario(client):
            marking = asyncio.ensure_future(timed(client.post(
                "/prefalign/mark", json={"store": "art", "batch": b, "index": 0, "mark": "chosen"})))
            await asyncio.sleep(0.3)  # the mark is now waiting for the lock
            r, took = await timed(client.get("/prefalign/train/status"))
            assert r.status == 200 and took < 1.5, f"unrelated route took {took:.1f} s while a mark waited"
            for path, params in (("/prefalign/store", {"store": "art"}), ("/prefalign/batch", {"store": "art", "batch": b}),
                                 ("/prefalign/image", {"store": "art", "batch": b, "index": "1"}),
                                 ("/prefalign/stores", {})):
                r, took = await timed(client.get(path, params=params))
                assert r.status == 200 and took < 1.5, (path, r.status, took)
            r, took = await marking
            assert r.status == 503 and "busy" in (await r.json())["error"]
            assert took < 10, f"the mark answered after {took:.1f} s"
            assert not marking.cancelled()

        run(base, scenario)
        assert holder.poll() is None  # the lock was held throughout
    finally:
        holder.kill()
        holder.wait()
    assert store.batch_state(b)["marks"] == ["none"] * 4
