"""Workers behind nginx on loopback (bench.cluster: Debian's redis-server and nginx with
deploy/nginx/nginx.conf, `chatbot serve` processes), driven by concurrent sessions through nginx.

- ``scale``: throughput with 1 and then 2 workers behind nginx, the same closed-loop load (each
  session sends its next message when the previous reply arrives), and the ratio.
- ``r3``: 2 workers under that load; once ``--kill-after`` replies have been received in all, one worker is
  SIGKILLed.  Every session carries on (reconnect through nginx, same message id); at the end each
  session's stored history is compared with what its client was acknowledged and shown.  Reports
  the share of conversations that continue with their full history, the errors clients saw (typed,
  retryable), the disconnects, and the time to recover (connection lost -> next reply).

    python -m bench.bench_cluster --sessions 32 --messages 6
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.cluster import Conversation, LocalCluster
from bench.common import header, write_json

LINES = ["hi! how are you?", "what do you do for fun?", "i like hiking in the mountains", "do you have any pets?",
         "what music do you like?", "where would you like to travel?", "what did you eat today?",
         "tell me about your family", "what's your favorite movie?", "do you like your job?"]


async def drive(url: str, sessions: int, messages: int, on_reply=None) -> dict:
    """Closed loop: each session sends its messages one after another.  Returns the load's figures and
    the per-session records (Conversation objects)."""
    latencies: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=300)) as http:
        talks = [Conversation(url, http) for _ in range(sessions)]

        async def one(i: int, talk: Conversation) -> None:
            await talk.connect()
            for m in range(messages):
                start = time.perf_counter()
                await talk.say(LINES[(i + m) % len(LINES)])
                latencies.append(time.perf_counter() - start)
                if on_reply:
                    on_reply()

        start = time.perf_counter()
        outcomes = await asyncio.gather(*(one(i, t) for i, t in enumerate(talks)), return_exceptions=True)
        wall = time.perf_counter() - start
        histories = []
        for talk in talks:
            try:
                histories.append(await talk.stored_history() if talk.session_id else [])
            except Exception as e:  # noqa: BLE001  (recorded as a failed conversation)
                histories.append(e)
            await talk.close()
    lat = sorted(latencies)
    pct = lambda q: 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"talks": talks, "outcomes": outcomes, "histories": histories, "wall_s": wall,
            "replies": len(latencies), "replies_per_s": len(latencies) / wall, "p50_ms": pct(0.5), "p95_ms": pct(0.95)}


def conversation_report(run: dict, messages: int) -> dict:
    full = 0
    failures = []
    for talk, outcome, history in zip(run["talks"], run["outcomes"], run["histories"]):
        problems = [repr(outcome)] if isinstance(outcome, BaseException) else []
        problems += [repr(history)] if isinstance(history, BaseException) else talk.history_problems(history)
        if len(talk.replies) != messages:
            problems.append(f"{len(talk.replies)} of {messages} replies")
        if problems:
            failures.append(problems)
        else:
            full += 1
    errors = Counter(f"{e['code']} (retryable={e['retryable']})" for t in run["talks"] for e in t.errors)
    recovery = [s for t in run["talks"] for s in t.recovery_s]
    reconnect = [s for t in run["talks"] for s in t.reconnect_s]
    return {"sessions": len(run["talks"]), "full_history": full, "full_history_share": full / len(run["talks"]),
            "failures": failures[:5], "error_frames": dict(errors),
            "sessions_disconnected": sum(1 for t in run["talks"] if t.disconnects),
            "disconnects": sum(t.disconnects for t in run["talks"]),
            "reconnects": sum(t.reconnects for t in run["talks"]),
            "reconnect_s_median": statistics.median(reconnect) if reconnect else None,
            "reconnect_s_max": max(reconnect) if reconnect else None,
            "recovery_s_median": statistics.median(recovery) if recovery else None,
            "recovery_s_max": max(recovery) if recovery else None}


def scale(args: argparse.Namespace, workdir: Path) -> dict:
    rows = []
    for workers in (1, 2):
        with LocalCluster(workdir / f"scale-{workers}", workers=workers, model=args.model, serve_args=args.serve_args) as c:
            run = asyncio.run(drive(c.url, args.sessions, args.messages))
            report = conversation_report(run, args.messages)
            rows.append({"workers": workers, "replies": run["replies"], "wall_s": run["wall_s"],
                         "replies_per_s": run["replies_per_s"], "p50_ms": run["p50_ms"], "p95_ms": run["p95_ms"],
                         "full_history": report["full_history"], "error_frames": report["error_frames"]})
            print(f"| {workers} | {run['replies']} | {run['wall_s']:.1f} | {run['replies_per_s']:.2f} | "
                  f"{run['p50_ms']:.0f} | {run['p95_ms']:.0f} | {report['full_history']}/{args.sessions} |", flush=True)
    return {"rows": rows, "ratio_2_to_1": rows[1]["replies_per_s"] / rows[0]["replies_per_s"]}


def r3(args: argparse.Namespace, workdir: Path) -> dict:
    with LocalCluster(workdir / "r3", workers=2, model=args.model, serve_args=args.serve_args) as c:
        victim = c.workers[0]
        state = {"replies": 0, "killed_at": None}

        def on_reply() -> None:
            state["replies"] += 1
            if state["replies"] == args.kill_after and state["killed_at"] is None:
                c.kill(victim)
                state["killed_at"] = time.perf_counter()

        run = asyncio.run(drive(c.url, args.sessions, args.messages, on_reply))
        report = conversation_report(run, args.messages)
        survivor_connections = c.workers[1].metric("chatbot_connections")
    report.update({"killed_after_replies": args.kill_after, "killed": state["killed_at"] is not None,
                   "replies": run["replies"], "wall_s": run["wall_s"], "p50_ms": run["p50_ms"], "p95_ms": run["p95_ms"],
                   "survivor_connections_at_end": survivor_connections})
    return report


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--messages", type=int, default=6, help="messages per session")
    p.add_argument("--kill-after", type=int, help="r3: replies received before the kill (default: a third of all)")
    p.add_argument("--only", default="scale,r3", help="comma-separated phases: scale, r3")
    p.add_argument("--serve-arg", action="append", default=[], dest="serve_args",
                   help="extra `chatbot serve` argument for every worker (repeat: --serve-arg=--num-candidates --serve-arg=4)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    args.kill_after = args.kill_after or max(1, args.sessions * args.messages // 3)
    result = {**header(), "sessions": args.sessions, "messages": args.messages, "serve_args": args.serve_args}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        if "scale" in args.only:
            print("| workers | replies | wall s | replies/s | p50 ms | p95 ms | full histories |")
            print("|---|---|---|---|---|---|---|", flush=True)
            result["scale"] = scale(args, Path(tmp))
            print(f"throughput 2 workers / 1 worker: {result['scale']['ratio_2_to_1']:.2f}x", flush=True)
        if "r3" in args.only:
            r = result["r3"] = r3(args, Path(tmp))
            print(f"R3: {r['full_history']}/{r['sessions']} conversations continued with full history "
                  f"({100 * r['full_history_share']:.0f}%); error frames {r['error_frames'] or 'none'}; "
                  f"{r['sessions_disconnected']} sessions disconnected ({r['disconnects']} disconnects, "
                  f"{r['reconnects']} reconnects); lost -> resumed with history: median {fmt(r['reconnect_s_median'])} s, "
                  f"max {fmt(r['reconnect_s_max'])} s; lost -> next reply: median {fmt(r['recovery_s_median'])} s, "
                  f"max {fmt(r['recovery_s_max'])} s (reply latency under this load: p50 {r['p50_ms'] / 1000:.1f} s)",
                  flush=True)
            if r["failures"]:
                print("failures:", r["failures"], flush=True)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
