"""The chat service under load, over loopback: real `chatbot serve` processes, real websocket clients.

P3  throughput and latency of cross-session batching: S sessions x M messages each (a session sends its
    next message when the previous reply arrives), once against a server with batching on and once
    against the same server with --max-batch-size 1, in one run; plus one session alone for the
    single-session latency.  Goal: >= 6x replies/s, p95 <= 3x the single-session latency.
R1  reliability: 200 sessions x 10 messages: zero errors, and every session's history as stored in
    Redis equals what its client saw.
Engine: the ceiling of P3's throughput ratio.  In this process, the reply engine the server builds
    (same model, decode settings and torch threads) answers single contexts one call at a time, then
    --max-batch-size contexts per call: the per-reply speed-up is the most any batcher can get from
    batching on this machine (the service adds websocket, Redis and scheduling work on top).
Startup: seconds from process start to /readyz 200 (cold: first start, new data; warm: again), and
    the server's resident memory with the model loaded (idle, and peak over the run).

Servers use a redis-server process on a loopback port (the bench reads it directly for R1), the
serving decode settings unless overridden, and no rate limit (the load generator is one client).
Each phase is bounded by --max-seconds: it stops sending then, and its figures cover the replies done.

    python -m bench.bench_service [--model DIR] [--out results.json] [--only engine,p3,r1,startup]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from bench.common import header, write_json
from chatbot.client import ChatClient, ChatError
from chatbot.serve.config import ServeConfig
from chatbot.testing import RedisProcess, free_port
from chatbot.serve.sessions import SessionStore

# Openers and follow-ups of the kind the chitchat corpus holds; session s, message m says LINES[(s + m) % n].
LINES = [
    "hi! how is your day going?", "what do you do for fun?", "do you like movies?", "what is your favorite food?",
    "have you been anywhere nice lately?", "i just got back from the gym.", "what kind of music do you listen to?",
    "do you have any pets?", "i am thinking about learning to cook.", "what did you do last weekend?",
    "do you like to read?", "it is raining again here.", "what are you studying?", "i love hiking in the mountains.",
    "any plans for the summer?", "what is your favorite season?", "i am so tired today.", "do you play any sports?",
    "what was the last show you watched?", "tell me something interesting.",
]


@dataclass
class PhaseResult:
    name: str
    sessions: int
    messages: int
    replies: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    mean_batch: float | None = None
    histories_checked: int = 0
    histories_matching: int = 0

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)

        def pct(p: float) -> float | None:
            return round(1000 * lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 1) if lat else None

        return {"name": self.name, "sessions": self.sessions, "messages_per_session": self.messages,
                "replies": self.replies, "errors": self.errors, "error_codes": self.error_codes,
                "wall_s": round(self.wall_s, 2), "replies_per_s": round(self.replies / self.wall_s, 3) if self.wall_s else 0,
                "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
                "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else None,
                "mean_batch_size": self.mean_batch,
                "histories_checked": self.histories_checked, "histories_matching": self.histories_matching}


class ServerProcess:
    """`chatbot serve` as a child process on a loopback port."""

    def __init__(self, model: str | None, redis_url: str, workdir: Path, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"serve-{self.port}.log"
        self.cmd = [sys.executable, "-m", "chatbot.cli", "serve", "--port", str(self.port), "--redis-url", redis_url,
                    "--rate-per-minute", "1000000", "--rate-burst", "100000", "--max-queue", "4096", *extra]
        if model:
            self.cmd += ["--model", model]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 180.0) -> float:
        """Spawn and wait for /readyz; returns the seconds that took."""
        t0 = time.perf_counter()
        with self.log_path.open("ab") as log_file:  # append: a restart keeps the earlier start's log
            self.proc = subprocess.Popen(self.cmd, stdout=log_file, stderr=subprocess.STDOUT)
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {self.log_path}:\n{self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s}s; see {self.log_path}")

    def memory_mb(self) -> dict[str, float]:
        """Resident memory now and at its peak (VmRSS, VmHWM), MiB."""
        assert self.proc is not None
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = round(int(value.split()[0]) / 1024, 1)
        return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"]}

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of the batch-size histogram."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith(("chatbot_batch_size_sum", "chatbot_batch_size_count")):
                name, value = line.split()
                values[name] = float(value)
        return values.get("chatbot_batch_size_sum", 0.0), values.get("chatbot_batch_size_count", 0.0)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def run_phase(name: str, server: ServerProcess, redis_url: str, sessions: int, messages: int,
                    max_seconds: float, check_histories: bool) -> PhaseResult:
    result = PhaseResult(name, sessions, messages)
    seen: dict[str, list[tuple[str, str]]] = {}
    deadline = time.perf_counter() + max_seconds
    batch_sum0, batch_count0 = server.batch_stats()

    async def one_session(s: int, http: aiohttp.ClientSession) -> None:
        # retries=0: every error counts, none is hidden by a retry.
        client = ChatClient(server.url, retries=0, http=http)
        try:
            try:
                await client.connect()
            except ChatError as e:
                result.errors += 1
                result.error_codes[f"connect:{e.code}"] = result.error_codes.get(f"connect:{e.code}", 0) + 1
                return
            transcript = seen.setdefault(client.session_id, [])
            for m in range(messages):
                if time.perf_counter() > deadline:
                    break
                text = LINES[(s + m) % len(LINES)]
                t0 = time.perf_counter()
                try:
                    reply = await client.say(text)
                except ChatError as e:
                    result.errors += 1
                    result.error_codes[e.code] = result.error_codes.get(e.code, 0) + 1
                    continue  # this session's history check then fails too: R1 wants zero errors
                result.latencies_s.append(time.perf_counter() - t0)
                result.replies += 1
                transcript += [("user", text), ("bot", reply["text"])]
        finally:
            await client.close()

    t0 = time.perf_counter()
    # limit=0: the default connector caps concurrent connections at 100, websockets included.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(one_session(s, http) for s in range(sessions)))
    result.wall_s = time.perf_counter() - t0
    batch_sum1, batch_count1 = server.batch_stats()
    if batch_count1 > batch_count0:
        result.mean_batch = round((batch_sum1 - batch_sum0) / (batch_count1 - batch_count0), 2)
    if check_histories:
        redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = SessionStore(redis, 3600)
        for session_id, transcript in seen.items():
            stored = [(t.role, t.text) for t in await store.history(session_id)]
            result.histories_checked += 1
            result.histories_matching += stored == transcript
        await redis.aclose()
    return result


def engine_ceiling(model: str | None, decode: dict, max_batch: int, single_calls: int = len(LINES),
                   batch_calls: int = 2) -> dict:
    """Per-reply seconds of the server's own engine at batch 1 and at ``max_batch`` contexts per call."""
    import torch

    from chatbot.serve.app import decoding_config, load_engine

    config = ServeConfig(model_dir=model, **decode)
    engine = load_engine(config)  # also sets the server's torch threads
    decoding = decoding_config(config)
    contexts = [[LINES[i % len(LINES)]] for i in range(max(single_calls, max_batch * batch_calls))]
    with torch.inference_mode():
        engine.reply(contexts[:1], decoding)  # warm-up at both shapes
        engine.reply(contexts[:max_batch], decoding)
        t0 = time.perf_counter()
        for i in range(single_calls):
            engine.reply(contexts[i:i + 1], decoding)
        single = (time.perf_counter() - t0) / single_calls
        t0 = time.perf_counter()
        for i in range(batch_calls):
            engine.reply(contexts[i * max_batch:(i + 1) * max_batch], decoding)
        batched = (time.perf_counter() - t0) / (batch_calls * max_batch)
    return {"torch_threads": torch.get_num_threads(), "single_s_per_reply": round(single, 3),
            "batched_s_per_reply": round(batched, 3), "batch": max_batch, "ceiling_ratio": round(single / batched, 2)}


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(key) is None else str(row[key]) for _, key in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    defaults = ServeConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--only", default="engine,startup,p3,r1", help="comma-separated phases: engine, startup, p3, r1")
    p.add_argument("--p3-sessions", type=int, default=32)
    p.add_argument("--p3-messages", type=int, default=20)
    p.add_argument("--single-messages", type=int, default=20, help="messages of the single-session baseline")
    p.add_argument("--r1-sessions", type=int, default=200)
    p.add_argument("--r1-messages", type=int, default=10)
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                   help="the batching-on server's (default: the serving default, %(default)s)")
    p.add_argument("--torch-threads", type=int, help="the servers' torch threads (default: the serving default)")
    p.add_argument("--device", default=defaults.device, help="the servers' torch device (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms)
    p.add_argument("--num-candidates", type=int, default=defaults.num_candidates)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--max-seconds", type=float, default=600.0, help="cap on each load phase (default: %(default)s)")
    args = p.parse_args(argv)
    phases = set(args.only.split(","))
    decode = ["--num-candidates", str(args.num_candidates), "--max-new-tokens", str(args.max_new_tokens),
              "--max-wait-ms", str(args.max_wait_ms), "--device", args.device]
    if args.torch_threads:
        decode += ["--torch-threads", str(args.torch_threads)]
    out: dict = {**header(), "model": args.model or "shipped default", "load_average_at_start": os.getloadavg(),
                 "settings": {k: v for k, v in vars(args).items() if k not in ("out", "only")}}

    if "engine" in phases:  # before any server exists, so nothing else competes for the cores
        out["engine"] = engine_ceiling(args.model, {"num_candidates": args.num_candidates,
                                                    "max_new_tokens": args.max_new_tokens,
                                                    "torch_threads": args.torch_threads, "device": args.device},
                                       args.max_batch_size)
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp, RedisProcess(Path(tmp) / "redis") as redis:
        work = Path(tmp)

        def server(max_batch: int) -> ServerProcess:
            return ServerProcess(args.model, redis.url, work, [*decode, "--max-batch-size", str(max_batch)])

        batched = server(args.max_batch_size)
        cold_s = batched.start()
        idle = batched.memory_mb()
        try:
            if "startup" in phases:
                batched.stop()
                warm_s = batched.start()
                out["startup"] = {"cold_start_s": round(cold_s, 2), "warm_start_s": round(warm_s, 2),
                                  "idle_rss_mb": idle["rss_mb"]}
            if "p3" in phases:
                single = asyncio.run(run_phase("single session", batched, redis.url, 1, args.single_messages,
                                               args.max_seconds, False))
                on = asyncio.run(run_phase(f"batching on (max batch {args.max_batch_size})", batched, redis.url,
                                           args.p3_sessions, args.p3_messages, args.max_seconds, False))
                out["p3"] = {"single": single.summary(), "batched": on.summary()}
            if "r1" in phases:
                r1 = asyncio.run(run_phase("R1", batched, redis.url, args.r1_sessions, args.r1_messages,
                                           args.max_seconds, True))
                out["r1"] = r1.summary()
            if "startup" in phases:
                out["startup"]["peak_rss_mb"] = batched.memory_mb()["peak_rss_mb"]
        finally:
            batched.stop()
        if "p3" in phases:
            unbatched = server(1)
            unbatched.start()
            try:
                off = asyncio.run(run_phase("max batch size 1", unbatched, redis.url, args.p3_sessions,
                                            args.p3_messages, args.max_seconds, False))
            finally:
                unbatched.stop()
            out["p3"]["unbatched"] = off.summary()
            p3 = out["p3"]
            p3["throughput_ratio"] = round(p3["batched"]["replies_per_s"] / max(p3["unbatched"]["replies_per_s"], 1e-9), 2)
            p3["p95_over_single_p50"] = round(p3["batched"]["p95_ms"] / p3["single"]["p50_ms"], 2)

    columns = [("run", "name"), ("sessions x msgs", "shape"), ("replies", "replies"), ("errors", "errors"),
               ("wall s", "wall_s"), ("replies/s", "replies_per_s"), ("p50 ms", "p50_ms"), ("p95 ms", "p95_ms"),
               ("p99 ms", "p99_ms"), ("mean batch", "mean_batch_size")]
    print(f"machine: {out['machine']}; load average at start: {out['load_average_at_start']}")
    if "engine" in out:
        e = out["engine"]
        print("\n### Engine alone: the ceiling of the P3 throughput ratio\n")
        print(table([e], [("torch threads", "torch_threads"), ("s / reply, 1 per call", "single_s_per_reply"),
                          ("contexts per call", "batch"), ("s / reply, batched", "batched_s_per_reply"),
                          ("ceiling", "ceiling_ratio")]))
    if "startup" in out:
        s = out["startup"]
        print("\n### Startup and memory\n")
        print(table([s], [("cold start s", "cold_start_s"), ("warm start s", "warm_start_s"),
                          ("RSS idle MiB", "idle_rss_mb"), ("peak RSS MiB", "peak_rss_mb")]))
    if "p3" in out:
        p3 = out["p3"]
        rows = [{**p3[k], "shape": f"{p3[k]['sessions']} x {p3[k]['messages_per_session']}"}
                for k in ("single", "batched", "unbatched")]
        print("\n### P3: cross-session batching\n")
        print(table(rows, columns))
        print(f"\nthroughput ratio (batching on / max batch 1): {p3['throughput_ratio']}x (goal >= 6x); "
              f"p95 with batching / single-session p50: {p3['p95_over_single_p50']}x (goal <= 3x)")
    if "r1" in out:
        r1 = {**out["r1"], "shape": f"{out['r1']['sessions']} x {out['r1']['messages_per_session']}"}
        print("\n### R1: 200 concurrent sessions\n")
        print(table([r1], [*columns[1:], ("histories = client view", "histories_matching")]))
        print(f"\n{r1['histories_matching']}/{r1['histories_checked']} histories in Redis equal what the clients saw; "
              f"errors: {r1['errors']} {r1['error_codes'] or ''}")
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
