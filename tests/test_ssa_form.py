"""The rating form over real HTTP on loopback: seeded simulated raters rate exactly as the page does
(token, CSRF, one item at a time) and the report equals what their answers imply; then every bad
input the form must refuse, undo, security headers, and an interactive session with a real model."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest

from chatbot.cli import main as chatbot_main
from eval.rating_app import CSP
from eval.rating_client import FormError, RatingClient
from eval.ratings_db import RatingsDB
from eval.simulated_raters import SimulatedRater, rate_over_http
from tests.ssa_support import ADMIN_TOKEN, make_set, running_form


def run(coro):
    return asyncio.run(coro)


async def admin(url: str) -> RatingClient:
    client = RatingClient(url)
    await client.sign_in(ADMIN_TOKEN)
    return client


def test_simulated_raters_over_http_give_the_report_their_answers_imply(tmp_path: Path) -> None:
    rating_set = make_set("sim", per_system=6, seed=4)  # 18 items, 3 systems
    raters = [SimulatedRater(f"sim-{k}", seed=11, noise=0.25) for k in range(4)]

    async def scenario():
        async with running_form(tmp_path, k=3) as (url, db_path):
            async with await admin(url) as boss:
                loaded = await boss.load_set(rating_set.to_dict())
                assert loaded == {"name": "sim", "items": 18, "added": 18}
                tokens = [(await boss.create_rater(r.name))["token"] for r in raters]
                # All four rate at once, each one item at a time, until nothing is left for them.
                sent = await asyncio.gather(*(rate_over_http(url, t, r) for t, r in zip(tokens, raters)))
                status = await boss.status()
                csv_text = await boss.export_csv()
            return sent, status, csv_text, db_path

    sent, status, csv_text, db_path = run(scenario())
    by_item: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for rater_answers in sent:
        ids = [a[0] for a in rater_answers]
        assert len(ids) == len(set(ids))  # no item twice to one rater
        for iid, sensible, specific in rater_answers:
            by_item[iid].append((sensible, specific))
    assert len(by_item) == 18 and all(len(v) == 3 for v in by_item.values())  # k = 3 raters per item
    assert sum(len(a) for a in sent) == 54 and all(s["complete"] == 6 for s in status["systems"])
    assert csv_text.count("\n") == 55  # header + every answer

    # What the simulation implies, counted here without the scoring code: strict majorities per item.
    system_of = {i.id: i.system for i in rating_set.items}
    expected: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for iid, answers in by_item.items():
        sens = sum(a[0] for a in answers) * 2 > len(answers)
        spec = sum(a[1] for a in answers) * 2 > len(answers)
        expected[system_of[iid]].append((sens, spec))

    ppl = tmp_path / "ppl.csv"
    ppl.write_text("system,perplexity\nalpha,30.5\nbeta,42.0\ngamma,55.25\n")
    out = tmp_path / "report"
    assert chatbot_main(["eval", "report", "--db", str(db_path), "--perplexities", str(ppl), "--out", str(out),
                         "--simulated", "--bootstrap", "500"]) == 0
    report = json.loads((out / "report.json").read_text())
    for row in report["systems"]:
        labels = expected[row["system"]]
        assert row["items"] == len(labels) == 6 and row["ratings"] == 18
        assert row["sensibleness"] == pytest.approx(sum(s for s, _ in labels) / 6)
        assert row["specificity"] == pytest.approx(sum(p for _, p in labels) / 6)
        assert row["ssa"] == pytest.approx((row["sensibleness"] + row["specificity"]) / 2)
        lo, hi = row["ssa_ci"]
        assert lo <= row["ssa"] <= hi
    assert report["simulated_raters"] and report["raters"] == 4 and report["ratings"] == 54
    assert report["fit"]["systems"] == 3 and set(report["fit"]) >= {"pearson_r", "r2", "spearman_rho", "slope",
                                                                    "intercept", "pearson_r_ci"}
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "report.html", "ppl_vs_ssa.png"}
    assert "SIMULATED" in (out / "report.md").read_text() and "SIMULATED" in (out / "report.html").read_text()

    # The exported CSV scores the same as the database.
    csv_path = tmp_path / "ratings.csv"
    csv_path.write_text(csv_text)
    out2 = tmp_path / "report-csv"
    assert chatbot_main(["eval", "report", "--ratings", str(csv_path), "--perplexities", str(ppl), "--out", str(out2),
                         "--bootstrap", "500"]) == 0
    again = json.loads((out2 / "report.json").read_text())
    assert again["systems"] == report["systems"] and again["fit"] == report["fit"]


def test_bad_requests_are_refused_with_typed_errors(tmp_path: Path) -> None:
    async def scenario():
        async with running_form(tmp_path, k=2, sets=(make_set("bad", per_system=2),)) as (url, db_path):
            async with await admin(url) as boss:
                token = (await boss.create_rater("ann"))["token"]
                other = (await boss.create_rater("bob"))["token"]
            errors = {}

            async def expect(code: str, coro) -> None:
                with pytest.raises(FormError) as info:
                    await coro
                errors[code] = info.value.status
                assert info.value.code == code, info.value

            # Unknown token, a wrong secret for a real rater id, sign-in without the login CSRF token.
            async with RatingClient(url) as c:
                await expect("unauthorized", c.sign_in("rnope.secret"))
                await expect("unauthorized", c.sign_in(token.split(".")[0] + ".wrong-secret"))
            async with RatingClient(url) as c:
                await expect("csrf", c.request("POST", "/api/login", {"token": token}, csrf="forged"))
            async with RatingClient(url) as c:
                await expect("unauthorized", c.next())
                await c.sign_in(token)
                state = await c.next()
                item = state["item"]
                assert state["progress"] == {"done": 0, "total": 6} and not state["can_undo"]
                # Missing fields, wrong types, not JSON.
                await expect("bad_request", c.request("POST", "/api/answer", {"item_id": item["id"]}))
                await expect("bad_request", c.request("POST", "/api/answer", {"item_id": item["id"], "sensible": "yes"}))
                async with c.http.post(url + "/api/answer", data="x=1", headers={"X-CSRF-Token": c.csrf}) as resp:
                    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
                # Forged and missing CSRF tokens, a cross-origin request.
                await expect("csrf", c.request("POST", "/api/answer", {"item_id": item["id"], "sensible": False}, csrf="x" * 43))
                await expect("csrf", c.request("POST", "/api/answer", {"item_id": item["id"], "sensible": False}, csrf=""))
                async with c.http.post(url + "/api/undo", json={}, headers={"X-CSRF-Token": c.csrf,
                                                                            "Origin": "http://evil.example"}) as resp:
                    assert resp.status == 403
                # An item that is not the rater's current one (another existing item, and a made-up id).
                db = RatingsDB(db_path)
                others = [row[0] for row in db.conn.execute("SELECT id FROM items WHERE id <> ?", (item["id"],))]
                db.close()
                await expect("not_assigned", c.answer(others[0], True, False))
                await expect("not_assigned", c.answer("no-such-item", True, False))
                await expect("bad_request", c.answer(item["id"], False, True))  # specific without sensible
                # Answer, then the double submit of the same answer.
                after = await c.answer(item["id"], True, True)
                await expect("already_answered", c.answer(item["id"], True, True))
                assert after["progress"]["done"] == 1 and after["item"]["id"] != item["id"] and after["can_undo"]
                # Undo: the answer is withdrawn and the item is current again.
                undone = await c.undo()
                assert undone["item"]["id"] == item["id"] and undone["progress"]["done"] == 0
                await expect("nothing_to_undo", c.undo())
                # A rater is not an admin.
                await expect("forbidden", c.status())
                await expect("forbidden", c.create_rater("mallory"))
                # A stale CSRF token: sign in again (a new session), then use the old one.
                stale = c.csrf
                await c.sign_in(token)
                await expect("csrf", c.request("POST", "/api/undo", {}, csrf=stale))
            # Another rater never sees the first rater's answers through the API.
            async with RatingClient(url) as c2:
                await c2.sign_in(other)
                state = await c2.next()
                assert set(state) == {"chat", "item", "progress", "can_undo"}
                assert set(state["item"]) == {"id", "context", "response"}
                await expect("forbidden", c2.export_csv())
            return errors

    errors = run(scenario())
    assert errors == {"unauthorized": 401, "csrf": 403, "bad_request": 400, "not_assigned": 409,
                      "already_answered": 409, "nothing_to_undo": 409, "forbidden": 403}


def test_security_headers_on_pages_api_and_errors(tmp_path: Path) -> None:
    async def scenario():
        async with running_form(tmp_path, sets=(make_set("h", per_system=1),)) as (url, _):
            async with aiohttp.ClientSession() as http:
                for path, status in (("/", 200), ("/admin", 200), ("/static/rate.js", 200), ("/api/next", 401),
                                     ("/static/../ratings.sqlite", 404), ("/static/nope.js", 404)):
                    async with http.get(url + path) as resp:
                        assert resp.status == status, path
                        assert resp.headers["Content-Security-Policy"] == CSP
                        assert resp.headers["X-Content-Type-Options"] == "nosniff"
                        assert resp.headers["X-Frame-Options"] == "DENY"
                async with http.get(url + "/") as resp:
                    page = await resp.text()
                assert "<script>" not in page and " on" not in page.split("<body>")[1].split("<details")[0].lower().replace("one", "")
    run(scenario())
    assert "frame-ancestors 'none'" in CSP and "script-src 'self'" in CSP and "unsafe-inline" not in CSP


def test_interactive_session_turns_become_items_for_other_raters(tmp_path: Path, tiny_model_dir: Path) -> None:
    from chatbot.generate import ReplyEngine
    from chatbot.modeldir import load_model

    loaded = load_model(tiny_model_dir)
    engines = {"tiny": ReplyEngine(loaded.model, loaded.tokenizer)}

    async def scenario():
        async with running_form(tmp_path, k=1, engines=engines, num_candidates=2, max_new_tokens=6) as (url, db_path):
            async with await admin(url) as boss:
                ann = await boss.create_rater("ann")
                bob = await boss.create_rater("bob")
                with pytest.raises(FormError) as info:
                    await boss.start_chat(ann["id"], "no-such-bot", 4)
                assert info.value.code == "bad_request"
                await boss.start_chat(ann["id"], "tiny", 4)
                async with RatingClient(url) as c:
                    await c.sign_in(ann["token"])
                    state = await c.next()
                    assert state["chat"]["history"] == [] and state["item"] is None
                    with pytest.raises(FormError) as info:
                        await c.chat("hello")  # Meena's protocol opens with "Hi!"
                    assert info.value.code == "bad_request"
                    state = await c.chat("Hi!")
                    assert len(state["chat"]["history"]) == 2 and state["chat"]["status"] == "open"
                    state = await c.chat("what do you like to do?")
                    assert state["chat"] is None  # finished: back to rating
                    assert state["item"] is None  # its own turns are never offered to its author
                status = await boss.status()
                assert status["chats"][0]["status"] == "done" and len(status["chats"][0]["history"]) == 4
                async with RatingClient(url) as c:
                    await c.sign_in(bob["token"])
                    seen = []
                    state = await c.next()
                    while state["item"]:
                        seen.append(state["item"])
                        state = await c.answer(state["item"]["id"], True, False)
            return seen

    seen = run(scenario())
    assert len(seen) == 2  # two bot turns
    assert seen[0]["context"][0] == "Hi!" or seen[1]["context"][0] == "Hi!"
    contexts = sorted(len(i["context"]) for i in seen)
    assert contexts == [1, 3]  # each bot turn in the context of the conversation before it


def test_sign_in_sessions_expire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session cookie older than the form's session_max_age_s signs nobody in, and signing in again
    clears the expired sessions from the database."""
    import time as real_time

    db = RatingsDB(tmp_path / "ratings.sqlite")
    rater_id, _ = db.create_rater("ann")
    sid, _ = db.create_session("rater", rater_id, max_age_s=3600)
    assert db.session(sid, max_age_s=3600).rater_id == rater_id
    later = real_time.time() + 3601
    monkeypatch.setattr("eval.ratings_db.time.time", lambda: later)
    assert db.session(sid, max_age_s=3600) is None
    assert db.session(sid) is not None  # no limit given: the row is still there
    db.create_session("rater", rater_id, max_age_s=3600)
    assert db.session(sid) is None  # deleted by the next sign-in
