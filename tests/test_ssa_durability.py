"""kill -9 of a real `chatbot eval rate` process in the middle of a burst of answers: every answer
the form acknowledged is in the database afterwards, with the values sent."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from chatbot.testing import free_port
from eval.rating_client import RatingClient
from tests.ssa_support import make_set


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    for _ in range(1800):  # bounded: ~3 min for imports on a busy shared machine
        if proc.poll() is not None:
            pytest.fail(f"chatbot eval rate exited early:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url + "/api/csrf", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    pytest.fail("the rating form never became ready")


def test_acknowledged_answers_survive_sigkill_during_a_burst(tmp_path: Path) -> None:
    set_path = make_set("burst", per_system=60).save(tmp_path / "burst.json")  # 180 items
    data, port = tmp_path / "data", free_port()
    log_path = tmp_path / "rate.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "chatbot.cli", "eval", "rate", "--set", str(set_path),
                                 "--port", str(port), "--data-dir", str(data), "--raters-per-item", "1"],
                                stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    acked: dict[tuple[str, str], tuple[int, int]] = {}
    try:
        wait_ready(proc, url, log_path)
        admin_token = (data / "admin-token").read_text().strip()

        async def burst() -> int:
            async with RatingClient(url) as boss:
                await boss.sign_in(admin_token)
                raters = [await boss.create_rater(f"r{k}") for k in range(4)]
            killed = asyncio.Event()

            async def rater_loop(rater: dict) -> int:
                failures = 0
                async with RatingClient(url) as c:
                    await c.sign_in(rater["token"])
                    state = await c.next()
                    n = 0
                    while state["item"] is not None:
                        iid = state["item"]["id"]
                        sensible = n % 3 != 0
                        specific = sensible and n % 2 == 0
                        try:
                            state = await c.answer(iid, sensible, specific)
                        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
                            failures += 1  # the process died under this request: not acknowledged
                            break
                        acked[(rater["id"], iid)] = (int(sensible), int(specific))
                        n += 1
                        if len(acked) >= 40 and not killed.is_set():
                            killed.set()
                            os.kill(proc.pid, signal.SIGKILL)  # other raters' requests are in flight now
                return failures

            results = await asyncio.gather(*(rater_loop(r) for r in raters))
            return sum(results)

        failures = asyncio.run(burst())
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        assert failures >= 1  # the kill did land during the burst
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    conn = sqlite3.connect(data / "ratings.sqlite")
    stored = {(r, i): (s, p) for r, i, s, p in conn.execute("SELECT rater_id, item_id, sensible, specific FROM answers")}
    conn.close()
    assert len(acked) >= 40
    missing = {k: v for k, v in acked.items() if stored.get(k) != v}
    assert not missing, f"{len(missing)} acknowledged answers lost or changed"
