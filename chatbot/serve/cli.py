"""``chatbot serve``: run the chat service (websocket at /ws, web page at /, /healthz, /readyz, /metrics)."""

from __future__ import annotations

import argparse
import logging
import os

from chatbot.serve.config import ServeConfig

log = logging.getLogger(__name__)


def add_serve(sub: argparse._SubParsersAction) -> None:
    d = ServeConfig()
    p = sub.add_parser("serve", help="run the websocket chat service and its web page",
                       description="Serve the chat model over websockets (protocol: docs/protocol.md). Sessions live in "
                                   "Redis: --redis-url or $REDIS_URL, else an embedded Redis persisting under --data-dir.")
    p.add_argument("--host", default=d.host, help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="port (default: %(default)s)")
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or None,
                   help="redis://HOST:PORT/DB or unix:///PATH (default: $REDIS_URL, else embedded Redis)")
    p.add_argument("--data-dir", help="embedded Redis data directory (default: $CHATBOT_DATA or ~/.local/share/chatbot)")
    p.add_argument("--session-ttl", type=int, default=d.session_ttl_s, help="seconds a session lives after its last use (default: %(default)s)")
    p.add_argument("--num-candidates", type=int, default=d.num_candidates, help="sample-and-rank candidates per reply (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="reply length limit in tokens (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="conversations per batched generate (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a batch waits to fill (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting replies before 'busy' (default: %(default)s)")
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars, help="message size limit (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=d.max_connections, help="open websockets (default: %(default)s)")
    p.add_argument("--rate-per-minute", type=float, default=d.rate_per_minute, help="messages per session and minute (default: %(default)s)")
    p.add_argument("--rate-burst", type=int, default=d.rate_burst, help="messages a session may send at once (default: %(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace_s, help="seconds in-flight replies get on shutdown (default: %(default)s)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from chatbot.serve.app import create_app

    config = ServeConfig(
        host=args.host, port=args.port, model_dir=args.model, device=args.device, redis_url=args.redis_url,
        data_dir=args.data_dir, session_ttl_s=args.session_ttl, num_candidates=args.num_candidates,
        max_new_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, max_text_chars=args.max_text_chars, max_connections=args.max_connections,
        rate_per_minute=args.rate_per_minute, rate_burst=args.rate_burst, shutdown_grace_s=args.shutdown_grace,
    )

    def announce(_aiohttp_banner: str) -> None:  # run_app calls this once the socket listens
        url = f"http://{config.host}:{config.port}"
        log.info("serving: open %s/ in a browser, or run `chatbot client %s` (Ctrl-C stops)", url, url)

    # aiohttp waits shutdown_timeout for handlers after on_shutdown; our grace is spent inside on_shutdown.
    try:
        web.run_app(create_app(config), host=config.host, port=config.port, print=announce,
                    shutdown_timeout=config.shutdown_grace_s + 5.0, access_log=None)
    except OSError as e:  # typically the port is taken
        raise RuntimeError(f"cannot listen on {config.host}:{config.port}: {e.strerror}; pick another --port") from e
    return 0
