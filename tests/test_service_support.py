"""Shared parts of the service tests (no tests here): the tiny model's engine, a Redis process, an app
served over loopback, a protocol client that shows every frame, and a websocket client written out
by hand for what aiohttp's own client will not do (stay silent after a close frame)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from chatbot.generate import ReplyEngine
from chatbot.serve.app import start_runner, stop_gracefully
from chatbot.serve.config import ServeConfig
from chatbot.testing import RedisProcess
from chatbot.serve.state import METRICS

# Tiny decoding so a reply takes milliseconds on the tiny model.
FAST = {"num_candidates": 2, "max_new_tokens": 6}


def run(coro: Coroutine[Any, Any, Any], timeout: float = 90.0) -> Any:
    """Run a test scenario with a hard deadline: a bug fails the test instead of hanging the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> ReplyEngine:
    from chatbot.modeldir import load_model

    loaded = load_model(tiny_model_dir)
    return ReplyEngine(loaded.model, loaded.tokenizer)


@pytest.fixture
def redis_server(tmp_path: Path) -> RedisProcess:
    with RedisProcess(tmp_path / "redis") as server:
        yield server


class GatedEngine:
    """The real engine behind a gate the test opens: makes "a reply is in flight" a state, not a race.
    Records each call's batch size and thread."""

    def __init__(self, inner: ReplyEngine):
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []
        self.threads: set[int] = set()

    def reply(self, contexts: list[list[str]], config: Any, **kwargs: Any) -> Any:
        self.batches.append(len(contexts))
        self.threads.add(threading.get_ident())
        self.entered.set()
        if not self.gate.wait(60):
            raise RuntimeError("test gate never opened")
        return self.inner.reply(contexts, config, **kwargs)


class Served:
    """An app from the real factory, listening on a free loopback port."""

    def __init__(self, runner: web.AppRunner):
        self.runner, self.app = runner, runner.app
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self.ws_url = f"ws://{host}:{port}/ws"

    @classmethod
    async def start(cls, config: ServeConfig, engine: Any) -> Served:
        return cls(await start_runner(config, engine=engine, port=0))  # the service's own start-up path

    async def stop(self) -> None:
        await stop_gracefully(self.runner)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.app[METRICS].registry.get_sample_value(name, labels or {}) or 0.0


@asynccontextmanager
async def served(config: ServeConfig, engine: Any) -> AsyncIterator[Served]:
    svc = await Served.start(config, engine)
    try:
        yield svc
    finally:
        await svc.stop()


def service_config(tmp_path: Path, **overrides: Any) -> ServeConfig:
    return ServeConfig(**{"data_dir": str(tmp_path / "data"), **FAST, **overrides})


class Conn:
    """A raw websocket client: sends frames as given and returns every frame it receives."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse):
        self.http, self.ws = http, ws
        self.session_id: str | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, headers: dict[str, str] | None = None) -> AsyncIterator[Conn]:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(url, heartbeat=None, headers=headers) as ws:
                yield cls(http, ws)

    async def send(self, frame: Any) -> None:
        await self.ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 30.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type.name} {msg.data!r}"
        return json.loads(msg.data)

    async def hello(self, session_id: str | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "hello", "version": 1}
        if session_id is not None:
            frame["session_id"] = session_id
        await self.send(frame)
        reply = await self.recv()
        if reply["type"] == "session":
            self.session_id = reply["session_id"]
        return reply

    async def say(self, text: str, message_id: str) -> list[dict[str, Any]]:
        """Send a message; the frames about it up to its reply or error (frames of others are skipped)."""
        await self.send({"type": "message", "message_id": message_id, "text": text})
        return await self.until_done(message_id)

    async def until_done(self, message_id: str) -> list[dict[str, Any]]:
        frames = []
        while True:
            frame = await self.recv()
            if frame.get("message_id") != message_id:
                continue
            frames.append(frame)
            if frame["type"] in ("reply", "error"):
                return frames


def seen_history(frames_per_message: list[list[dict[str, Any]]], texts: list[str]) -> list[tuple[str, str]]:
    """(role, text) pairs a client saw: each message it sent and the reply it got."""
    out = []
    for text, frames in zip(texts, frames_per_message, strict=True):
        out.append(("user", text))
        out.append(("bot", frames[-1]["text"]))
    return out


class RawWebSocket:
    """A websocket client over a bare TCP stream (RFC 6455 by hand): frames go out exactly as given,
    and nothing is answered unless the test says so."""

    TEXT, CLOSE = 0x1, 0x8

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, url: str) -> RawWebSocket:
        host, port = url.split("//")[1].split("/")[0].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
        self.writer.write(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        await self.writer.drain()

    async def send_json(self, frame: dict[str, Any]) -> None:
        await self.send_frame(self.TEXT, json.dumps(frame).encode())

    async def recv_frame(self, timeout: float = 30.0) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame from the server (servers do not mask)."""
        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return b0 & 0x0F, await self.reader.readexactly(n)
        return await asyncio.wait_for(read(), timeout)

    async def recv_json(self, timeout: float = 30.0) -> dict[str, Any]:
        opcode, payload = await self.recv_frame(timeout)
        assert opcode == self.TEXT, (opcode, payload)
        return json.loads(payload)

    def close(self) -> None:
        self.writer.close()
