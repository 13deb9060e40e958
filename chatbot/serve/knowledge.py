"""The service's knowledge: the live index (a cleanup context) and the admin HTTP API (a sub-app).

``knowledge_ctx`` loads the embedder and the base index (the default Wikipedia knowledge base unless
``--knowledge`` names another directory, or ``none``), starts this worker's ``LiveKnowledge`` (which
follows the deployment's change log in Redis: ``retrieval.live``) and hands the reply engine a retriever
over it.  It runs after the Redis context and before the batcher, which takes the engine as it is then.

Admin API, under ``/admin`` and only with ``Authorization: Bearer <admin token>`` (``$CHATBOT_ADMIN_TOKEN``
or ``--admin-token-file``; with no token configured every admin call gets 403):

    POST   /admin/knowledge/passages        {"documents": [{"id", "text", "title"?, "url"?, "source"?}, ...]}
                                            -> 201 {"added": [passage ids], "entry": log id}
    DELETE /admin/knowledge/passages/{id}   a passage id or a document id -> 200 {"deleted": [passage ids]}
    GET    /admin/knowledge/search?q=..&k=5 -> 200 {"results": [{"id", "title", "url", "text", "score", ...}]}
    GET    /admin/knowledge                 -> 200 {"passages", "log_position", "applied", "epoch"}

Errors are JSON ``{"error": code, "message": ...}``: 400 ``bad_request`` / ``invalid_document``,
401 ``unauthorized``, 403 ``admin_disabled``, 404 ``unknown_id``, 409 ``duplicate_id``,
503 ``knowledge_disabled`` / ``store_unavailable``.  A 201 or 200 means this worker already answers
with the change; every other worker sharing the Redis follows within milliseconds.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from chatbot.serve.state import CONFIG, ENGINE, STORE
from retrieval.documents import DocumentError, document_from_dict
from retrieval.knowledge import DuplicateId, KnowledgeError, UnknownId
from retrieval.live import ChangeRefused, LiveKnowledge

log = logging.getLogger(__name__)

KNOWLEDGE = web.AppKey("knowledge", LiveKnowledge)
MAX_DOCUMENTS_PER_CALL = 1000


async def knowledge_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    if cfg.knowledge is None:
        yield
        return
    from retrieval.default_kb import ensure_default_index
    from retrieval.embedder import load_embedder
    from retrieval.retriever import KnowledgeRetriever

    embedder = await asyncio.to_thread(load_embedder, cfg.embedder)
    base = (await asyncio.to_thread(ensure_default_index, embedder) if cfg.knowledge == "default"
            else Path(cfg.knowledge))
    live = LiveKnowledge(app[STORE].redis, base, embedder, cfg.data_path, snapshot_every_s=cfg.knowledge_snapshot_s)
    await live.start()
    app[KNOWLEDGE] = live
    engine = app[ENGINE]
    if hasattr(engine, "with_retriever"):  # test stand-ins for the engine may not retrieve
        app[ENGINE] = engine.with_retriever(KnowledgeRetriever(lambda: live.index, k=cfg.knowledge_k,
                                                                 min_score=cfg.knowledge_min_score))
    try:
        yield
    finally:
        await live.close()


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def require_admin(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    token = request.config_dict[CONFIG].admin_token
    if not token:
        return error(403, "admin_disabled", "the admin API is off: start the service with $CHATBOT_ADMIN_TOKEN "
                                            "or --admin-token-file")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        response = error(401, "unauthorized", "send the admin token as `Authorization: Bearer TOKEN`")
        response.headers["WWW-Authenticate"] = 'Bearer realm="chatbot-admin"'
        return response
    if KNOWLEDGE not in request.config_dict:
        return error(503, "knowledge_disabled", "this service runs without knowledge (--knowledge none)")
    try:
        return await handler(request)
    except (ConnectionError, TimeoutError, OSError) as e:
        log.warning("admin call failed on Redis: %s", e)
        return error(503, "store_unavailable", "the knowledge log in Redis is unreachable; retry shortly")
    except Exception as e:  # redis.exceptions.* are not builtin errors
        if type(e).__module__.startswith("redis"):
            log.warning("admin call failed on Redis: %s", e)
            return error(503, "store_unavailable", "the knowledge log in Redis is unreachable; retry shortly")
        raise


async def add_passages(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error(400, "bad_request", "the body must be JSON: {\"documents\": [{\"id\", \"text\", ...}]}")
    documents = body.get("documents") if isinstance(body, dict) else None
    if not isinstance(documents, list) or not documents:
        return error(400, "bad_request", "expected {\"documents\": [...]} with at least one document")
    if len(documents) > MAX_DOCUMENTS_PER_CALL:
        return error(400, "bad_request", f"at most {MAX_DOCUMENTS_PER_CALL} documents per call")
    try:
        docs = [document_from_dict(d, f"documents[{i}]", default_source="admin") for i, d in enumerate(documents)]
        result = await request.config_dict[KNOWLEDGE].add_documents(docs)
    except DuplicateId as e:
        return web.json_response({"error": "duplicate_id", "message": str(e), "ids": e.ids}, status=409)
    except (DocumentError, ChangeRefused) as e:
        return error(400, "invalid_document", str(e))
    return web.json_response(result, status=201)


async def delete_passage(request: web.Request) -> web.Response:
    ident = request.match_info["id"]
    try:
        result = await request.config_dict[KNOWLEDGE].delete(ident)
    except (UnknownId, ChangeRefused) as e:
        return error(404, "unknown_id", str(e))
    return web.json_response(result)


async def search(request: web.Request) -> web.Response:
    query = request.query.get("q", "")
    try:
        k = int(request.query.get("k", "5"))
        hits = await request.config_dict[KNOWLEDGE].search(query, k)
    except ValueError as e:  # KnowledgeError included: empty query, k out of range
        return error(400, "bad_request", str(e) if isinstance(e, KnowledgeError) else "k must be an integer")
    return web.json_response({"results": [{"score": round(h.score, 4), **h.passage.to_dict()} for h in hits]})


async def status(request: web.Request) -> web.Response:
    live = request.config_dict[KNOWLEDGE]
    passages = await asyncio.to_thread(len, live.index)
    return web.json_response({"passages": passages, "log_position": live.position, "applied": live.applied,
                              "epoch": live.epoch})


def admin_app() -> web.Application:
    admin = web.Application(middlewares=[require_admin])
    admin.router.add_get("/knowledge", status)
    admin.router.add_post("/knowledge/passages", add_passages)
    admin.router.add_delete("/knowledge/passages/{id:.+}", delete_passage)  # ids may contain "/"
    admin.router.add_get("/knowledge/search", search)
    return admin
