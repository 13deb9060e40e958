"""Knowledge in the running service: two app instances (workers) sharing one real Redis, the admin API,
sources on chat replies, restarts, concurrent changes, and the CLI against the deployment."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from test_service_support import Conn, engine, run, served, service_config  # noqa: F401  (fixtures)

from chatbot.testing import RedisProcess
from retrieval.knowledge import KnowledgeIndex
from tests.knowledge_support import NEW_FACT, small_wiki, write_jsonl

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def base_index(tmp_path_factory) -> Path:
    from retrieval.embedder import load_embedder

    out = tmp_path_factory.mktemp("kb") / "base"
    KnowledgeIndex.build(out, small_wiki(), load_embedder()).close()
    return out


@pytest.fixture
def redis_server(tmp_path: Path):
    with RedisProcess(tmp_path / "redis") as server:
        yield server


def worker_config(tmp_path: Path, redis_url: str, base: Path, name: str = "w", **overrides):
    # Each worker its own data dir (as on separate machines); they share only Redis.
    return service_config(tmp_path / name, redis_url=redis_url, knowledge=str(base), admin_token=TOKEN,
                          knowledge_snapshot_s=3600.0, **overrides)


class Admin:
    def __init__(self, http: aiohttp.ClientSession, url: str, headers: dict | None = None):
        self.http, self.url, self.headers = http, url + "/admin/knowledge", AUTH if headers is None else headers

    async def call(self, method: str, path: str = "", **kwargs) -> tuple[int, dict]:
        headers = {**self.headers, **kwargs.pop("headers", {})}  # a call may add headers (Content-Type)
        async with self.http.request(method, self.url + path, headers=headers, **kwargs) as r:
            return r.status, await r.json()

    async def add(self, *docs) -> tuple[int, dict]:
        return await self.call("POST", "/passages", json={"documents": list(docs)})

    async def search(self, q: str, k: int = 5) -> list[str]:
        status, body = await self.call("GET", "/search", params={"q": q, "k": str(k)})
        assert status == 200, body
        return [r["id"] for r in body["results"]]


FACT = {"id": NEW_FACT.id, "text": NEW_FACT.text, "title": NEW_FACT.title, "url": NEW_FACT.url}
QUERY = "giant pumpkin races across a lake"


async def eventually(check, timeout_s: float = 2.0) -> float:
    """Seconds until ``check()`` (async) is true; fails after ``timeout_s``."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout_s, "not visible within the deadline"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def test_a_passage_added_on_one_worker_is_found_on_the_other_and_gone_after_delete(
        tmp_path: Path, engine, redis_server: RedisProcess, base_index: Path) -> None:
    async def scenario() -> None:
        async with served(worker_config(tmp_path, redis_server.url, base_index, "a"), engine) as a, \
                served(worker_config(tmp_path, redis_server.url, base_index, "b"), engine) as b, \
                aiohttp.ClientSession() as http:
            admin_a, admin_b = Admin(http, a.url), Admin(http, b.url)
            assert NEW_FACT.id not in await admin_b.search(QUERY)
            status, body = await admin_a.add(FACT)
            assert status == 201 and body["added"] == [NEW_FACT.id]
            assert (await admin_a.search(QUERY, 1)) == [NEW_FACT.id]  # the writer answers with it at once
            await eventually(lambda: _first_is(admin_b, QUERY, NEW_FACT.id))
            # a chat reply on worker b about the topic carries the source; small talk carries none
            async with Conn.open(b.ws_url) as conn:
                await conn.hello()
                reply = (await conn.say("have you heard of the zorblax festival with the giant pumpkins?", "m1"))[-1]
                assert reply["type"] == "reply"
                assert reply["sources"][0]["id"] == NEW_FACT.id
                assert reply["sources"][0]["url"] == NEW_FACT.url and reply["sources"][0]["score"] > 0.4
                assert (await conn.say("hi", "m2"))[-1]["sources"] == []
            # delete through b: gone from both
            status, body = await admin_b.call("DELETE", "/passages/" + NEW_FACT.id)
            assert status == 200 and body["deleted"] == [NEW_FACT.id]
            assert NEW_FACT.id not in await admin_b.search(QUERY, 20)
            await eventually(lambda: _absent(admin_a, QUERY, NEW_FACT.id))
            # a whole split document deletes by its document id, everywhere
            status, body = await admin_a.call("DELETE", "/passages/wiki:Cro-Magnon")
            assert status == 200 and len(body["deleted"]) >= 2
            await eventually(lambda: _absent(admin_b, "Cro-Magnon early humans", "wiki:Cro-Magnon#1"))
            _, status_a = await admin_a.call("GET")
            _, status_b = await admin_b.call("GET")
            assert status_a["passages"] == status_b["passages"] and status_a["log_position"] == status_b["log_position"]

    run(scenario())


