"""The deployment on loopback, with real engines: Debian's redis-server, two `chatbot serve` worker
processes sharing it, Debian's nginx running deploy/nginx/nginx.conf in front.  A worker is SIGKILLed
mid-conversation; the client reconnects through nginx, lands on the other worker and carries on with
its full history.

Not yet covered: a knowledge passage added through one worker and found through the other (the
knowledge index is not in the service yet)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
import yaml

from bench.cluster import Conversation, LocalCluster, http_get, missing_binaries

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# Small and quick replies: this test is about the processes around the model.
SERVE_ARGS = ["--torch-threads", "1", "--num-candidates", "2", "--max-new-tokens", "8", "--max-wait-ms", "5"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """One cluster for the module (starting workers is the slow part); the kill test runs last."""
    if missing_binaries():
        pytest.fail(f"Debian's {' and '.join(missing_binaries())} are needed: `make system-deps` installs them")
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers=2, model=str(tiny_model_dir), serve_args=SERVE_ARGS) as c:
        yield c


def serving_worker(cluster: LocalCluster):
    """The worker holding the (one) open websocket, from the workers' own /metrics."""
    holding = [w for w in cluster.workers if w.alive() and w.metric("chatbot_connections") >= 1]
    assert len(holding) == 1, [(w.port, w.alive()) for w in cluster.workers]
    return holding[0]


def test_workers_export_the_autoscaling_metric_and_nginx_keeps_health_apart(cluster: LocalCluster) -> None:
    hpa = yaml.safe_load((REPO / "deploy" / "k8s" / "hpa.yaml").read_text())
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names
    for w in cluster.workers:
        for name in names:
            assert w.metric(name) >= 0  # present on every live worker, scrapeable one by one
        assert http_get(f"{w.url}/readyz")[0] == 200
    assert http_get(f"{cluster.url}/lb-healthz") == (200, "ok\n")
    assert http_get(f"{cluster.url}/metrics")[0] == 404  # never a random worker's numbers via the balancer
    status, body = http_get(f"{cluster.url}/readyz")  # proxied: some worker answers
    assert status == 200 and '"ready": true' in body


def test_a_worker_killed_mid_conversation_loses_no_acknowledged_turn(cluster: LocalCluster) -> None:
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            talk = Conversation(cluster.url, http)
            await talk.connect()
            for text in ("hi there!", "what do you do for fun?", "i like hiking"):
                assert await talk.say(text)
            first = serving_worker(cluster)
            other = next(w for w in cluster.workers if w is not first)

            # Send the next message and kill its worker as soon as the turn is acknowledged, while
            # the reply is being generated (or just after): either way the turn must survive.
            mid = "killed-turn"
            await talk._ws.send_str('{"type": "message", "message_id": "%s", "text": "where do you hike?"}' % mid)
            frame = await talk._receive()
            assert frame["type"] == "accepted" and frame["index"] == 6, frame
            cluster.kill(first)
            # nginx closes the client's side once its upstream is gone.
            with pytest.raises(ConnectionError):
                while True:
                    await asyncio.wait_for(talk._receive(), 30)
            talk.acked.append((mid, "where do you hike?"))
            talk._lost()

            # Reconnect through nginx: the dead worker refuses, nginx passes the connection on.
            history = await talk.connect()
            assert serving_worker(cluster) is other
            assert [t["text"] for t in history if t["role"] == "user"] == [t for _, t in talk.acked]
            # 7 turns if the killed worker had not stored its reply yet, 8 if it had.
            assert len(history) in (7, 8) and [t["role"] for t in history[:6]] == ["user", "bot"] * 3
            # Retry the acknowledged turn with its id: answered once, never stored twice.
            await talk._ws.send_str('{"type": "message", "message_id": "%s", "text": "where do you hike?"}' % mid)
            while True:
                frame = await asyncio.wait_for(talk._receive(), 30)
                if frame["type"] == "accepted":
                    assert frame["duplicate"] is True and frame["index"] == 6
                if frame["type"] == "reply":
                    talk.replies[mid] = frame["text"]
                    break
                assert frame["type"] != "error", frame
            assert await talk.say("sounds nice")

            history = await talk.stored_history()
            assert len(history) == 10
            assert talk.history_problems(history) == []
            assert [t["text"] for t in history if t["role"] == "user"] == [
                "hi there!", "what do you do for fun?", "i like hiking", "where do you hike?", "sounds nice"]
            await talk.close()

        # nginx logged both workers as upstreams of this session's websockets.
        ports = {int(a.rsplit(":", 1)[1]) for a in re.findall(r"127\.0\.0\.1:\d+", " ".join(cluster.access_log_upstreams()))}
        assert {first.port, other.port} <= ports, cluster.access_log_upstreams()

    asyncio.run(scenario())
