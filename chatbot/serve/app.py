"""The aiohttp application: an async factory that ``chatbot serve`` and the tests both call.

External resources each get one cleanup context (acquire, yield, release): the model, Redis (and
its health check), the knowledge index (chatbot/serve/knowledge.py, which also serves the admin API
under /admin), the batcher and the reply service on top of them.  ``stop_gracefully`` shuts down
in this order: the listening socket closes; new sessions and messages are refused with a retryable
``shutting_down`` error; in-flight replies get ``shutdown_grace_s`` to finish (the rest are failed
with that error); every websocket is closed with 1001 GOING_AWAY, each client getting
``close_grace_s`` to answer the close frame; then aiohttp's own shutdown runs and the contexts unwind
in reverse: batcher, knowledge, Redis, model.  The draining happens before aiohttp's shutdown because
from then on aiohttp stops reading client frames, so a client could neither be told why nor complete
the close handshake.

Browser security: every response carries a strict Content-Security-Policy (the page's script and
styles are static files; nothing inline, nothing from elsewhere), nosniff, no framing and no
referrer; the websocket refuses browser pages from other origins (``origin_allowed``).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, hdrs, web

from chatbot.generate import DecodingConfig, ReplyEngine
from chatbot.serve.batcher import Batcher, Engine
from chatbot.serve.config import ServeConfig
from chatbot.serve.connection import ChatConnection
from chatbot.serve.knowledge import admin_app, knowledge_ctx
from chatbot.serve.metrics import ServiceMetrics
from chatbot.serve.protocol import ErrorCode, ProtocolError, shutting_down
from chatbot.serve.redis_backend import open_redis
from chatbot.serve.replies import ReplyService
from chatbot.serve.sessions import SessionStore, StoreHealth
from chatbot.serve.state import BATCHER, CONFIG, CONNECTIONS, ENGINE, HEALTH, METRICS, SERVICE, STORE

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"

SECURITY_HEADERS = {
    # Scripts, styles and the websocket only from this origin ('self' covers ws:/wss: to the same host).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers without CSP level 2
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def decoding_config(config: ServeConfig) -> DecodingConfig:
    """Sample-and-rank with the engine's defaults, except the knobs that set the CPU cost and the minimum length."""
    return DecodingConfig(strategy="sample_and_rank", num_candidates=config.num_candidates,
                          max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens)


def load_engine(config: ServeConfig) -> Engine:
    """Load the model directory and warm it up (first-call allocations happen here, not in a reply).
    Sets torch's thread count for the process: only a process that serves its own model does this."""
    import torch

    from chatbot.modeldir import load_model

    torch.set_num_threads(config.model_threads)
    loaded = load_model(config.model_dir, config.device)
    engine = ReplyEngine(loaded.model, loaded.tokenizer, device=config.device, ranker=config.ranking.build(config.device),
                         **config.memory.engine_options(loaded, config.embedder))
    engine.reply([["hello"]], DecodingConfig(num_candidates=2, max_new_tokens=2))
    cfg = loaded.model.config
    log.info("model %s loaded (%s parameters%s, %d torch threads)", loaded.directory,
             f"{loaded.model.num_parameters():,}", f", {cfg.quantization}" if cfg.quantization else "",
             torch.get_num_threads())
    return engine


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    async with open_redis(cfg.redis_url, cfg.data_path, cfg.redis_timeout_s) as client:
        app[STORE] = SessionStore(client, cfg.session_ttl_s)
        app[HEALTH] = health = StoreHealth(app[STORE], cfg.health_interval_s)
        if not await health.check():  # not fatal: clients get store_unavailable until it is back
            log.warning("Redis at %s is not reachable yet", cfg.redis_url)
        health.start()
        try:
            yield
        finally:
            await health.close()