async def _first_is(admin: Admin, q: str, expected: str) -> bool:
    return (await admin.search(q, 1)) == [expected]


async def _absent(admin: Admin, q: str, pid: str) -> bool:
    return pid not in await admin.search(q, 20)


def test_admin_api_refuses_bad_requests_with_typed_errors(tmp_path: Path, engine, redis_server: RedisProcess,
                                                          base_index: Path) -> None:
    async def scenario() -> None:
        async with served(worker_config(tmp_path, redis_server.url, base_index), engine) as svc, \
                aiohttp.ClientSession() as http:
            admin = Admin(http, svc.url)
            for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}):
                status, body = await Admin(http, svc.url, headers).add(FACT)
                assert (status, body["error"]) == (401, "unauthorized")
            status, body = await admin.call("POST", "/passages", data=b"{not json",
                                            headers={**AUTH, "Content-Type": "application/json"})
            assert (status, body["error"]) == (400, "bad_request")
            assert (await admin.call("POST", "/passages", json={"documents": []}))[0] == 400
            for bad, problem in [({"id": "x", "text": ""}, "empty"), ({"id": "x", "text": "a\x00b"}, "binary"),
                                 ({"text": "no id"}, "'id'"), ({"id": "x#2", "text": "t"}, "'#'"), ("str", "object")]:
                status, body = await admin.add(bad)
                assert (status, body["error"]) == (400, "invalid_document") and problem in body["message"], body
            assert (await admin.add(FACT))[0] == 201
            status, body = await admin.add(FACT)
            assert (status, body["error"], body["ids"]) == (409, "duplicate_id", [NEW_FACT.id])
            status, body = await admin.add({"id": "wiki:Jupiter", "text": "Jupiter is big."})
            assert status == 409  # a base document id is taken too
            status, body = await admin.call("DELETE", "/passages/nothing-here")
            assert (status, body["error"]) == (404, "unknown_id")
            assert (await admin.call("GET", "/search", params={"q": " "}))[0] == 400
            assert (await admin.call("GET", "/search", params={"q": "x", "k": "many"}))[0] == 400
            assert (await admin.call("GET", "/search", params={"q": "x", "k": "0"}))[0] == 400
            assert NEW_FACT.id in await admin.search(QUERY)  # nothing above broke the index
        # no token configured: the admin API is off
        async with served(service_config(tmp_path / "off", redis_url=redis_server.url, knowledge=str(base_index)),
                          engine) as svc, aiohttp.ClientSession() as http:
            status, body = await Admin(http, svc.url).add(FACT)
            assert (status, body["error"]) == (403, "admin_disabled")

    run(scenario())


