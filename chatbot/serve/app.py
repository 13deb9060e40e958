"""The aiohttp application: an async factory that ``chatbot serve`` and the tests both call.

External resources each get one cleanup context (acquire, yield, release): the model, Redis, the
knowledge index (chatbot/serve/knowledge.py, which also serves the admin API under /admin), the
batcher.  ``stop_gracefully`` shuts down in this order: the listening socket closes; new sessions and
messages are refused with a retryable ``shutting_down`` error; in-flight replies get
``shutdown_grace_s`` to finish (the rest are failed with that error); every websocket is closed with
1001 GOING_AWAY; then aiohttp's own shutdown runs and the contexts unwind in reverse: batcher,
knowledge, Redis, model.  The draining happens before aiohttp's shutdown because from then on aiohttp
stops reading client frames, so a client could neither be told why nor complete the close handshake.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import WSCloseCode, web

from chatbot.generate import DecodingConfig, ReplyEngine
from chatbot.serve.batcher import Batcher, Engine
from chatbot.serve.config import ServeConfig
from chatbot.serve.connection import ChatConnection
from chatbot.serve.knowledge import admin_app, knowledge_ctx
from chatbot.serve.metrics import ServiceMetrics
from chatbot.serve.protocol import ErrorCode, ProtocolError
from chatbot.serve.ratelimit import RateLimiter
from chatbot.serve.redis_backend import open_redis
from chatbot.serve.sessions import SessionStore
from chatbot.serve.state import (
    BATCHER, CONFIG, ENGINE, INFLIGHT, LIFECYCLE, LIMITER, METRICS, SOCKETS, STORE, Lifecycle,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


def decoding_config(config: ServeConfig) -> DecodingConfig:
    """Sample-and-rank with the engine's defaults, except the two knobs that set the CPU cost."""
    return DecodingConfig(strategy="sample_and_rank", num_candidates=config.num_candidates,
                          max_new_tokens=config.max_new_tokens)


def load_engine(config: ServeConfig) -> Engine:
    """Load the model directory and warm it up (first-call allocations happen here, not in a reply).
    Sets torch's thread count for the process: only a process that serves its own model does this."""
    import torch

    from chatbot.modeldir import load_model

    torch.set_num_threads(config.model_threads)
    loaded = load_model(config.model_dir, config.device)
    engine = ReplyEngine(loaded.model, loaded.tokenizer, device=config.device)
    engine.reply([["hello"]], DecodingConfig(num_candidates=2, max_new_tokens=2))
    log.info("model %s loaded (%.1fM parameters, %d torch threads)", loaded.directory,
             loaded.model.num_parameters() / 1e6, torch.get_num_threads())
    return engine


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    async with open_redis(cfg.redis_url, cfg.data_path) as client:
        app[STORE] = SessionStore(client, cfg.session_ttl_s)
        if not await app[STORE].ping():  # not fatal: clients get store_unavailable until it is back
            log.warning("Redis at %s is not reachable yet", cfg.redis_url)
        yield


def engine_ctx(engine: Engine | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # Loading takes seconds of CPU: a thread keeps the loop (and the other contexts) responsive.
        app[ENGINE] = engine if engine is not None else await asyncio.to_thread(load_engine, app[CONFIG])
        yield
    return ctx


async def batcher_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    batcher = Batcher(app[ENGINE], decoding_config(cfg), cfg.max_batch_size, cfg.max_wait_ms, cfg.max_queue,
                      app[METRICS])
    batcher.start()
    app[BATCHER] = batcher
    yield
    await batcher.close()


async def drain_and_close(app: web.Application) -> None:
    """Finish (or cleanly fail) in-flight replies, then close every socket GOING_AWAY.  Also the
    on_shutdown hook, for runners that skip ``stop_gracefully``; a second call does nothing."""
    if app[LIFECYCLE].closing:
        return
    app[LIFECYCLE].closing = True
    inflight = set(app[INFLIGHT])
    if inflight:
        log.info("shutdown: waiting up to %.1fs for %d in-flight replies", app[CONFIG].shutdown_grace_s, len(inflight))
        _, late = await asyncio.wait(inflight, timeout=app[CONFIG].shutdown_grace_s)
        for task in late:
            task.cancel()  # the task tells its client "shutting_down" (retryable)
        await asyncio.gather(*late, return_exceptions=True)
    sockets = list(app[SOCKETS])
    await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in sockets),
                         return_exceptions=True)


