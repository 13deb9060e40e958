"""Conversation sessions in Redis: full history with a sliding TTL, idempotent appends.

Keys of one session (the braces make them one Redis Cluster hash slot):

    chat:{SID}:meta   hash   created_at; its existence is what makes SID a session
    chat:{SID}:turns  list   JSON turns, oldest first
    chat:{SID}:ids    hash   "u:<message_id>" / "b:<message_id>" -> index of that user turn / its reply
    chat:{SID}:gen:<message_id>  string  a claim: the attempt generating that reply (expires by itself)

Appends run as Lua scripts, so check-then-append is atomic: the same client message id appended twice
(a retry after a lost acknowledgement, or two workers racing) lands once, and the second caller gets
the stored turn back.  Every append and every resume refreshes the TTL of the first three keys.

Claims: the user append also claims the generation of its reply when no reply is stored and nobody
holds the claim.  Only the holder generates (and streams); another attempt at the same message (the
client retried on another worker while the first was still generating) waits for the stored reply
instead, so it is sent without pieces, and a client never sees pieces of a reply that then loses the
race to be stored.  A holder that fails releases the claim; a claim whose holder died, or whose
setting command timed out before the caller heard of it, expires within ``claim_ttl_s``: holders
renew their claim while they generate, so the TTL can be short.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError, ConnectionError, ReadOnlyError, TimeoutError

from chatbot.model_input import MAX_CONTEXT_TURNS

# Errors that mean "Redis is not reachable right now", as opposed to a bug in a command.
UNAVAILABLE_ERRORS = (ConnectionError, TimeoutError, BusyLoadingError, ReadOnlyError, OSError)


class StoreUnavailable(RuntimeError):
    """Redis could not be reached; retry later."""


class UnknownSession(LookupError):
    """No such session: never created, or expired."""


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "bot"
    text: str
    message_id: str  # the client's id of the user message (a bot turn: the message it answers)
    created_at: float
    reply_id: str | None = None  # bot turns only
    sources: list[dict[str, Any]] | None = None  # bot turns only (a list, maybe empty)
    latency_ms: float | None = None  # bot turns only: message received -> reply generated

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Turn:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class UserAppend:
    index: int  # position of the user turn in the history
    created: bool  # False: this message id was already stored (a retry)
    context: list[str]  # the last MAX_CONTEXT_TURNS turn texts up to and including this one
    reply: Turn | None  # the stored reply, when a retry comes after the reply was already stored
    claimed: bool  # no reply is stored and this caller now holds the claim to generate it


@dataclass(frozen=True)
class ReplyState:
    reply: Turn | None  # the stored reply, if there is one yet
    claimed: bool  # no reply yet, and the claim was free: this caller holds it now


# KEYS: meta, turns, ids, claim.  ARGV: message_id, turn JSON, ttl seconds, context turns, claim token,
# claim ttl ms.  Returns {-1} for an unknown session, else
# {created (0/1), index, reply JSON or false, claimed (0/1), context...}.
_APPEND_USER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local created = 0
local idx = redis.call('HGET', KEYS[3], 'u:' .. ARGV[1])
if idx then
  idx = tonumber(idx)
else
  idx = redis.call('RPUSH', KEYS[2], ARGV[2]) - 1
  redis.call('HSET', KEYS[3], 'u:' .. ARGV[1], idx)
  created = 1
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
local reply = false
local ridx = redis.call('HGET', KEYS[3], 'b:' .. ARGV[1])
if ridx then reply = redis.call('LINDEX', KEYS[2], ridx) end
local claimed = 0
if not reply and redis.call('SET', KEYS[4], ARGV[5], 'NX', 'PX', ARGV[6]) then claimed = 1 end
local first = idx - tonumber(ARGV[4]) + 1
if first < 0 then first = 0 end
local out = {created, idx, reply, claimed}
for _, t in ipairs(redis.call('LRANGE', KEYS[2], first, idx)) do out[#out + 1] = t end
return out
"""

# KEYS: meta, turns, ids, claim.  ARGV: message_id, turn JSON, ttl seconds.
# Returns {-1} unknown session, {-2} no such user message, else {created, reply JSON as stored}.
_APPEND_REPLY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if redis.call('HEXISTS', KEYS[3], 'u:' .. ARGV[1]) == 0 then return {-2} end
local ridx = redis.call('HGET', KEYS[3], 'b:' .. ARGV[1])
if ridx then return {0, redis.call('LINDEX', KEYS[2], ridx)} end
ridx = redis.call('RPUSH', KEYS[2], ARGV[2]) - 1
redis.call('HSET', KEYS[3], 'b:' .. ARGV[1], ridx)
redis.call('DEL', KEYS[4])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return {1, ARGV[2]}
"""

# KEYS: meta, turns, ids, claim.  ARGV: message_id, claim token, claim ttl ms.
# Returns {-1} unknown session, {1, reply JSON} when the reply is stored, else {0, claimed (0/1)}.
_REPLY_STATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local ridx = redis.call('HGET', KEYS[3], 'b:' .. ARGV[1])
if ridx then return {1, redis.call('LINDEX', KEYS[2], ridx)} end
if redis.call('SET', KEYS[4], ARGV[2], 'NX', 'PX', ARGV[3]) then return {0, 1} end
return {0, 0}
"""

