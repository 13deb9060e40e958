"""The reply service: what a chat connection needs, behind ``open_session`` and ``answer``.

Sessions (Redis), rate limiting, batching and the shutdown state live here, and so does the one place
where their failures become protocol errors (``to_protocol_error``); ``ChatConnection`` only reads and
writes frames.  ``answer`` follows one message through: store the user turn (acknowledge it), then
either replay a stored reply, wait for another attempt that is generating it (see the claims in
sessions.py), or generate it in a batch, streaming pieces, and store it before the final frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from chatbot.generate import GenerationError, Reply
from chatbot.serve.batcher import Batcher, BatcherClosed, Busy
from chatbot.serve.config import ServeConfig
from chatbot.serve.metrics import ServiceMetrics
from chatbot.serve.protocol import (
    ErrorCode, Message, ProtocolError, accepted_frame, piece_frame, reply_frame, scrub_text, session_frame,
    shutting_down,
)
from chatbot.serve.ratelimit import RateLimiter
from chatbot.serve.sessions import SessionStore, StoreUnavailable, Turn, UnknownSession

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[bool]]

# How long an attempt at a message waits for another attempt that is generating its reply (polling
# the store) before telling its client to retry; longer than a claim lives unrenewed, so a claim
# left by a dead attempt comes free within the wait.
OTHER_ATTEMPT_WAIT_S = 15.0
OTHER_ATTEMPT_POLL_S = 0.1


class GenerationFailed(RuntimeError):
    """The model did not produce a reply (the engine's own error is the cause)."""


def to_protocol_error(error: BaseException, message_id: str | None = None) -> ProtocolError:
    """Every failure below the protocol, as the error frame a client gets."""
    mid = message_id
    match error:
        case ProtocolError():
            return error
        case StoreUnavailable():
            return ProtocolError(ErrorCode.STORE_UNAVAILABLE, "the session store is unreachable; retry shortly"
                                 + (" with the same message_id" if mid else ""), message_id=mid)
        case UnknownSession():
            return ProtocolError(ErrorCode.UNKNOWN_SESSION, "no such session (it never existed or it expired); "
                                 "start a new one with hello without session_id", message_id=mid)
        case Busy():
            return ProtocolError(ErrorCode.BUSY, "the server is at capacity; retry shortly with the same message_id",
                                 message_id=mid, retry_after_ms=1000)
        case BatcherClosed():
            return shutting_down(mid)
        case GenerationError() | GenerationFailed():
            return ProtocolError(ErrorCode.GENERATION_FAILED, "the model failed to produce a reply; retry",
                                 message_id=mid)
    log.error("unexpected error%s", f" answering message {mid}" if mid else "", exc_info=error)
    return ProtocolError(ErrorCode.INTERNAL, "internal error; retry", message_id=mid)


def turn_frame(turn: Turn) -> dict[str, Any]:
    """A stored turn as the history lists it (docs/protocol.md, Turns)."""
    out: dict[str, Any] = {"role": turn.role, "text": turn.text, "message_id": turn.message_id,
                           "created_at": turn.created_at}
    if turn.role == "bot":
        out.update(reply_id=turn.reply_id, sources=turn.sources or [], latency_ms=turn.latency_ms)
    return out


def stored_reply_frame(turn: Turn, replayed: bool) -> dict[str, Any]:
    return reply_frame(turn.message_id, turn.reply_id or "", turn.text, turn.sources or [], turn.latency_ms or 0.0,
                       replayed)


@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    frame: dict[str, Any]  # the session frame to send


class ReplyService:
    def __init__(self, config: ServeConfig, store: SessionStore, batcher: Batcher, metrics: ServiceMetrics):
        self.config, self.store, self.batcher, self.metrics = config, store, batcher, metrics
        self.limiter = RateLimiter(config.rate_per_minute, config.rate_burst)
        self.closing = False  # shutdown began: no new sessions or messages
        self._inflight: set[asyncio.Task[Any]] = set()

    @property
    def limits(self) -> dict[str, Any]:
        cfg = self.config
        return {"max_text_chars": cfg.max_text_chars, "rate_per_minute": cfg.rate_per_minute,
                "rate_burst": cfg.rate_burst, "session_ttl_s": cfg.session_ttl_s}

    async def open_session(self, session_id: str | None) -> OpenedSession:
        """Start a session (None) or resume one; raises ProtocolError."""
        try:
            if self.closing:
                raise shutting_down()
            if session_id is None:
                session_id, history, resumed = await self.store.create(), [], False
            else:
                history, resumed = await self.store.resume(session_id), True
        except Exception as e:
            raise to_protocol_error(e) from None
        return OpenedSession(session_id, session_frame(session_id, resumed, [turn_frame(t) for t in history],
                                                       self.limits))

    def admit(self, session_id: str, message: Message, queued: int) -> None:
        """Check a message as it arrives, before it waits in its connection's queue (``queued``
        messages are waiting there); raises ProtocolError."""
        mid = message.message_id
        if self.closing:
            raise shutting_down(mid)
        wait_s = self.limiter.take(session_id)
        # Queued-but-unanswered messages are bounded by the burst too, so a flood cannot pile up work.
        if wait_s is None and queued >= self.config.rate_burst:
            wait_s = 1.0
        if wait_s is not None:
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"at most {self.config.rate_per_minute:g} messages a minute "
                                f"(bursts of {self.config.rate_burst}); retry later",
                                message_id=mid, retry_after_ms=int(wait_s * 1000) + 1)

    async def answer(self, session_id: str, message: Message, received: float, send: Send) -> None:
        """Answer one message through ``send``: accepted, pieces, then the reply, or an error frame.
        Never raises, except CancelledError (shutdown ran out of grace; the client was told)."""
        mid, token = message.message_id, uuid.uuid4().hex
        self._inflight.add(task := asyncio.current_task())
        holds_claim = False
        keeping: asyncio.Task[None] | None = None
        try:
            if self.closing:
                raise shutting_down(mid)
            if self.batcher.full():  # refuse before storing anything we could not answer soon
                raise Busy()
            appended = await self.store.append_user(session_id, mid, message.text, token)
            holds_claim = appended.claimed
            await send(accepted_frame(mid, appended.index, not appended.created))
            stored = appended.reply
            if stored is None and not holds_claim:
                stored, holds_claim = await self._wait_for_other_attempt(session_id, mid, token)
            if stored is not None:  # answered already (a retry), or by the other attempt
                self.metrics.replies.labels("replayed").inc()
                await send(stored_reply_frame(stored, replayed=True))
                return
            keeping = asyncio.create_task(self._keep_claim(session_id, mid, token), name=f"claim-{mid}")
            reply = await self._generate(appended.context, mid, send)
            turn = Turn("bot", reply.text, mid, time.time(), reply_id=uuid.uuid4().hex, sources=reply.sources,
                        latency_ms=round((time.monotonic() - received) * 1000, 1))
            stored, created = await self.store.append_reply(session_id, turn)
            holds_claim = False  # storing the reply dropped the claim
            self.metrics.replies.labels("generated" if created else "replayed").inc()
            self.metrics.reply_latency.observe(time.monotonic() - received)
            await send(stored_reply_frame(stored, replayed=not created))
        except asyncio.CancelledError:
            # Shutdown ran out of grace; the user turn (if acknowledged) is stored, so a retry works.
            await send(shutting_down(mid).frame())
            raise
        except Exception as e:
            await send(to_protocol_error(e, mid).frame())
        finally:
            self._inflight.discard(task)
            if keeping is not None:
                keeping.cancel()
            if holds_claim:  # let a retry generate at once instead of waiting for the claim to expire
                try:
                    await self.store.release_claim(session_id, mid, token)
                except StoreUnavailable:
                    pass

    async def _keep_claim(self, session_id: str, message_id: str, token: str) -> None:
        """Renew the claim while generating, so that only a dead attempt's claim expires."""
        while True:
            await asyncio.sleep(self.store.claim_ttl_s / 3)
            try:
                await self.store.renew_claim(session_id, message_id, token)
            except StoreUnavailable:
                pass

    async def _wait_for_other_attempt(self, session_id: str, message_id: str, token: str) -> tuple[Turn | None, bool]:
        """Another attempt holds the claim: wait for its stored reply, or for the claim to come free."""
        deadline = time.monotonic() + OTHER_ATTEMPT_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(OTHER_ATTEMPT_POLL_S)
            state = await self.store.reply_state(session_id, message_id, token)
            if state.reply is not None or state.claimed:
                return state.reply, state.claimed
        raise ProtocolError(ErrorCode.REPLY_IN_PROGRESS,
                            "another connection is still answering this message; retry with the same message_id",
                            message_id=message_id, retry_after_ms=1000)

    async def _generate(self, context: list[str], message_id: str, send: Send) -> Reply:
        # Stored text from before validation may hold lone surrogates; the model gets U+FFFD instead.
        # A reply can be empty (the engine's safety fallback); the engine takes only non-empty turns.
        job = self.batcher.submit([scrub_text(turn) for turn in context if turn.strip()])
        try:
            async for piece in job.pieces():
                await send(piece_frame(message_id, piece))
            try:
                return await job.result()
            except BatcherClosed:
                raise
            except Exception as e:  # the engine's error, whatever its type
                log.warning("generation failed for %s: %r", message_id, e)
                raise GenerationFailed(str(e)) from e
        finally:
            job.abandon()  # no effect once generated; skips a job still queued when we are cancelled

    async def drain(self, grace_s: float) -> None:
        """Refuse new work, give in-flight answers ``grace_s`` to finish, cancel the rest (each tells its
        client ``shutting_down``)."""
        self.closing = True
        inflight = set(self._inflight)
        if not inflight:
            return
        log.info("shutdown: waiting up to %.1fs for %d in-flight replies", grace_s, len(inflight))
        _, late = await asyncio.wait(inflight, timeout=grace_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
