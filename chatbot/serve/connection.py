"""One websocket connection speaking protocol v1: hello, then messages answered in order.

The reader loop validates every frame and answers bad ones with a typed error at once.  Messages that
pass go to a small per-connection queue that one worker drains in order, so a session's turns are
stored as user, reply, user, reply even when a client sends ahead.  A message is acknowledged
(``accepted``) only once its user turn is in Redis; from then on the reply is either delivered and
stored, or the client gets a retryable error and a retry with the same message id picks up where it
stopped (the append is idempotent).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import asdict
from typing import Any

from aiohttp import WSMsgType, web

from chatbot.generate import GenerationError
from chatbot.serve.batcher import BatcherClosed, Busy
from chatbot.serve.protocol import (
    PROTOCOL_VERSION, ErrorCode, Hello, Message, Ping, ProtocolError, parse_client_frame,
)
from chatbot.serve.sessions import StoreUnavailable, Turn, UnknownSession
from chatbot.serve.state import BATCHER, CONFIG, INFLIGHT, LIFECYCLE, LIMITER, METRICS, STORE

log = logging.getLogger(__name__)

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def turn_frame(turn: Turn) -> dict[str, Any]:
    return {k: v for k, v in asdict(turn).items() if v is not None}


def reply_frame(turn: Turn, replayed: bool) -> dict[str, Any]:
    return {"type": "reply", "message_id": turn.message_id, "reply_id": turn.reply_id, "text": turn.text,
            "sources": turn.sources, "latency_ms": turn.latency_ms, "replayed": replayed}


class ChatConnection:
    def __init__(self, ws: web.WebSocketResponse, app: web.Application):
        self.ws, self.app = ws, app
        self.config, self.metrics, self.store = app[CONFIG], app[METRICS], app[STORE]
        self.session_id: str | None = None
        # Unbounded as a queue; _enqueue bounds it, so the end marker can always be put.
        self._pending: asyncio.Queue[tuple[Message, float] | None] = asyncio.Queue()

    async def send(self, frame: dict[str, Any]) -> bool:
        """Send a frame; False when the peer is gone (a reply still gets stored, it just is not sent)."""
        if frame["type"] == "error":
            self.metrics.errors.labels(frame["code"]).inc()
        if self.ws.closed:
            return False
        try:
            await self.ws.send_str(_dumps(frame))
        except ConnectionError:
            return False
        return True

    async def send_error(self, error: ProtocolError) -> None:
        await self.send(error.frame())

    async def run(self) -> None:
        worker = asyncio.create_task(self._work(), name="chat-worker")
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self.metrics.requests.labels("binary").inc()
                    await self.send_error(ProtocolError(ErrorCode.BINARY_NOT_SUPPORTED,
                                                        "binary frames are not part of the protocol; send JSON text"))
                elif msg.type == WSMsgType.ERROR:
                    log.info("websocket error: %s", self.ws.exception())
        finally:
            # Messages still queued were never acknowledged, so dropping them loses nothing; the one in
            # progress runs to the end so its reply is stored for when the client resumes.
            while not self._pending.empty():
                self._pending.get_nowait()
            self._pending.put_nowait(None)
            await worker
            if self.session_id is not None:
                self.metrics.active_sessions.dec()

    async def _on_text(self, raw: str) -> None:
        try:
            frame = parse_client_frame(raw, self.config.max_text_chars)
        except ProtocolError as e:
            self.metrics.requests.labels("invalid").inc()
            await self.send_error(e)
            return
        self.metrics.requests.labels(type(frame).__name__.lower()).inc()
        try:
            if isinstance(frame, Ping):
                await self.send({"type": "pong"})
            elif isinstance(frame, Hello):
                await self._hello(frame)
            elif isinstance(frame, Message):
                self._enqueue(frame)
        except ProtocolError as e:
            await self.send_error(e)

    async def _hello(self, hello: Hello) -> None:
        if self.session_id is not None:
            raise ProtocolError(ErrorCode.ALREADY_STARTED,
                                "this connection already carries a session; open a new connection for another")
        if self.app[LIFECYCLE].closing:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect")
        store = self.store
        try:
            if hello.session_id is None:
                session_id, history, resumed = await store.create(), [], False
            else:
                session_id, history, resumed = hello.session_id, await store.resume(hello.session_id), True
        except StoreUnavailable:
            raise ProtocolError(ErrorCode.STORE_UNAVAILABLE, "the session store is unreachable; retry shortly") from None
        except UnknownSession:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION,
                                "no such session (it never existed or it expired); send hello without session_id") from None
        self.session_id = session_id
        self.metrics.active_sessions.inc()
        cfg = self.config
        await self.send({
            "type": "session", "version": PROTOCOL_VERSION, "session_id": session_id, "resumed": resumed,
            "history": [turn_frame(t) for t in history],
            "limits": {"max_text_chars": cfg.max_text_chars, "rate_per_minute": cfg.rate_per_minute,
                       "rate_burst": cfg.rate_burst, "session_ttl_s": cfg.session_ttl_s},
        })

    def _enqueue(self, message: Message) -> None:
        if self.session_id is None:
            raise ProtocolError(ErrorCode.HELLO_REQUIRED, "send hello before messages", message_id=message.message_id)
        if self.app[LIFECYCLE].closing:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect and retry",
                                message_id=message.message_id)
        wait_s = self.app[LIMITER].take(self.session_id)
        # Queued-but-unanswered messages are bounded by the burst too, so a flood cannot pile up work.
        if wait_s is None and self._pending.qsize() >= self.config.rate_burst:
            wait_s = 1.0
        if wait_s is not None:
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"at most {self.config.rate_per_minute:g} messages a minute "
                                f"(bursts of {self.config.rate_burst}); retry later",
                                message_id=message.message_id, retry_after_ms=int(wait_s * 1000) + 1)
        self._pending.put_nowait((message, time.monotonic()))

    async def _work(self) -> None:
        while (item := await self._pending.get()) is not None:
            message, received = item
            if self.app[LIFECYCLE].closing:
                await self.send_error(ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; retry",
                                                    message_id=message.message_id))
                continue
            task = asyncio.create_task(self._answer(message, received), name=f"answer-{message.message_id}")
            self.app[INFLIGHT].add(task)
            task.add_done_callback(self.app[INFLIGHT].discard)
            try:
                await task
            except asyncio.CancelledError:
                # Shutdown cancelled the answer after its grace time (it told its client); the worker
                # itself goes on to drain the queue unless it is the one being cancelled.
                if asyncio.current_task().cancelling():
                    raise

    async def _answer(self, message: Message, received: float) -> None:
        try:
            await self._answer_or_raise(message, received)
        except ProtocolError as e:
            await self.send_error(e)
        except asyncio.CancelledError:
            # Shutdown ran out of grace time; the user turn (if acknowledged) is stored, so a retry works.
            await self.send_error(ProtocolError(ErrorCode.SHUTTING_DOWN,
                                                "the server shut down before the reply was ready; retry",
                                                message_id=message.message_id))
            raise
        except Exception:
            log.exception("answering message %s failed", message.message_id)
            await self.send_error(ProtocolError(ErrorCode.INTERNAL, "internal error; retry",
                                                message_id=message.message_id))

    async def _answer_or_raise(self, message: Message, received: float) -> None:
        mid, store, metrics = message.message_id, self.store, self.metrics
        assert self.session_id is not None  # _enqueue checked
        if self.app[BATCHER].full():  # refuse before storing anything we could not answer soon
            raise ProtocolError(ErrorCode.BUSY, "the server is at capacity; retry shortly", message_id=mid,
                                retry_after_ms=1000)
        try:
            appended = await store.append_user(self.session_id, mid, message.text)
        except StoreUnavailable:
            raise ProtocolError(ErrorCode.STORE_UNAVAILABLE, "the session store is unreachable; retry shortly",
                                message_id=mid) from None
        except UnknownSession:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, "this session expired; start a new one",
                                message_id=mid) from None
        await self.send({"type": "accepted", "message_id": mid, "index": appended.index,
                         "duplicate": not appended.created})
        if appended.reply is not None:  # a retry of a message that was already answered
            metrics.replies.labels("replayed").inc()
            await self.send(reply_frame(appended.reply, replayed=True))
            return
        # A reply can be empty (the engine's safety fallback); the engine takes only non-empty turns.
        context = [turn for turn in appended.context if turn.strip()]
        try:
            job = self.app[BATCHER].submit(context)
        except GenerationError as e:
            raise ProtocolError(ErrorCode.GENERATION_FAILED, f"the model refused this context: {e}",
                                message_id=mid) from None
        except Busy:
            raise ProtocolError(ErrorCode.BUSY, "the server is at capacity; retry with the same message_id",
                                message_id=mid, retry_after_ms=1000) from None
        except BatcherClosed:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; retry",
                                message_id=mid) from None
        try:
            async for piece in job.pieces():
                await self.send({"type": "piece", "message_id": mid, "text": piece})
            reply = await job.result()
        except BatcherClosed:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; retry", message_id=mid) from None
        except Exception as e:  # the engine's GenerationError and anything else from the model
            log.warning("generation failed for %s: %s", mid, e)
            raise ProtocolError(ErrorCode.GENERATION_FAILED, "the model failed to produce a reply; retry",
                                message_id=mid) from None
        finally:
            job.abandoned = True  # no effect once generated; skips a job still queued when we are cancelled
        turn = Turn("bot", reply.text, mid, time.time(), reply_id=uuid.uuid4().hex,
                    sources=list(getattr(reply, "sources", None) or []),
                    latency_ms=round((time.monotonic() - received) * 1000, 1))
        try:
            stored, created = await store.append_reply(self.session_id, turn)
        except StoreUnavailable:
            raise ProtocolError(ErrorCode.STORE_UNAVAILABLE,
                                "the reply could not be stored; retry with the same message_id", message_id=mid) from None
        except UnknownSession:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, "this session expired; start a new one",
                                message_id=mid) from None
        metrics.replies.labels("generated" if created else "replayed").inc()
        metrics.reply_latency.observe(time.monotonic() - received)
        await self.send(reply_frame(stored, replayed=not created))
