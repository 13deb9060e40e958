"""The cross-session batcher on its own, with a scripted engine: batch formation, streaming order,
errors, the queue bound, shutdown.  (tests/test_service.py drives it with the real model.)"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_service_support import run

from chatbot.generate import DecodingConfig, GenerationError, Reply
from chatbot.serve.batcher import Batcher, BatcherClosed, Busy
from chatbot.serve.metrics import ServiceMetrics


class ScriptedEngine:
    """Echoes each context's last turn back word by word; records batches and threads."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.threads: set[int] = set()
        self.fail_on = fail_on

    def reply(self, contexts, config, *, return_candidates=False, on_piece=None, on_reply=None):
        self.batches.append([c[-1] for c in contexts])
        self.threads.add(threading.get_ident())
        if self.fail_on is not None and any(c[-1] == self.fail_on for c in contexts):
            raise RuntimeError("model exploded")
        out = []
        for i, context in enumerate(contexts):
            text = f"echo {context[-1]}"
            for piece in ("echo", f" {context[-1]}"):
                if on_piece is not None:
                    on_piece(i, piece)
            out.append(Reply(text, [], 0.0, 0.0, None, False, {"total_s": 0.0}))
        return out


def batcher(engine: ScriptedEngine, **kw) -> Batcher:
    args = {"max_batch_size": 4, "max_wait_ms": 50.0, "max_queue": 16, **kw}
    return Batcher(engine, DecodingConfig(), metrics=ServiceMetrics(), **args)


def test_jobs_from_many_sessions_form_bounded_batches_off_the_loop() -> None:
    engine = ScriptedEngine()

    async def scenario() -> None:
        b = batcher(engine)
        jobs = [b.submit([f"m{i}"]) for i in range(10)]  # queued before the batcher first runs
        b.start()
        replies = [await job.result() for job in jobs]
        assert [r.text for r in replies] == [f"echo m{i}" for i in range(10)]
        await b.close()
        assert [len(batch) for batch in engine.batches] == [4, 4, 2]
        assert threading.get_ident() not in engine.threads
        assert b.metrics.registry.get_sample_value("chatbot_batch_size_count") == 3
        assert b.metrics.registry.get_sample_value("chatbot_batch_size_sum") == 10

    run(scenario())


class SlowEngine(ScriptedEngine):
    def reply(self, contexts, config, **kw):
        time.sleep(0.2)  # a batch takes a while, as a real one does
        return super().reply(contexts, config, **kw)


def test_sessions_answered_by_one_batch_make_the_next_batch_together() -> None:
    """A closed loop of sessions that started apart (two groups) must not take turns forever: the
    sessions answered by a batch get max_wait_ms after it to join the jobs that queued meanwhile."""
    engine = SlowEngine()

    async def session(b: Batcher, name: str, start_after: float) -> None:
        await asyncio.sleep(start_after)
        for m in range(5):
            await b.submit([f"{name}-{m}"]).result()
            await asyncio.sleep(0.005)  # the reply's trip to the client and the next message's trip back

    async def scenario() -> None:
        b = batcher(engine, max_batch_size=8, max_wait_ms=50.0)
        b.start()
        # s0..s3 start together; s4..s7 arrive while the first batch is decoding.
        await asyncio.gather(*(session(b, f"s{i}", 0.0 if i < 4 else 0.12) for i in range(8)))
        await b.close()

    run(scenario())
    sizes = [len(batch) for batch in engine.batches]
    # [4, 8, 8, 8, 8, 4]: merged from the second batch on (taking turns would give [4, 4, 4, ...])
    assert sum(sizes) == 40 and set(sizes[1:-1]) == {8}, sizes