# KEYS: claim.  ARGV: claim token.  Deletes the claim only if this token still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: claim.  ARGV: claim token, claim ttl ms.  Extends the claim only if this token still holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: meta, turns, ids.  ARGV: ttl seconds.  Returns 0 for an unknown session, else 1 (TTL refreshed).
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, 3 do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ARGV[1]) end
end
return 1
"""


def new_session_id() -> str:
    """160 random bits from the OS CSPRNG, as 40 hex digits (the format protocol.SESSION_ID_RE checks)."""
    return secrets.token_hex(20)


class SessionStore:
    def __init__(self, redis: aioredis.Redis, ttl_s: int, claim_ttl_s: float = 5.0):
        self.redis, self.ttl_s = redis, ttl_s
        self.claim_ttl_s, self.claim_ttl_ms = claim_ttl_s, int(claim_ttl_s * 1000)
        # Script objects run EVALSHA and reload the script after a Redis restart flushed its cache.
        self._append_user = redis.register_script(_APPEND_USER)
        self._append_reply = redis.register_script(_APPEND_REPLY)
        self._reply_state = redis.register_script(_REPLY_STATE)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)
        self._touch = redis.register_script(_TOUCH)

    @staticmethod
    def _keys(session_id: str) -> list[str]:
        return [f"chat:{{{session_id}}}:meta", f"chat:{{{session_id}}}:turns", f"chat:{{{session_id}}}:ids"]

    @staticmethod
    def _claim_key(session_id: str, message_id: str) -> str:
        return f"chat:{{{session_id}}}:gen:{message_id}"

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except UNAVAILABLE_ERRORS as e:
            raise StoreUnavailable(f"session store unreachable: {e}") from e

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except UNAVAILABLE_ERRORS:
            return False

    async def create(self) -> str:
        meta = self._keys(session_id := new_session_id())[0]
        created = await self._call(self.redis.set(meta, "1", nx=True, ex=self.ttl_s))
        if not created:  # 2**-160 odds; refuse rather than hand out someone else's session
            raise RuntimeError("session id collision")
        return session_id

    async def resume(self, session_id: str) -> list[Turn]:
        """Refresh the session's TTL and return its full history; ``UnknownSession`` if it is gone."""
        keys = self._keys(session_id)
        if not await self._call(self._touch(keys=keys, args=[self.ttl_s])):
            raise UnknownSession(session_id)
        return await self.history(session_id)

    async def history(self, session_id: str) -> list[Turn]:
        raw = await self._call(self.redis.lrange(self._keys(session_id)[1], 0, -1))
        return [Turn.from_json(t) for t in raw]

    async def append_user(self, session_id: str, message_id: str, text: str, claim_token: str = "") -> UserAppend:
        """Store the user turn once and, when its reply is still to be made, try to claim making it."""
        turn = Turn("user", text, message_id, time.time())
        keys = [*self._keys(session_id), self._claim_key(session_id, message_id)]
        out = await self._call(self._append_user(
            keys=keys, args=[message_id, turn.to_json(), self.ttl_s, MAX_CONTEXT_TURNS, claim_token or "-",
                             self.claim_ttl_ms]))
        if out[0] == -1:
            raise UnknownSession(session_id)
        created, index, reply, claimed, *context = out
        return UserAppend(int(index), bool(created), [Turn.from_json(t).text for t in context],
                          Turn.from_json(reply) if reply else None, bool(claimed))

    async def reply_state(self, session_id: str, message_id: str, claim_token: str) -> ReplyState:
        """The stored reply to a message, or else the claim to generate it if nobody holds it."""
        keys = [*self._keys(session_id), self._claim_key(session_id, message_id)]
        out = await self._call(self._reply_state(keys=keys, args=[message_id, claim_token, self.claim_ttl_ms]))
        if out[0] == -1:
            raise UnknownSession(session_id)
        if out[0] == 1:
            return ReplyState(Turn.from_json(out[1]), False)
        return ReplyState(None, bool(out[1]))

    async def release_claim(self, session_id: str, message_id: str, claim_token: str) -> None:
        await self._call(self._release(keys=[self._claim_key(session_id, message_id)], args=[claim_token]))

    async def renew_claim(self, session_id: str, message_id: str, claim_token: str) -> bool:
        """Extend a claim this token holds by claim_ttl_s; False if it no longer holds it."""
        key = self._claim_key(session_id, message_id)
        return bool(await self._call(self._renew(keys=[key], args=[claim_token, self.claim_ttl_ms])))

    async def append_reply(self, session_id: str, reply: Turn) -> tuple[Turn, bool]:
        """Store the reply to ``reply.message_id`` once; returns the stored reply and whether it is new.

        When another worker stored a reply to the same message first, that one is returned: the client
        is then shown what the history holds.
        """
        keys = [*self._keys(session_id), self._claim_key(session_id, reply.message_id)]
        out = await self._call(self._append_reply(keys=keys, args=[reply.message_id, reply.to_json(), self.ttl_s]))
        if out[0] == -1:
            raise UnknownSession(session_id)
        if out[0] == -2:
            raise LookupError(f"session {session_id} has no user message {reply.message_id!r}")
        return Turn.from_json(out[1]), bool(out[0])


class StoreHealth:
    """A background ping of the store every ``interval_s``, so /readyz answers at once from the last
    result instead of waiting out a hung Redis.  A result older than a few intervals counts as down
    (the checker itself is stuck)."""

    def __init__(self, store: SessionStore, interval_s: float):
        self.store, self.interval_s = store, interval_s
        self.ok, self.checked_at = False, float("-inf")  # monotonic time of the last completed check
        self._task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self.ok and time.monotonic() - self.checked_at < 3 * self.interval_s + 1.0

    async def check(self) -> bool:
        self.ok, self.checked_at = await self.store.ping(), time.monotonic()
        return self.ok

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="store-health")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
