"""One websocket connection speaking protocol v1: it reads frames and writes frames, nothing else.

The reader validates every frame and answers bad ones with a typed error at once.  Messages that
pass go to a small per-connection queue that one worker drains in order, handing each to the reply
service (``ReplyService.answer``), so a session's turns are stored as user, reply, user, reply even
when a client sends ahead.

Closing on shutdown (``go_away``): the reader stops, then the close frame (1001) is sent and the
client's answering close frame is awaited for ``close_grace_s`` before TCP is closed.  (aiohttp's
``close()`` called while another task is reading closes TCP right after its close frame, which can
reset a client that had not read it yet: the client then sees 1006.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from chatbot.serve.metrics import ServiceMetrics
from chatbot.serve.protocol import (
    PONG, ErrorCode, Hello, Message, Ping, ProtocolError, encode_frame, parse_client_frame,
)
from chatbot.serve.replies import ReplyService

log = logging.getLogger(__name__)


class ChatConnection:
    def __init__(self, ws: web.WebSocketResponse, service: ReplyService, metrics: ServiceMetrics):
        self.ws, self.service, self.metrics = ws, service, metrics
        self.session_id: str | None = None
        # Unbounded as a queue; ReplyService.admit bounds it, so the end marker can always be put.
        self._pending: asyncio.Queue[tuple[Message, float] | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._going_away = False
        self._finished = asyncio.Event()

    async def send(self, frame: dict[str, Any]) -> bool:
        """Send a frame; False when the peer is gone (a reply still gets stored, it just is not sent)."""
        if frame["type"] == "error":
            self.metrics.errors.labels(frame["code"]).inc()
        if self.ws.closed:
            return False
        try:
            await self.ws.send_str(encode_frame(frame))
        except ConnectionError:
            return False
        return True

    async def refuse(self, error: ProtocolError, code: int, reason: bytes) -> None:
        """Refuse the connection: a typed frame (a browser cannot read an HTTP status), then close."""
        await self.send(error.frame())
        await self.ws.close(code=code, message=reason)

    async def run(self) -> None:
        worker = asyncio.create_task(self._work(), name="chat-worker")
        self._reader = asyncio.create_task(self._read(), name="chat-reader")
        try:
            try:
                await self._reader
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # the handler itself is cancelled, not just the reader
                    raise
        finally:
            # Messages still queued were never acknowledged, so dropping them loses nothing; the one in
            # progress runs to the end so its reply is stored for when the client resumes.
            self._reader.cancel()
            while not self._pending.empty():
                self._pending.get_nowait()
            self._pending.put_nowait(None)
            await worker
            if self._going_away:
                # No task reads any more, so close() sends 1001 and waits for the client's close frame.
                await self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
            if self.session_id is not None:
                self.metrics.active_sessions.dec()
            self._finished.set()

    async def go_away(self) -> None:
        """Close with 1001 GOING_AWAY (shutdown) and return once the close handshake is over."""
        self._going_away = True
        if self._reader is not None:
            self._reader.cancel()
        await self._finished.wait()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                await self._on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                self.metrics.requests.labels("binary").inc()
                await self.send(ProtocolError(ErrorCode.BINARY_NOT_SUPPORTED,
                                              "binary frames are not part of the protocol; send JSON text").frame())
            elif msg.type == WSMsgType.ERROR:
                log.info("websocket error: %s", self.ws.exception())

    async def _on_text(self, raw: str) -> None:
        try:
            frame = parse_client_frame(raw, self.service.config.max_text_chars)
        except ProtocolError as e:
            self.metrics.requests.labels("invalid").inc()
            await self.send(e.frame())
            return
        self.metrics.requests.labels(type(frame).__name__.lower()).inc()
        try:
            if isinstance(frame, Ping):
                await self.send(PONG)
            elif isinstance(frame, Hello):
                await self._hello(frame)
            elif isinstance(frame, Message):
                self._enqueue(frame)
        except ProtocolError as e:
            await self.send(e.frame())

    async def _hello(self, hello: Hello) -> None:
        if self.session_id is not None:
            raise ProtocolError(ErrorCode.ALREADY_STARTED,
                                "this connection already carries a session; open a new connection for another")
        opened = await self.service.open_session(hello.session_id)
        self.session_id = opened.session_id
        self.metrics.active_sessions.inc()
        await self.send(opened.frame)

    def _enqueue(self, message: Message) -> None:
        if self.session_id is None:
            raise ProtocolError(ErrorCode.HELLO_REQUIRED, "send hello before messages", message_id=message.message_id)
        self.service.admit(self.session_id, message, self._pending.qsize())
        self._pending.put_nowait((message, time.monotonic()))

    async def _work(self) -> None:
        while (item := await self._pending.get()) is not None:
            message, received = item
            assert self.session_id is not None  # _enqueue checked
            task = asyncio.create_task(self.service.answer(self.session_id, message, received, self.send),
                                       name=f"answer-{message.message_id}")
            try:
                await task
            except asyncio.CancelledError:
                # Shutdown cancelled the answer after its grace time (it told its client); the worker
                # itself goes on to drain the queue unless it is the one being cancelled.
                if asyncio.current_task().cancelling():
                    raise
