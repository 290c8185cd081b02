"""Routes for scorer-assisted curation in the Gallery Picker (web/prefalign_compare.js).

    GET  /prefalign/automark?store=S&batch=B[&per_side=N&margin=X]   suggested marks from the batch's scores
    POST /prefalign/compare        {store, batch, winner, loser}      record one side-by-side judgement as a pair
    POST /prefalign/compare/undo   {store, pair}                      take back a judgement (compare pairs only)

Suggestions come from the scores Score Images for Preference computed for exactly the batch's images (matched by
content hash); nothing is marked until the page applies them through the ordinary mark route. As in routes.py,
store work runs in a worker thread, never on the event loop (a store another process is writing to answers 503
"store busy" after ROUTE_BUSY_TIMEOUT); bodies are small JSON objects with exactly the expected keys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from aiohttp import web

from .pair_store import StoreError
from .routes import INDEX_RE, ROUTE_BUSY_TIMEOUT, _json_error, _status, answer, off_loop, store_opener
from .score_nodes import REGISTRY

MAX_BODY = 1024  # bytes: a judgement is a few dozen
COMPARE_SOURCE = "compare"


async def _body(request: web.Request, keys: set[str]) -> dict:
    if request.content_length is None or request.content_length > MAX_BODY:
        raise StoreError(f"body must be a JSON object of at most {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deeper than Python's stack
        raise StoreError("body is not JSON") from None
    if not isinstance(body, dict) or set(body) != keys:
        raise StoreError(f"expected {{{', '.join(sorted(keys))}}}")
    return body


def _index(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreError(f"{name} must be a non-negative integer")
    return value


def make_score_routes(stores_base: Callable[[], Path], busy_timeout: float = ROUTE_BUSY_TIMEOUT) -> list[web.RouteDef]:
    store = store_opener(stores_base, busy_timeout)

    def suggestions(name: str, batch: str, per_side: int, margin: float) -> dict:
        from ..trainer.pairs import suggest_marks

        scored = REGISTRY.find(tuple(store(name).batch_shas(batch)))
        if scored is None:
            return {"error": "no scores for this batch: put a Score Images for Preference node between the images and the picker "
                             "and run the graph again"}
        return {"marks": suggest_marks(scored.judgement, margin, per_side), "scores": scored.judgement.combined,
                "scorer": scored.scorer}

    async def automark(request: web.Request) -> web.Response:
        q = request.query
        try:
            per_side = int(q["per_side"]) if INDEX_RE.fullmatch(q.get("per_side", "")) else 1
            margin = float(q.get("margin", "0"))
            if not margin >= 0:
                raise StoreError("margin must be a number >= 0")
            found = await off_loop(lambda: suggestions(q.get("store"), q.get("batch", ""), max(1, per_side), margin))
        except StoreError as e:
            return _json_error(_status(e), str(e))
        except ValueError as e:
            return _json_error(400, str(e))
        return web.json_response(found, status=404 if "error" in found else 200)

    def record(body: dict) -> dict:
        s = store(body["store"])
        batch, winner, loser = body["batch"], _index(body["winner"], "winner"), _index(body["loser"], "loser")
        if winner == loser:
            raise StoreError("winner and loser must be different images")
        pair = s.add_batch_pair(batch, winner, loser, source=COMPARE_SOURCE)
        return {"pair": pair, "total_pairs": s.count()}

    def undo(body: dict) -> dict:
        s = store(body["store"])
        pair = _index(body["pair"], "pair")
        if not s.delete_pair(pair, source=COMPARE_SOURCE):
            raise StoreError(f"pair {pair} is not a comparison judgement in store {s.name!r}")
        return {"deleted": pair, "total_pairs": s.count()}

    def handler(fn, keys: set[str]):
        async def handle(request: web.Request) -> web.Response:
            try:
                body = await _body(request, keys)
            except StoreError as e:
                return _json_error(400, str(e))
            return await answer(lambda: fn(body))
        return handle

    return [
        web.get("/prefalign/automark", automark),
        web.post("/prefalign/compare", handler(record, {"store", "batch", "winner", "loser"})),
        web.post("/prefalign/compare/undo", handler(undo, {"store", "pair"})),
    ]

