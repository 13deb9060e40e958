"""Knowledge that changes while the service runs: a change log in Redis that every worker follows.

Design (docs/knowledge.md):

- **The log** is a Redis stream (``chatbot:knowledge:log``).  An entry is one whole change: "add these
  passages, with these vectors" or "delete this id".  The worker that takes an admin request splits and
  embeds the documents itself and puts the vectors in the entry, so no other worker embeds anything.
- **Every worker applies every entry, in log order, each whole or not at all** (one SQLite transaction
  plus the FAISS add or remove, under the index's lock): a search sees the index before or after a
  change, never half of it.  Applying is deterministic (an add whose id already exists is refused whole,
  by every worker alike), so workers that start from the same base and apply the same log agree.  The
  first worker to apply an entry records its outcome in ``chatbot:knowledge:outcomes``, where a CLI that
  wrote the entry reads it.
- **Visibility**: each worker blocks on ``XREAD`` for new entries, so a change reaches every worker
  within milliseconds of being written (the admin call returns once its own worker has applied it).
- **Restarts**: a worker starts from the newest snapshot on disk (``<data>/knowledge/snapshots/``: an
  index directory plus the log position it reflects), or else the base index, and replays the log
  after that position.  Workers write a snapshot after changes (at most every ``snapshot_every_s``)
  and on shutdown, so a start replays little.  The log is never trimmed: with a snapshot lost, the
  base plus the whole log rebuild the same state.  A log with a new epoch (Redis was flushed) makes
  snapshots of the old epoch void: the worker starts from the base and warns.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.documents import Document, Passage
from retrieval.embedder import Embedder
from retrieval.knowledge import DuplicateId, Hit, KnowledgeError, KnowledgeIndex, UnknownId

log = logging.getLogger(__name__)

PREFIX = "chatbot:knowledge:"
LOG_KEY, EPOCH_KEY, OUTCOMES_KEY = PREFIX + "log", PREFIX + "epoch", PREFIX + "outcomes"
FOLLOW_BLOCK_MS = 1000


def follow_block_ms(redis: Any) -> int:
    """How long one XREAD may block: FOLLOW_BLOCK_MS, but at most half the client's read timeout
    (the service bounds every command's answer), so an idle log never looks like an unreachable Redis."""
    pool = getattr(redis, "connection_pool", None)
    timeout = (getattr(pool, "connection_kwargs", None) or {}).get("socket_timeout")
    return FOLLOW_BLOCK_MS if not timeout else max(10, min(FOLLOW_BLOCK_MS, int(timeout * 500)))
KEEP_SNAPSHOTS = 2


class ChangeRefused(KnowledgeError):
    """A change was written to the log but refused when applied (e.g. a duplicate id that raced in)."""


def encode_vectors(vectors: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).decode()


def decode_vectors(data: str, n: int, dim: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype=np.float32).reshape(n, dim)


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def base_fingerprint(manifest: dict) -> str:
    """Names a base index: snapshots made on top of another base are not ours."""
    core = {k: manifest.get(k) for k in ("embedder", "index", "splitting", "created")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


class LiveKnowledge:
    """One worker's view of the deployment's knowledge: a private working copy that follows the log."""

    def __init__(self, redis: Any, base_dir: str | Path, embedder: Embedder, data_dir: str | Path, *,
                 snapshot_every_s: float = 30.0, worker: str | None = None):
        self.redis, self.base_dir, self.embedder = redis, Path(base_dir), embedder
        self.snapshot_root = Path(data_dir) / "knowledge" / "snapshots"
        self.snapshot_every_s = snapshot_every_s
        self.worker = worker or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.index: KnowledgeIndex | None = None
        self.position = "0-0"  # the last log entry applied
        self.epoch = ""
        self.base = ""
        self.applied = 0  # entries applied since start
        self._outcomes: dict[str, dict] = {}
        self._advanced = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._work_dir: Path | None = None
        self._snapshot_position = "0-0"
        self._last_snapshot = 0.0
        self._apply_lock = asyncio.Lock()

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.epoch = await self._ensure_epoch()
        base_manifest = KnowledgeIndex.read_manifest(self.base_dir)
        self.base = base_fingerprint(base_manifest)
        self._work_dir = Path(tempfile.mkdtemp(prefix="chatbot-knowledge-"))
        source, position = self._pick_snapshot()
        try:
            self.index = await asyncio.to_thread(KnowledgeIndex.open, source, self.embedder, copy_to=self._work_dir)
        except (KnowledgeError, OSError) as e:
            if source == self.base_dir:
                raise
            log.warning("snapshot %s unusable (%s); starting from the base index", source, e)
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir.mkdir(parents=True)
            self.index = await asyncio.to_thread(KnowledgeIndex.open, self.base_dir, self.embedder,
                                                 copy_to=self._work_dir)
            position = "0-0"
        self.position = self._snapshot_position = position
        self._last_snapshot = time.monotonic()
        await self.catch_up()
        log.info("knowledge: %d passages (from %s, log position %s, %d entries replayed)",
                 len(self.index), source.name, position, self.applied)
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="knowledge-follower")

    async def close(self, snapshot: bool = True) -> None:
        if self._task is not None:
            # Never cancel the follower inside XREAD BLOCK: redis-py's asyncio client can swallow that
            # cancellation and leave the task hanging (redis/redis-py#2579).  Ask it to stop; each XREAD
            # returns within follow_block_ms, so it ends by itself.  Cancelling is the last resort.
            self._stopping = True
            done, _ = await asyncio.wait({self._task}, timeout=follow_block_ms(self.redis) / 1000 + 5.0)
            if not done:
                log.warning("knowledge follower did not stop in time; cancelling it")
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
            self._task = None
        if self.index is not None:
            if snapshot:
                await self.maybe_snapshot(force=True)
            self.index.close()
            self.index = None
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)

    async def _ensure_epoch(self) -> str:
        await self.redis.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)
        epoch = await self.redis.get(EPOCH_KEY)
        return epoch.decode() if isinstance(epoch, bytes) else epoch

    # ------------------------------------------------------------------------------ snapshots

    def _snapshots(self) -> list[tuple[tuple[int, int], Path, dict]]:
        found = []
        if not self.snapshot_root.is_dir():
            return found
        for d in self.snapshot_root.iterdir():
            if d.name.startswith("."):  # being written
                continue
            try:
                live = KnowledgeIndex.read_manifest(d).get("live", {})
            except (OSError, ValueError):
                continue
            if live.get("epoch") == self.epoch and live.get("base") == self.base:
                found.append((entry_key(live["position"]), d, live))
        return sorted(found, key=lambda t: t[0], reverse=True)

    def _pick_snapshot(self) -> tuple[Path, str]:
        snapshots = self._snapshots()
        if snapshots:
            _, path, live = snapshots[0]
            return path, live["position"]
        if self.snapshot_root.is_dir() and any(self.snapshot_root.iterdir()):
            log.warning("knowledge snapshots in %s are from another log epoch or base index; starting from the base "
                        "and replaying the current log", self.snapshot_root)
        return self.base_dir, "0-0"

    def _write_snapshot(self) -> None:
        """Runs in a thread.  A snapshot is complete before it gets its final name."""
        assert self.index is not None
        position = self.position
        name = f"{self.epoch[:8]}-{position}"
        final = self.snapshot_root / name
        if final.exists():
            self._snapshot_position = position
            return
        tmp = self.snapshot_root / f".{name}.{self.worker.replace(':', '_')}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.index.save(tmp, extra={"live": {"epoch": self.epoch, "position": position, "base": self.base}})
        try:
            os.replace(tmp, final)
        except OSError:  # another worker wrote the same position first
            shutil.rmtree(tmp, ignore_errors=True)
        self._snapshot_position = position
        self._last_snapshot = time.monotonic()
        for _, old, _ in self._snapshots()[KEEP_SNAPSHOTS:]:
            shutil.rmtree(old, ignore_errors=True)

    async def maybe_snapshot(self, force: bool = False) -> None:
        due = time.monotonic() - self._last_snapshot >= self.snapshot_every_s
        if self.position != self._snapshot_position and (force or due):
            async with self._apply_lock:  # the snapshot's position must be exactly what it holds
                try:
                    await asyncio.to_thread(self._write_snapshot)
                except Exception:
                    log.exception("knowledge snapshot failed (the log still has every change)")

    # ------------------------------------------------------------------------------ following the log

    async def catch_up(self) -> None:
        """Apply every entry after our position (used at start; the follower does the same continuously)."""
        while True:
            entries = await self.redis.xrange(LOG_KEY, min=f"({self.position}", count=500)
            if not entries:
                return
            for entry_id, fields in entries:
                await self._apply(_text(entry_id), fields)

    async def _follow(self) -> None:
        while not self._stopping:
            try:
                response = await self.redis.xread({LOG_KEY: self.position}, block=follow_block_ms(self.redis), count=500)
                streams = response.items() if isinstance(response, dict) else (response or [])  # RESP3 / RESP2
                for _, entries in streams:
                    for entry_id, fields in entries:
                        await self._apply(_text(entry_id), fields)
                await self.maybe_snapshot()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis away: keep serving what we have, retry shortly
                if not self._stopping:
                    log.warning("knowledge log unreachable (%s); retrying", e)
                    await asyncio.sleep(0.5)

    async def _apply(self, entry_id: str, raw_fields: dict) -> None:
        async with self._apply_lock:
            if entry_key(entry_id) <= entry_key(self.position):
                return  # catch_up and the follower may both see an entry
            fields = {_text(k): _text(v) for k, v in raw_fields.items()}
            applying = asyncio.ensure_future(asyncio.to_thread(self._apply_sync, fields))
            try:
                outcome = await asyncio.shield(applying)
            except asyncio.CancelledError:
                # The thread finishes the change regardless; record it before giving up, so the
                # position always says exactly what the working copy holds.
                outcome = await applying
                self.position = entry_id
                raise
            self.position = entry_id
            self.applied += 1
            self._outcomes[entry_id] = outcome
            if len(self._outcomes) > 1000:
                self._outcomes.pop(next(iter(self._outcomes)))
        try:
            await self.redis.hsetnx(OUTCOMES_KEY, entry_id, json.dumps(outcome))
        except Exception as e:
            log.debug("could not record the outcome of %s: %s", entry_id, e)
        async with self._advanced:
            self._advanced.notify_all()

    def _apply_sync(self, fields: dict[str, str]) -> dict:
        assert self.index is not None
        op = fields.get("op")
        try:
            if fields.get("embedder") != self.embedder.identity["fingerprint"]:
                raise KnowledgeError(f"the entry was embedded by {fields.get('embedder')!r}, this worker uses "
                                     f"{self.embedder.identity['fingerprint']!r}")
            payload = json.loads(fields["payload"])
            if op == "add":
                passages = [Passage(**p) for p in payload["passages"]]
                vectors = decode_vectors(payload["vectors"], len(passages), self.embedder.dim)
                self.index.add_passages(passages, vectors)
                return {"ok": True, "added": [p.id for p in passages]}
            if op == "delete":
                return {"ok": True, "deleted": self.index.delete(payload["id"])}
            raise KnowledgeError(f"unknown operation {op!r}")
        except DuplicateId as e:
            return {"ok": False, "error": "duplicate_id", "message": str(e), "ids": e.ids}
        except UnknownId as e:
            return {"ok": False, "error": "unknown_id", "message": str(e)}
        except (KnowledgeError, ValueError, KeyError, TypeError) as e:
            log.error("knowledge log entry refused: %s", e)
            return {"ok": False, "error": "refused", "message": str(e)}

    # ------------------------------------------------------------------------------ changes

    async def _write(self, op: str, payload: dict) -> str:
        entry_id = await self.redis.xadd(LOG_KEY, {"op": op, "payload": json.dumps(payload),
                                                   "embedder": self.embedder.identity["fingerprint"],
                                                   "origin": self.worker})
        return _text(entry_id)

    async def wait_applied(self, entry_id: str, timeout_s: float = 30.0) -> dict:
        """The outcome of a log entry once this worker has applied it."""
        async def applied() -> None:
            async with self._advanced:
                await self._advanced.wait_for(lambda: entry_key(self.position) >= entry_key(entry_id))
        await asyncio.wait_for(applied(), timeout_s)
        return self._outcomes.get(entry_id) or {"ok": True}

    async def add_documents(self, documents: Iterable[Document], progress: bool = False) -> dict:
        """Split, embed and log documents; returns once this worker can retrieve them.  Raises
        DuplicateId (already present, or raced in by another writer) and DocumentError."""
        assert self.index is not None
        passages, vectors = await asyncio.to_thread(self.index.prepare, list(documents), progress)
        entry_id = await self._write("add", {"passages": [p.to_dict() for p in passages],
                                             "vectors": encode_vectors(vectors)})
        return _raise_refusal(await self.wait_applied(entry_id)) | {"entry": entry_id}

    async def delete(self, ident: str) -> dict:
        assert self.index is not None
        if not await asyncio.to_thread(self._known, ident):
            raise UnknownId(ident)
        entry_id = await self._write("delete", {"id": ident})
        return _raise_refusal(await self.wait_applied(entry_id)) | {"entry": entry_id}

    def _known(self, ident: str) -> bool:
        assert self.index is not None
        with self.index._lock:
            return bool(self.index.store.keys_of(ident))

    async def search(self, query: str, k: int = 5) -> list[Hit]:
        assert self.index is not None
        return await asyncio.to_thread(self.index.search, query, k)


def _raise_refusal(outcome: dict) -> dict:
    if outcome.get("ok"):
        return outcome
    if outcome.get("error") == "duplicate_id":
        raise DuplicateId(outcome.get("ids") or [])
    if outcome.get("error") == "unknown_id":
        raise ChangeRefused(outcome.get("message", "unknown id"))
    raise ChangeRefused(outcome.get("message", "the change was refused"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