async def stop_gracefully(runner: web.AppRunner) -> None:
    """Stop accepting connections, drain while open sockets are still read, then tear everything down."""
    for site in list(runner.sites):
        await site.stop()
    await drain_and_close(runner.app)
    await runner.cleanup()


async def websocket(request: web.Request) -> web.WebSocketResponse:
    app, cfg = request.app, request.app[CONFIG]
    ws = web.WebSocketResponse(heartbeat=cfg.heartbeat_s, max_msg_size=cfg.max_frame_bytes)
    await ws.prepare(request)
    conn = ChatConnection(ws, app)
    # Refusals are sent as typed frames on an open socket: a browser cannot read an HTTP status.
    if app[LIFECYCLE].closing:
        await conn.send_error(ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect"))
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
        return ws
    if len(app[SOCKETS]) >= cfg.max_connections:
        await conn.send_error(ProtocolError(ErrorCode.TOO_MANY_CONNECTIONS,
                                            f"the server holds its limit of {cfg.max_connections} connections; retry later"))
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too many connections")
        return ws
    app[SOCKETS].add(ws)
    app[METRICS].connections.inc()
    try:
        await conn.run()
    finally:
        app[SOCKETS].discard(ws)
        app[METRICS].connections.dec()
    return ws


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    redis_ok = await app[STORE].ping()
    closing = app[LIFECYCLE].closing
    ready = redis_ok and not closing and ENGINE in app
    return web.json_response({"ready": ready, "model": ENGINE in app, "redis": redis_ok, "shutting_down": closing},
                             status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def create_app(config: ServeConfig | None = None, *, engine: Engine | None = None) -> web.Application:
    """Build the service.  ``engine``: an already loaded reply engine (tests share one); None loads
    ``config.model_dir`` during startup."""
    config = config or ServeConfig()
    app = web.Application()
    app[CONFIG] = config
    app[METRICS] = ServiceMetrics()
    app[LIMITER] = RateLimiter(config.rate_per_minute, config.rate_burst)
    app[LIFECYCLE] = Lifecycle()
    app[SOCKETS] = weakref.WeakSet()
    app[INFLIGHT] = set()
    # The model first: a bad --model fails before any Redis process is started.
    # Knowledge after Redis (its change log lives there), before the batcher (which takes the engine
    # with its retriever).
    app.cleanup_ctx.extend([engine_ctx(engine), redis_ctx, knowledge_ctx, batcher_ctx])
    app.on_shutdown.append(drain_and_close)
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.add_subapp("/admin", admin_app())
    return app


async def start_runner(config: ServeConfig, *, engine: Engine | None = None, port: int | None = None) -> web.AppRunner:
    """Start the service listening on ``config.host`` and ``port`` (default ``config.port``; 0 picks a
    free one); ``runner.addresses`` says where.  Stop it with ``stop_gracefully(runner)``.  A startup
    that fails (a bad model, a port in use) releases what it had acquired before raising."""
    # aiohttp waits shutdown_timeout for handlers after its on_shutdown; our grace is spent before that.
    runner = web.AppRunner(await create_app(config, engine=engine), access_log=None, shutdown_timeout=5.0)
    try:
        await runner.setup()
    except BaseException:
        await runner.cleanup()
        raise
    port = config.port if port is None else port
    try:
        await web.TCPSite(runner, config.host, port).start()
    except OSError as e:  # typically the port is taken
        await stop_gracefully(runner)
        raise RuntimeError(f"cannot listen on {config.host}:{port}: {e.strerror}; pick another --port") from e
    return runner
