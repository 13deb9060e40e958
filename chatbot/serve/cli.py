"""``chatbot serve``: run the chat service (websocket at /ws, web page at /, /healthz, /readyz, /metrics)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from chatbot.memory import memory_config_from_args
from chatbot.ranking import add_ranking_arguments, ranking_config_from_args
from chatbot.serve.config import ServeConfig

log = logging.getLogger(__name__)


def add_serve(sub: argparse._SubParsersAction) -> None:
    d = ServeConfig()
    p = sub.add_parser("serve", help="run the websocket chat service and its web page",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Serve the chat model over websockets (protocol: docs/protocol.md). Sessions "
                                   "live in Redis: --redis-url or $REDIS_URL, else an embedded Redis persisting "
                                   "under --data-dir.")
    p.add_argument("--host", default=d.host, help="address to bind")
    p.add_argument("--port", type=int, default=d.port, help="port")
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--device", default=d.device, help="torch device for the model")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or None,
                   help="redis://HOST:PORT/DB or unix:///PATH (default: $REDIS_URL, else embedded Redis)")
    p.add_argument("--data-dir", help="embedded Redis data directory (default: $CHATBOT_DATA or ~/.local/share/chatbot)")
    p.add_argument("--session-ttl", type=int, default=d.session_ttl_s, help="seconds a session lives after last use")
    p.add_argument("--num-candidates", type=int, default=d.num_candidates, help="sample-and-rank candidates per reply")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="reply length limit in tokens")
    p.add_argument("--min-new-tokens", type=int, default=d.min_new_tokens, help="no end of reply before this many tokens")
    add_ranking_arguments(p)
    from chatbot.memory import add_memory_arguments

    add_memory_arguments(p.add_argument_group("memory: kNN-LM and retrieved human replies (docs/memory.md)"))
    p.add_argument("--torch-threads", type=int, help="torch threads for the model (default: all cores but one)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="conversations per batched generate")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long a batch waits to fill, from its first job or the end of the previous batch")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="replies waiting for the model before 'busy'")
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars, help="message size limit")
    p.add_argument("--max-connections", type=int, default=d.max_connections, help="open websockets")
    p.add_argument("--rate-per-minute", type=float, default=d.rate_per_minute, help="messages per session and minute")
    p.add_argument("--rate-burst", type=int, default=d.rate_burst, help="messages a session may send at once")
    p.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace_s,
                   help="seconds in-flight replies get to finish on shutdown")
    p.add_argument("--knowledge", default="default",
                   help="knowledge index: 'default' (Wikipedia summaries, shipped), an index directory, or 'none'")
    p.add_argument("--embedder", help="sentence-transformers directory for knowledge (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--knowledge-k", type=int, default=d.knowledge_k, help="passages retrieved per turn")
    p.add_argument("--knowledge-min-score", type=float, default=d.knowledge_min_score,
                   help="cosine similarity below which a passage is not used")
    p.add_argument("--admin-token-file", help="file holding the admin API token (default: $CHATBOT_ADMIN_TOKEN; "
                                              "neither: the admin API is off)")
    p.add_argument("--close-grace", type=float, default=d.close_grace_s,
                   help="seconds a client gets to answer the server's close frame before TCP is closed")
    p.add_argument("--redis-timeout", type=float, default=d.redis_timeout_s,
                   help="seconds to connect to Redis and for each command's answer before store_unavailable")
    p.add_argument("--health-interval", type=float, default=d.health_interval_s,
                   help="seconds between the Redis pings that /readyz reports")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (scheme://host[:port], or *) allowed to open the websocket besides "
                        "the page's own; repeatable")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    config = ServeConfig(
        host=args.host, port=args.port, model_dir=args.model, device=args.device, redis_url=args.redis_url,
        data_dir=args.data_dir, session_ttl_s=args.session_ttl, num_candidates=args.num_candidates,
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        ranking=ranking_config_from_args(args), memory=memory_config_from_args(args), torch_threads=args.torch_threads, max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_text_chars=args.max_text_chars,
        max_connections=args.max_connections, rate_per_minute=args.rate_per_minute, rate_burst=args.rate_burst,
        shutdown_grace_s=args.shutdown_grace, close_grace_s=args.close_grace, redis_timeout_s=args.redis_timeout,
        health_interval_s=args.health_interval, allowed_origins=tuple(args.allowed_origin),
        knowledge=None if args.knowledge == "none" else args.knowledge, embedder=args.embedder,
        knowledge_k=args.knowledge_k, knowledge_min_score=args.knowledge_min_score, admin_token=admin_token(args),
    )
    asyncio.run(serve(config))
    return 0


def admin_token(args: argparse.Namespace) -> str | None:
    """From a file (kept off the command line, where `ps` shows it), else the environment."""
    if args.admin_token_file:
        return open(args.admin_token_file).read().strip() or None
    return os.environ.get("CHATBOT_ADMIN_TOKEN") or None


async def serve(config: ServeConfig) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    from chatbot.serve.app import start_runner, stop_gracefully

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = await start_runner(config)
    try:
        url = f"http://{config.host}:{config.port}"
        log.info("serving: open %s/ in a browser, or run `chatbot client %s` (Ctrl-C stops)", url, url)
        await stop.wait()
        log.info("shutting down")
    finally:
        await stop_gracefully(runner)