class EarlyEngine(ScriptedEngine):
    """Hands over the first context's reply, then takes a while over the rest."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def reply(self, contexts, config, *, on_reply=None, **kw):
        replies = super().reply(contexts, config, **kw)
        on_reply(0, replies[0])
        self.release.wait(5)
        for i in range(1, len(replies)):
            on_reply(i, replies[i])
        return replies


def test_a_reply_handed_over_early_finishes_its_job_before_the_batch_ends() -> None:
    engine = EarlyEngine()

    async def scenario() -> None:
        b = batcher(engine)
        first, second = b.submit(["short"]), b.submit(["long"])
        b.start()
        assert (await asyncio.wait_for(first.result(), 5)).text == "echo short"
        waiting = asyncio.ensure_future(second.result())
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the batch is still running
        engine.release.set()
        assert (await asyncio.wait_for(waiting, 5)).text == "echo long"
        await b.close()
        assert len(engine.batches) == 1

    run(scenario())


class FailsAfterFirstReply(ScriptedEngine):
    def reply(self, contexts, config, *, on_reply=None, **kw):
        replies = super().reply(contexts, config, **kw)
        on_reply(0, replies[0])
        raise RuntimeError("model exploded after the first reply")


def test_an_error_after_an_early_reply_fails_only_the_jobs_still_waiting() -> None:
    engine = FailsAfterFirstReply()

    async def scenario() -> None:
        b = batcher(engine)
        first, second = b.submit(["a"]), b.submit(["b"])
        b.start()
        assert (await first.result()).text == "echo a"  # finished once, with its reply
        # The second had streamed its pieces already, so it cannot be retried: it fails.
        with pytest.raises(RuntimeError, match="exploded"):
            await second.result()
        assert [p async for p in first.pieces()] == []  # no second end marker was queued for it
        await b.close()
        assert engine.batches == [["a", "b"]]

    run(scenario())


def test_pieces_stream_in_order_and_add_up_to_the_reply() -> None:
    async def scenario() -> None:
        b = batcher(ScriptedEngine())
        b.start()
        job = b.submit(["hello", "world"])
        pieces = [p async for p in job.pieces()]
        reply = await job.result()
        assert pieces == ["echo", " world"] and "".join(pieces) == reply.text
        await b.close()

    run(scenario())


def test_a_poisoned_job_fails_alone_and_its_batch_mates_are_answered() -> None:
    """One job whose context makes the batched call fail (as a lone surrogate once made the tokenizer
    fail) must not fail the others: they are retried without it."""
    engine = ScriptedEngine(fail_on="boom")

    async def scenario() -> None:
        b = batcher(engine, max_batch_size=8)
        healthy = [b.submit([f"fine {i}"]) for i in range(7)]
        bad = b.submit(["boom"])
        healthy.insert(5, healthy.pop())  # the offender sits among them, not at an edge
        b.start()
        with pytest.raises(RuntimeError, match="model exploded"):
            await bad.result()
        assert sorted([(await job.result()).text for job in healthy]) == sorted(f"echo fine {i}" for i in range(7))
        assert (await b.submit(["later"]).result()).text == "echo later"  # and the batcher goes on
        await b.close()
        assert len(engine.batches[0]) == 8  # one batch first; bisection found the offender after
        assert engine.batches[-1] == ["later"]
        assert sum(batch == ["boom"] for batch in engine.batches) == 1
        assert len(engine.batches) <= 1 + 2 * 3 + 1  # about 2 log2(8) retries, not one call per job

    run(scenario())


class StreamsThenFails(ScriptedEngine):
    """Streams a piece of the first context's reply, then fails when "boom" is in the batch."""

    def reply(self, contexts, config, *, on_piece=None, **kw):
        self.batches.append([c[-1] for c in contexts])
        on_piece(0, "half a reply")
        if any(c[-1] == "boom" for c in contexts):
            raise RuntimeError("model exploded mid-stream")
        return ScriptedEngine.reply(self, contexts, config, **kw)


def test_a_job_that_already_streamed_fails_instead_of_streaming_twice() -> None:
    engine = StreamsThenFails()

    async def scenario() -> None:
        b = batcher(engine)
        streamed, bad, fine = b.submit(["streamer"]), b.submit(["boom"]), b.submit(["fine"])
        b.start()
        assert [p async for p in streamed.pieces()] == ["half a reply"]
        with pytest.raises(RuntimeError, match="mid-stream"):
            await streamed.result()
        with pytest.raises(RuntimeError, match="mid-stream"):
            await bad.result()
        assert (await fine.result()).text == "echo fine"
        await b.close()
        assert "streamer" not in [c for batch in engine.batches[1:] for c in batch]

    run(scenario())


def test_a_context_the_engine_would_refuse_fails_alone_at_submit() -> None:
    async def scenario() -> None:
        b = batcher(ScriptedEngine())
        with pytest.raises(GenerationError):
            b.submit(["fine", "   "])
        await b.close()

    run(scenario())


def test_full_queue_is_busy_abandoned_jobs_are_skipped_and_close_fails_the_rest() -> None:
    engine = ScriptedEngine()

    async def scenario() -> None:
        b = batcher(engine, max_queue=3)
        first, skipped, third = b.submit(["a"]), b.submit(["b"]), b.submit(["c"])
        assert b.full()
        with pytest.raises(Busy):
            b.submit(["d"])
        skipped.abandon()
        b.start()
        assert (await first.result()).text == "echo a" and (await third.result()).text == "echo c"
        assert engine.batches == [["a", "c"]]
        stranded = b.submit(["e"])
        await b.close()  # closing before the batcher ran it: the job fails instead of hanging
        with pytest.raises(BatcherClosed):
            await stranded.result()
        with pytest.raises(BatcherClosed):
            b.submit(["f"])

    run(scenario())


def test_max_batch_size_one_never_batches() -> None:
    engine = ScriptedEngine()

    async def scenario() -> None:
        b = batcher(engine, max_batch_size=1)
        jobs = [b.submit([str(i)]) for i in range(5)]
        b.start()
        await asyncio.gather(*(job.result() for job in jobs))
        await b.close()
        assert [len(batch) for batch in engine.batches] == [1] * 5

    run(scenario())