def test_changes_survive_restarts_from_snapshot_or_log(tmp_path: Path, engine, redis_server: RedisProcess,
                                                       base_index: Path) -> None:
    extra = {"id": "note:otters", "text": "Sea otters hold hands while they sleep so they do not drift apart.",
             "title": "Sea otter sleep"}

    async def scenario() -> None:
        cfg = worker_config(tmp_path, redis_server.url, base_index, "a")
        async with served(cfg, engine) as svc, aiohttp.ClientSession() as http:
            admin = Admin(http, svc.url)
            assert (await admin.add(FACT))[0] == 201
            assert (await admin.add(extra))[0] == 201
            assert (await admin.call("DELETE", "/passages/wiki:Chess"))[0] == 200
        snapshots = list((tmp_path / "a" / "data" / "knowledge" / "snapshots").iterdir())
        assert len(snapshots) == 1  # written on shutdown
        # the same worker restarts from its snapshot: nothing to replay
        async with served(cfg, engine) as svc, aiohttp.ClientSession() as http:
            admin = Admin(http, svc.url)
            _, status = await admin.call("GET")
            assert status["applied"] == 0
            assert (await admin.search(QUERY, 1)) == [NEW_FACT.id]
            assert "wiki:Chess" not in await admin.search("chess board game", 20)
        # a fresh worker (no snapshot of its own) replays the whole log onto the base
        async with served(worker_config(tmp_path, redis_server.url, base_index, "fresh"), engine) as svc, \
                aiohttp.ClientSession() as http:
            admin = Admin(http, svc.url)
            _, status = await admin.call("GET")
            assert status["applied"] == 3
            assert (await admin.search("otters sleeping holding hands", 1)) == ["note:otters"]
            assert "wiki:Chess" not in await admin.search("chess board game", 20)

    run(scenario())


def test_concurrent_searches_and_changes_across_workers(tmp_path: Path, engine, redis_server: RedisProcess,
                                                        base_index: Path) -> None:
    async def scenario() -> None:
        async with served(worker_config(tmp_path, redis_server.url, base_index, "a"), engine) as a, \
                served(worker_config(tmp_path, redis_server.url, base_index, "b"), engine) as b, \
                aiohttp.ClientSession() as http:
            admins = [Admin(http, a.url), Admin(http, b.url)]
            done = asyncio.Event()
            searches = 0

            async def searcher(admin: Admin) -> None:
                nonlocal searches
                while not done.is_set():
                    await admin.search("facts about animals and festivals", 10)
                    searches += 1

            async def writer(w: int) -> None:
                for i in range(4):
                    doc = {"id": f"w{w}-{i}", "text": f"Fact {i} from writer {w}: the animal number {i} likes festivals."}
                    status, body = await admins[(w + i) % 2].add(doc)
                    assert status == 201, body
                    status, body = await admins[(w + i + 1) % 2].call("DELETE", f"/passages/w{w}-{i}") \
                        if i % 2 else (200, {})
                    assert status in (200, 404), body  # 404: the other worker had not seen the add yet

            searchers = [asyncio.create_task(searcher(admins[i % 2])) for i in range(4)]
            await asyncio.gather(*(writer(w) for w in range(3)))
            done.set()
            await asyncio.gather(*searchers)
            assert searches > 0
            await asyncio.sleep(0.3)
            states = [(await admin.call("GET"))[1] for admin in admins]
            assert states[0]["log_position"] == states[1]["log_position"]
            assert states[0]["passages"] == states[1]["passages"]

    run(scenario(), timeout=180)


def test_cli_changes_reach_the_running_workers(tmp_path: Path, engine, redis_server: RedisProcess,
                                               base_index: Path) -> None:
    from chatbot.cli import main

    source = write_jsonl(tmp_path / "new.jsonl", [NEW_FACT])

    async def scenario() -> None:
        async with served(worker_config(tmp_path, redis_server.url, base_index, "a"), engine) as svc, \
                aiohttp.ClientSession() as http:
            admin = Admin(http, svc.url)
            common = ["--redis-url", redis_server.url, "--index", str(base_index), "--data-dir", str(tmp_path / "cli"),
                      "--no-progress"]
            assert await asyncio.to_thread(main, ["index", "add", str(source), *common]) == 0
            await eventually(lambda: _first_is(admin, QUERY, NEW_FACT.id))
            assert await asyncio.to_thread(main, ["index", "add", str(source), *common]) == 2  # duplicate
            assert await asyncio.to_thread(main, ["index", "delete", NEW_FACT.id, *common]) == 0
            await eventually(lambda: _absent(admin, QUERY, NEW_FACT.id))

    run(scenario(), timeout=120)
    assert json.loads((tmp_path / "new.jsonl").read_text().splitlines()[0])["id"] == NEW_FACT.id
