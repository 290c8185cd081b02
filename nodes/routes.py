"""HTTP routes the web extension uses. Each takes only what it needs and checks it.

    GET  /prefalign/stores                              names of existing stores
    GET  /prefalign/store?store=S                       how many pairs a store holds
    GET  /prefalign/batch?store=S&batch=B               a gallery batch with its marks
    GET  /prefalign/image?store=S&batch=B&index=I       one image of a gallery batch (PNG)
    POST /prefalign/mark   {store, batch, index, mark}  mark an image chosen / rejected / none; saved at once
    GET  /prefalign/train/status                        live training state (loss curve) per node
    GET  /prefalign/methods                             methods with their default hyper-parameters
    GET  /prefalign/model_methods?folder=F&name=N&sampling=S
                                                        which methods train the model file a loader names

ComfyUI serves each at `/x` and `/api/x`. Store names are checked against a strict pattern and the
resolved folder must sit directly in the stores folder; batch ids are 32 hex digits; indexes plain decimal
digits; images are served only by batch and index, never by a client path.

Store work runs in the event loop's thread pool, never on the loop itself: a store another process is
writing to keeps one request waiting (at most ROUTE_BUSY_TIMEOUT, then 503 "store busy"), never the server.
Errors answer JSON {"error": message}: 400 for a bad request, 503 for a busy store, 500 for a damaged one.
"""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from . import live
from .pair_store import PairStore, StoreBusyError, StoreDamagedError, StoreError, list_stores

MAX_BODY = 4096  # bytes: a mark request is a few dozen
ROUTE_BUSY_TIMEOUT = 2.0  # seconds a request waits for another process's write before answering 503
INDEX_RE = re.compile(r"[0-9]{1,6}")  # ASCII digits only: no sign, spaces, '_' or other scripts' digits


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _status(e: StoreError) -> int:
    if isinstance(e, StoreBusyError):
        return 503
    if isinstance(e, StoreDamagedError):
        return 500
    return 400


def _index(text: str | None) -> int:
    if text is None or not INDEX_RE.fullmatch(text):
        raise StoreError(f"index must be a plain decimal number, got {text!r:.40}")
    return int(text)


async def off_loop(work: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, work)


async def answer(work: Callable[[], Any]) -> web.Response:
    """Run store work off the event loop and answer its result as JSON, or its error."""
    try:
        return web.json_response(await off_loop(work))
    except StoreError as e:
        return _json_error(_status(e), str(e))


def store_opener(stores_base: Callable[[], Path], busy_timeout: float) -> Callable[[Any], PairStore]:
    """Opens an existing store by the name a request gives."""
    def store(name: Any) -> PairStore:
        if name is None:
            raise StoreError("missing store")
        return PairStore(stores_base(), name, create=False, busy_timeout=busy_timeout)

    return store


def make_routes(stores_base: Callable[[], Path], busy_timeout: float = ROUTE_BUSY_TIMEOUT) -> list[web.RouteDef]:
    store = store_opener(stores_base, busy_timeout)

    async def stores(request: web.Request) -> web.Response:
        return await answer(lambda: {"stores": list_stores(stores_base())})

    async def store_info(request: web.Request) -> web.Response:
        def work():
            s = store(request.query.get("store"))
            return {"store": s.name, "pairs": s.count()}

        return await answer(work)

    async def batch(request: web.Request) -> web.Response:
        name, batch_id = request.query.get("store"), request.query.get("batch", "")
        return await answer(lambda: store(name).batch_state(batch_id))

    async def image(request: web.Request) -> web.Response:
        name, batch_id = request.query.get("store"), request.query.get("batch", "")
        try:
            index = _index(request.query.get("index"))
            data = await off_loop(lambda: store(name).batch_image(batch_id, index))
        except StoreError as e:
            return _json_error(_status(e), str(e))
        return web.Response(body=data, headers={"Content-Type": "image/png", "Cache-Control": "max-age=86400"})

    async def mark(request: web.Request) -> web.Response:
        if request.content_length is None or request.content_length > MAX_BODY:
            return _json_error(413, f"body must be at most {MAX_BODY} bytes")
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return _json_error(413, f"body must be at most {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nesting deeper than Python's stack
            return _json_error(400, "body is not JSON (or is nested too deeply)")
        if not isinstance(body, dict) or set(body) - {"store", "batch", "index", "mark"}:
            return _json_error(400, "expected {store, batch, index, mark}")
        return await answer(
            lambda: store(body.get("store")).set_mark(body.get("batch", ""), body.get("index"), body.get("mark"))
        )

    async def train_status(request: web.Request) -> web.Response:
        return web.json_response({"runs": live.snapshot()})

    async def methods(request: web.Request) -> web.Response:
        from ..trainer.methods.args import format_args, method_table

        table = method_table()
        return web.json_response({n: {**t, "text": format_args(t["defaults"], t["per_model"])} for n, t in table.items()})

    async def model_methods(request: web.Request) -> web.Response:
        from .model_probe import ProbeError, probe

        q = request.query
        try:  # reads a file header and builds a model on the meta device: off the loop
            return web.json_response(await off_loop(lambda: probe(q.get("folder", ""), q.get("name", ""),
                                                                  q.get("sampling", ""))))
        except ProbeError as e:
            return _json_error(400, str(e))
        except Exception as e:  # not a readable safetensors file, or ComfyUI's detection failed on it
            return _json_error(400, f"cannot read this model file's header ({type(e).__name__})")

    return [
        web.get("/prefalign/stores", stores),
        web.get("/prefalign/store", store_info),
        web.get("/prefalign/batch", batch),
        web.get("/prefalign/image", image),
        web.post("/prefalign/mark", mark),
        web.get("/prefalign/train/status", train_status),
        web.get("/prefalign/methods", methods),
        web.get("/prefalign/model_methods", model_methods),
    ]


def register() -> bool:
    """Add these routes and the Gallery Picker's scorer routes (score_routes.py) to ComfyUI's server; False outside
    ComfyUI."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    from .comfy_env import stores_base
    from .score_routes import make_score_routes  # it imports this module

    for route in make_routes(stores_base) + make_score_routes(stores_base):
        server.routes.route(route.method, route.path)(route.handler)
    return True
