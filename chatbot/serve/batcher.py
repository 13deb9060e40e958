"""Cross-session batching: pending replies from every session run as one batched generate call.

A single background task takes the first waiting job, then keeps collecting until the batch is full
or ``max_wait_ms`` has passed, and hands the batch to one worker thread (the event loop never runs model
code).  While a batch decodes, new jobs queue up and form the next batch.  The wait runs from the later
of the first job's arrival and the end of the previous batch: the sessions that batch just answered
send their next messages within milliseconds, and without that window they would always miss the next
batch, leaving a closed loop of sessions split into groups that take turns at a fraction of the batch
size (measured: 32 sessions settled into alternating batches of 16).  The queue is bounded: a job that finds it full
fails at once with ``Busy`` instead of adding unbounded latency for everyone.

Streaming: the engine reports text pieces from the worker thread; they are marshalled onto the loop
with ``call_soon_threadsafe``, which keeps them in order and ahead of the job's final result.  A job
finishes as soon as the engine hands over its reply, not when the whole batch is done: a short reply's
final frame does not wait for the batch's longest one.

Isolation: one job must not fail its batch mates.  Contexts are validated one by one at ``submit``;
if a batched call still fails, the jobs it had not answered are retried in halves (bisection), so a
job that fails alone gets the error and the rest are answered (one poisoned job among n costs about
2 log2 n extra calls).  A job that already streamed part of its reply cannot start its stream over,
so it fails with the error instead of being retried (its client retries the message).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from chatbot.generate import DecodingConfig, Reply, check_contexts
from chatbot.serve.metrics import ServiceMetrics

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """The reply queue is full."""


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no more work."""


class Engine(Protocol):
    """What the batcher needs of ``chatbot.generate.ReplyEngine`` (tests may pass a stand-in)."""

    def reply(self, contexts: list[list[str]], config: DecodingConfig, *, return_candidates: bool = False,
              on_piece: Callable[[int, str], None] | None = None,
              on_reply: Callable[[int, Reply], None] | None = None) -> list[Reply]: ...


_DONE = object()


class ReplyJob:
    """One conversation's pending reply: a stream of text pieces, then a result (a Reply) or an error.

    The batcher feeds it on the event loop (``add_piece``, then ``finish`` or ``fail``); the requester
    reads ``pieces()`` and ``result()``, and calls ``abandon()`` when it no longer wants the reply."""

    def __init__(self, context: list[str]):
        self.context = context
        self.enqueued_at = time.monotonic()
        self._abandoned = False
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._result: Reply | None = None
        self._error: BaseException | None = None
        self._drained = False  # the end marker was consumed
        self._settled = False  # a result or an error was set; later ones are ignored

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    @property
    def settled(self) -> bool:
        return self._settled

    def abandon(self) -> None:
        """The requester left: a job still queued is skipped; one already generating runs to the end."""
        self._abandoned = True

    def add_piece(self, text: str) -> None:
        if not self._settled:
            self._events.put_nowait(text)

    def finish(self, reply: Reply) -> None:
        self._settle(reply, None)

    def fail(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, result: Reply | None, error: BaseException | None) -> None:
        # The first call settles the job (an early reply, then the batch's error, keeps the reply).
        if self._settled:
            return
        self._settled = True
        self._result, self._error = result, error
        self._events.put_nowait(_DONE)

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as they become final; ends when the reply is done."""
        while not self._drained:
            event = await self._events.get()
            if event is _DONE:
                self._drained = True
            else:
                yield event

    async def result(self) -> Reply:
        """The engine's Reply (raises the engine's error); drains any pieces not consumed."""
        async for _ in self.pieces():
            pass
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class Batcher:
    def __init__(self, engine: Engine, decoding: DecodingConfig, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 metrics: ServiceMetrics):
        self.engine, self.decoding = engine, decoding
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000.0
        self.metrics = metrics
        self._queue: asyncio.Queue[ReplyJob] = asyncio.Queue(maxsize=max_queue)
        # One thread: batches run one after another, each using all of torch's intra-op threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._idle_since = 0.0  # monotonic time the previous batch ended

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    def full(self) -> bool:
        return self._queue.full()

    def submit(self, context: list[str]) -> ReplyJob:
        """Queue one reply; raises Busy, BatcherClosed, or GenerationError for a context the engine
        would refuse (checked here so that one bad context cannot fail a whole batch)."""
        if self._closed:
            raise BatcherClosed("the service is shutting down")
        job = ReplyJob(check_contexts([context])[0])
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Busy(f"{self._queue.maxsize} replies are already waiting") from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return job

    async def _next_batch(self) -> list[ReplyJob]:
        batch = [await self._queue.get()]
        try:
            await self._fill(batch)
        except asyncio.CancelledError:  # closing: jobs taken off the queue must not be left hanging
            for job in batch:
                job.fail(BatcherClosed("the service is shutting down"))
            raise
        self.metrics.queue_depth.set(self._queue.qsize())
        return [job for job in batch if not job.abandoned]

    async def _fill(self, batch: list[ReplyJob]) -> None:
        # See the module docstring: from the first arrival, or from the end of the previous batch.
        deadline = max(batch[0].enqueued_at, self._idle_since) + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    batch.append(self._queue.get_nowait())
                else:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except (asyncio.QueueEmpty, TimeoutError):
                break

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.metrics.batch_size.observe(len(batch))
            start = time.perf_counter()
            # The worker reports results through the jobs itself; awaiting here keeps one batch at a time.
            await loop.run_in_executor(self._executor, self._generate, loop, batch)
            self.metrics.batch_seconds.observe(time.perf_counter() - start)
            self._idle_since = time.monotonic()

    def _generate(self, loop: asyncio.AbstractEventLoop, batch: list[ReplyJob]) -> None:
        """Runs in the worker thread: one batched call, then bisecting retries if it failed."""
        answered: set[int] = set()  # settled through on_reply
        streamed: set[int] = set()  # got at least one piece

        def on_piece(i: int, text: str) -> None:
            streamed.add(i)
            loop.call_soon_threadsafe(batch[i].add_piece, text)

        def on_reply(i: int, reply: Reply) -> None:
            answered.add(i)
            loop.call_soon_threadsafe(batch[i].finish, reply)

        try:
            replies = self.engine.reply([job.context for job in batch], self.decoding, on_piece=on_piece,
                                        on_reply=on_reply)
        except Exception as e:
            if len(batch) == 1:
                log.warning("generating a reply failed: %r", e)
                loop.call_soon_threadsafe(batch[0].fail, e)  # no-op when it was answered already
                return
            retry = []
            for i in range(len(batch)):
                if i in answered:
                    continue
                if i in streamed or batch[i].abandoned:
                    loop.call_soon_threadsafe(batch[i].fail, e)
                else:
                    retry.append(batch[i])
            log.warning("a batched generate of %d replies failed (%r); retrying %d of them in halves",
                        len(batch), e, len(retry))
            half = (len(retry) + 1) // 2
            for part in (retry[:half], retry[half:]):
                if part:
                    self._generate(loop, part)
            return
        for i, (job, reply) in enumerate(zip(batch, replies, strict=True)):
            if i not in answered:
                loop.call_soon_threadsafe(job.finish, reply)

    async def close(self) -> None:
        """Stop taking work, let a running batch finish, fail whatever is still queued."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        # A batch already in the worker thread completes (its results still reach their jobs).
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        while not self._queue.empty():
            self._queue.get_nowait().fail(BatcherClosed("the service is shutting down"))
        self.metrics.queue_depth.set(0)
