"""HTTP routes the web extension uses. Each takes only what it needs and checks it.

    GET  /prefalign/stores                              names of existing stores
    GET  /prefalign/store?store=S                       how many pairs a store holds
    GET  /prefalign/batch?store=S&batch=B               a gallery batch with its marks
    GET  /prefalign/image?store=S&batch=B&index=I       one image of a gallery batch (PNG)
    POST /prefalign/mark   {store, batch, index, mark}  mark an image chosen / rejected / none; saved at once
    GET  /prefalign/train/status                        live training state (loss curve) per node
    GET  /prefalign/methods                             methods with their default hyper-parameters

ComfyUI serves each at `/x` and `/api/x`. Store names are checked against a strict pattern and the
resolved folder must sit directly in the stores folder; batch ids are 32 hex digits; images are
served only by batch and index, never by a client path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from aiohttp import web

from . import live
from .pair_store import PairStore, StoreError, list_stores

MAX_BODY = 4096  # bytes: a mark request is a few dozen


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def make_routes(stores_base: Callable[[], Path]) -> list[web.RouteDef]:
    def store(name: str | None) -> PairStore:
        if name is None:
            raise StoreError("missing store")
        return PairStore(stores_base(), name, create=False)

    async def stores(request: web.Request) -> web.Response:
        return web.json_response({"stores": list_stores(stores_base())})

    async def store_info(request: web.Request) -> web.Response:
        try:
            s = store(request.query.get("store"))
            return web.json_response({"store": s.name, "pairs": s.count()})
        except StoreError as e:
            return _json_error(400, str(e))

    async def batch(request: web.Request) -> web.Response:
        try:
            s = store(request.query.get("store"))
            return web.json_response(s.batch_state(request.query.get("batch", "")))
        except StoreError as e:
            return _json_error(400, str(e))

    async def image(request: web.Request) -> web.Response:
        try:
            s = store(request.query.get("store"))
            index = int(request.query.get("index", ""))
            path = s.batch_image_path(request.query.get("batch", ""), index)
        except (StoreError, ValueError) as e:
            return _json_error(400, str(e))
        if not path.is_file():
            return _json_error(404, "image file missing")
        return web.FileResponse(path, headers={"Content-Type": "image/png", "Cache-Control": "max-age=86400"})

    async def mark(request: web.Request) -> web.Response:
        if request.content_length is None or request.content_length > MAX_BODY:
            return _json_error(413, f"body must be at most {MAX_BODY} bytes")
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return _json_error(413, f"body must be at most {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return _json_error(400, "body is not JSON")
        if not isinstance(body, dict) or set(body) - {"store", "batch", "index", "mark"}:
            return _json_error(400, "expected {store, batch, index, mark}")
        try:
            s = store(body.get("store"))
            state = s.set_mark(body.get("batch", ""), body.get("index"), body.get("mark"))
        except StoreError as e:
            return _json_error(400, str(e))
        return web.json_response(state)

    async def train_status(request: web.Request) -> web.Response:
        return web.json_response({"runs": live.snapshot()})

    async def methods(request: web.Request) -> web.Response:
        from ..trainer.methods.args import format_args, method_table

        table = method_table()
        return web.json_response({n: {**t, "text": format_args(t["defaults"])} for n, t in table.items()})

    return [
        web.get("/prefalign/stores", stores),
        web.get("/prefalign/store", store_info),
        web.get("/prefalign/batch", batch),
        web.get("/prefalign/image", image),
        web.post("/prefalign/mark", mark),
        web.get("/prefalign/train/status", train_status),
        web.get("/prefalign/methods", methods),
    ]


def register() -> bool:
    """Add the routes to ComfyUI's server; False outside ComfyUI."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    from .comfy_env import stores_base

    for route in make_routes(stores_base):
        server.routes.route(route.method, route.path)(route.handler)
    return True