def engine_ctx(engine: Engine | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # Loading takes seconds of CPU: a thread keeps the loop (and the other contexts) responsive.
        app[ENGINE] = engine if engine is not None else await asyncio.to_thread(load_engine, app[CONFIG])
        yield
    return ctx


async def service_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    batcher = Batcher(app[ENGINE], decoding_config(cfg), cfg.max_batch_size, cfg.max_wait_ms, cfg.max_queue,
                      app[METRICS])
    batcher.start()
    app[BATCHER] = batcher
    app[SERVICE] = ReplyService(cfg, app[STORE], batcher, app[METRICS])
    yield
    await batcher.close()


async def drain_and_close(app: web.Application) -> None:
    """Finish (or cleanly fail) in-flight replies, then close every socket GOING_AWAY.  Also the
    on_shutdown hook, for runners that skip ``stop_gracefully``; a second call does nothing."""
    if SERVICE not in app or app[SERVICE].closing:
        return
    await app[SERVICE].drain(app[CONFIG].shutdown_grace_s)
    connections = list(app[CONNECTIONS])
    if connections:
        # Each waits at most close_grace_s for its client's close frame; the bound is a safety net.
        await asyncio.wait([asyncio.ensure_future(c.go_away()) for c in connections],
                           timeout=app[CONFIG].close_grace_s + 5.0)


async def stop_gracefully(runner: web.AppRunner) -> None:
    """Stop accepting connections, drain while open sockets are still read, then tear everything down."""
    for site in list(runner.sites):
        await site.stop()
    await drain_and_close(runner.app)
    await runner.cleanup()


def _origin_key(scheme: str, host: str, port: int | None) -> tuple[str, str, int]:
    return scheme, host.lower(), port or (443 if scheme in ("https", "wss") else 80)


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """May this request open the websocket?  Clients that send no Origin (not browsers) may; a browser
    page may when it is served by this host, or its origin is configured (``allowed_origins``).

    Same origin means the Origin's host equals the request's Host header, port included when the Host
    names one; behind a reverse proxy that forwards Host (nginx: ``proxy_set_header Host $http_host``,
    or ``$host``, which drops the port) this is the host the browser sees.  A browser cannot forge
    Origin or Host, which is all this check guards against."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        return True
    if "*" in allowed:
        return True
    try:
        o = urlsplit(origin)
        if o.scheme not in ("http", "https") or not o.hostname:
            return False  # "null" (a file or sandboxed page) and anything odd
        key = _origin_key(o.scheme, o.hostname, o.port)
        for entry in allowed:
            a = urlsplit(entry)
            if a.hostname and _origin_key(a.scheme, a.hostname, a.port) == key:
                return True
        h = urlsplit("//" + request.host)
        if not h.hostname or h.hostname.lower() != o.hostname.lower():
            return False
        return h.port is None or h.port == key[2]
    except ValueError:  # a malformed port in Origin or Host
        return False


async def websocket(request: web.Request) -> web.StreamResponse:
    app, cfg = request.app, request.app[CONFIG]
    if not origin_allowed(request, cfg.allowed_origins):
        log.debug("refused a websocket from origin %r (Host %r)", request.headers.get(hdrs.ORIGIN), request.host)
        raise web.HTTPForbidden(text="this origin may not open the chat websocket (see --allowed-origin)\n")
    # timeout: how long close() waits for the client's close frame.
    ws = web.WebSocketResponse(heartbeat=cfg.heartbeat_s, max_msg_size=cfg.max_frame_bytes,
                               timeout=cfg.close_grace_s)
    await ws.prepare(request)
    conn = ChatConnection(ws, app[SERVICE], app[METRICS])
    if app[SERVICE].closing:
        await conn.refuse(shutting_down(), WSCloseCode.GOING_AWAY, b"server shutdown")
        return ws
    if len(app[CONNECTIONS]) >= cfg.max_connections:
        await conn.refuse(ProtocolError(ErrorCode.TOO_MANY_CONNECTIONS,
                                        f"the server holds its limit of {cfg.max_connections} connections; retry later"),
                          WSCloseCode.TRY_AGAIN_LATER, b"too many connections")
        return ws
    app[CONNECTIONS].add(conn)
    app[METRICS].connections.inc()
    try:
        await conn.run()
    finally:
        app[CONNECTIONS].discard(conn)
        app[METRICS].connections.dec()
    return ws


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-cache")  # revalidate: a new release shows at once


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Answers at once: Redis's state is the background health check's latest result."""
    app = request.app
    redis_ok = HEALTH in app and app[HEALTH].healthy
    closing = SERVICE not in app or app[SERVICE].closing
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
    app[CONNECTIONS] = weakref.WeakSet()
    # The model first: a bad --model fails before any Redis process is started.
    # Knowledge after Redis (its change log lives there), before the batcher (which takes the engine
    # with its retriever).
    app.cleanup_ctx.extend([engine_ctx(engine), redis_ctx, knowledge_ctx, service_ctx])
    app.on_shutdown.append(drain_and_close)
    app.on_response_prepare.append(add_security_headers)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC)
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
