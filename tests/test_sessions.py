"""The Redis session store against a real redis-server: ids, idempotent appends, TTLs, outages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from test_service_support import redis_server, run  # noqa: F401  (fixture)

from chatbot.model_input import MAX_CONTEXT_TURNS
from chatbot.serve.protocol import SESSION_ID_RE
from chatbot.serve.redis_backend import open_redis
from chatbot.testing import RedisProcess
from chatbot.serve.sessions import SessionStore, StoreUnavailable, Turn, UnknownSession, new_session_id


def test_session_ids_are_unguessable_and_well_formed() -> None:
    ids = {new_session_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(SESSION_ID_RE.fullmatch(i) for i in ids)
    assert len(next(iter(ids))) * 4 >= 128  # hex digits carry 4 bits each


@asynccontextmanager
async def store_on(server: RedisProcess, ttl_s: int = 3600) -> AsyncIterator[tuple[aioredis.Redis, SessionStore]]:
    """The service's own client (``open_redis``) and a store on it; the client closes even if a test fails."""
    async with open_redis(server.url, Path()) as client:  # data_dir is only for the embedded server
        yield client, SessionStore(client, ttl_s)


def test_append_is_idempotent_and_atomic_under_concurrency(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with store_on(redis_server) as (client, store):
            sid = await store.create()
            # Ten racing appends of one message id (retries, or two workers) store it once.
            results = await asyncio.gather(*(store.append_user(sid, "m1", "hello") for _ in range(10)))
            assert sum(r.created for r in results) == 1
            assert {r.index for r in results} == {0}
            first, created = await store.append_reply(sid, Turn("bot", "hi there", "m1", 1.0, reply_id="r1"))
            assert created
            # A second reply to the same message (another worker finished later) is refused: the first stays.
            second, created = await store.append_reply(sid, Turn("bot", "other text", "m1", 2.0, reply_id="r2"))
            assert not created and second == first
            # A retry after the reply was stored gets that reply back instead of a new generation.
            retry = await store.append_user(sid, "m1", "hello")
            assert not retry.created and retry.reply == first
            history = await store.history(sid)
            assert [(t.role, t.text) for t in history] == [("user", "hello"), ("bot", "hi there")]

    run(scenario())


def test_context_is_the_last_seven_turns(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with store_on(redis_server) as (client, store):
            sid = await store.create()
            for i in range(6):
                await store.append_user(sid, f"m{i}", f"user {i}")
                await store.append_reply(sid, Turn("bot", f"bot {i}", f"m{i}", 0.0))
            appended = await store.append_user(sid, "m6", "user 6")
            assert len(appended.context) == MAX_CONTEXT_TURNS
            assert appended.context == ["user 3", "bot 3", "user 4", "bot 4", "user 5", "bot 5", "user 6"]
            assert len(await store.history(sid)) == 13

    run(scenario())


def test_ttl_is_set_and_refreshed_and_unknown_sessions_are_refused(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with store_on(redis_server, ttl_s=120) as (client, store):
            sid = await store.create()
            await store.append_user(sid, "m1", "hello")
            keys = SessionStore._keys(sid)
            for key in keys:
                assert 0 < await client.ttl(key) <= 120
            for key in keys:
                await client.expire(key, 5)
            assert await store.resume(sid) != []
            assert all([await client.ttl(key) > 100 for key in keys])
            # Expired (here: deleted) sessions are unknown; so are ids that were never issued.
            await client.delete(*keys)
            with pytest.raises(UnknownSession):
                await store.resume(sid)
            with pytest.raises(UnknownSession):
                await store.append_user(sid, "m2", "anyone there?")
            with pytest.raises(UnknownSession):
                await store.resume(new_session_id())

    run(scenario())


def test_outage_raises_store_unavailable_and_recovers(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with store_on(redis_server) as (client, store):
            sid = await store.create()
            await store.append_user(sid, "m1", "before")
            await asyncio.to_thread(redis_server.stop)
            assert not await store.ping()
            with pytest.raises(StoreUnavailable):
                await store.append_user(sid, "m2", "during")
            await asyncio.to_thread(redis_server.start)
            # Same client object: the pool reconnects, the Lua scripts reload after the restart.
            appended = await store.append_user(sid, "m2", "during")
            assert appended.created and appended.context == ["before", "during"]

    run(scenario())


def test_embedded_redis_persists_across_restarts(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_redis(None, tmp_path) as client:
            store = SessionStore(client, 3600)
            sid = await store.create()
            await store.append_user(sid, "m1", "remember me")
        assert (tmp_path / "redis").is_dir()
        async with open_redis(None, tmp_path) as client:
            history = await SessionStore(client, 3600).resume(sid)
        assert [t.text for t in history] == ["remember me"]

    run(scenario())


def test_bursts_beyond_the_pool_size_wait_instead_of_failing(redis_server: RedisProcess, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_redis(redis_server.url, tmp_path) as client:
            store = SessionStore(client, 3600)
            sids = await asyncio.gather(*(store.create() for _ in range(300)))  # far more than POOL_SIZE at once
            appended = await asyncio.gather(*(store.append_user(sid, "m1", "hello") for sid in sids))
            assert len(set(sids)) == 300 and all(a.created for a in appended)

    run(scenario())

