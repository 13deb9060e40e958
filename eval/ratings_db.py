"""The rating form's storage: one SQLite file in WAL mode with ``synchronous=FULL``.

Every state change is one transaction that is committed (and so fsynced to the WAL) before the caller
answers the rater, so an acknowledged answer survives the process being killed right after.
One connection, used only from the event loop's thread: transactions never interleave.

Tokens: a rater's token is ``<rater id>.<secret>``; only sha256(secret) is stored, and it is compared
with ``hmac.compare_digest`` (a wrong id is compared against a dummy hash, so timing says nothing).
Sign-in sessions are stored the same way (sha256 of the cookie value) with their CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from eval.itemset import Item, RatingSet, SetError, item_id
from eval.ratings import Rating

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (id TEXT PRIMARY KEY, name TEXT NOT NULL, token_hash BLOB NOT NULL,
                                   created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (sid_hash BLOB PRIMARY KEY, role TEXT NOT NULL, rater_id TEXT,
                                     csrf TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sets (name TEXT PRIMARY KEY, kind TEXT NOT NULL, meta TEXT NOT NULL, loaded REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, set_name TEXT NOT NULL, system TEXT NOT NULL,
                                  context TEXT NOT NULL, response TEXT NOT NULL,
                                  exclude_rater TEXT, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (rater_id TEXT PRIMARY KEY, item_id TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS assignments_item ON assignments (item_id);
CREATE TABLE IF NOT EXISTS answers (seq INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL,
                                    rater_id TEXT NOT NULL, sensible INTEGER NOT NULL, specific INTEGER NOT NULL,
                                    created REAL NOT NULL, UNIQUE (item_id, rater_id));
CREATE INDEX IF NOT EXISTS answers_rater ON answers (rater_id);
CREATE TABLE IF NOT EXISTS chats (id TEXT PRIMARY KEY, rater_id TEXT NOT NULL, system TEXT NOT NULL,
                                  turns INTEGER NOT NULL, history TEXT NOT NULL, status TEXT NOT NULL,
                                  created REAL NOT NULL);
"""
INTERACTIVE_SET = "interactive"
_DUMMY_HASH = hashlib.sha256(b"no such rater").digest()


class RatingError(ValueError):
    """A request the rating state refuses; ``code`` is the machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Session:
    role: str  # "rater" or "admin"
    rater_id: str | None
    csrf: str


@dataclass(frozen=True)
class Chat:
    id: str
    rater_id: str
    system: str
    turns: int  # the conversation ends once it holds this many turns (both sides)
    history: list[str]
    status: str  # "open" or "done"

    def to_dict(self) -> dict:
        return {"id": self.id, "system": self.system, "turns": self.turns, "history": self.history,
                "status": self.status}


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class RatingsDB:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode}); use a local file system")
        self.conn.execute("PRAGMA synchronous=FULL")  # in WAL mode: every commit is fsynced before it returns
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(SCHEMA)
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path}: database schema {version}, this version reads {SCHEMA_VERSION}")
        self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    def _tx(self):
        return _Transaction(self.conn)

    # ----------------------------------------------------------------- admin token, raters, sessions

    def set_admin_token(self, token: str) -> None:
        with self._tx():
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('admin_token_hash', ?)", (_hash(token).hex(),))

    def has_admin_token(self) -> bool:
        return self.conn.execute("SELECT 1 FROM meta WHERE key='admin_token_hash'").fetchone() is not None

    def is_admin_token(self, token: str) -> bool:
        row = self.conn.execute("SELECT value FROM meta WHERE key='admin_token_hash'").fetchone()
        stored = bytes.fromhex(row[0]) if row else _DUMMY_HASH
        return hmac.compare_digest(_hash(token), stored) and row is not None

    def create_rater(self, name: str) -> tuple[str, str]:
        """A new rater; returns (id, token).  The token is shown once and never stored."""
        name = name.strip()
        if not name or len(name) > 100:
            raise RatingError("bad_request", "a rater name is 1 to 100 characters")
        rater_id = "r" + secrets.token_hex(4)
        secret = secrets.token_urlsafe(24)
        with self._tx():
            self.conn.execute("INSERT INTO raters VALUES (?, ?, ?, ?)", (rater_id, name, _hash(secret), time.time()))
        return rater_id, f"{rater_id}.{secret}"

    def rater_for_token(self, token: str) -> str | None:
        rater_id, _, secret = token.partition(".")
        row = self.conn.execute("SELECT token_hash FROM raters WHERE id=?", (rater_id,)).fetchone()
        ok = hmac.compare_digest(_hash(secret), row[0] if row else _DUMMY_HASH)
        return rater_id if ok and row is not None else None

    def create_session(self, role: str, rater_id: str | None, max_age_s: float | None = None) -> tuple[str, str]:
        """Returns (cookie value, CSRF token).  Sessions older than ``max_age_s`` are deleted on the way."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._tx():
            if max_age_s is not None:
                self.conn.execute("DELETE FROM sessions WHERE created < ?", (time.time() - max_age_s,))
            self.conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)", (_hash(sid), role, rater_id, csrf, time.time()))
        return sid, csrf

    def session(self, sid: str, max_age_s: float | None = None) -> Session | None:
        """The signed-in session of this cookie value; None if unknown or older than ``max_age_s``."""
        row = self.conn.execute("SELECT role, rater_id, csrf, created FROM sessions WHERE sid_hash=?",
                                (_hash(sid),)).fetchone()
        if row is None or (max_age_s is not None and row[3] < time.time() - max_age_s):
            return None
        return Session(*row[:3])

    def delete_session(self, sid: str) -> None:
        with self._tx():
            self.conn.execute("DELETE FROM sessions WHERE sid_hash=?", (_hash(sid),))

    # ----------------------------------------------------------------------------------- sets, items

    def load_set(self, rating_set: RatingSet, exclude_rater: str | None = None) -> int:
        """Add a set's items; returns how many were new.  Loading the same set again adds nothing;
        an item id that exists with different content is refused (the whole set is then not loaded)."""
        with self._tx():
            return self._insert_set(rating_set, exclude_rater)

    def _insert_set(self, rating_set: RatingSet, exclude_rater: str | None) -> int:
        now, added = time.time(), 0
        self.conn.execute("INSERT OR IGNORE INTO sets VALUES (?, ?, ?, ?)",
                          (rating_set.name, rating_set.kind,
                           json.dumps({"systems": rating_set.systems, "decoding": rating_set.decoding}), now))
        for item in rating_set.items:
            row = self.conn.execute("SELECT system, context, response FROM items WHERE id=?", (item.id,)).fetchone()
            context = json.dumps(list(item.context), ensure_ascii=False)
            if row is None:
                self.conn.execute("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  (item.id, rating_set.name, item.system, context, item.response, exclude_rater, now))
                added += 1
            elif tuple(row) != (item.system, context, item.response):
                raise SetError(f"set {rating_set.name!r}: item {item.id!r} is already loaded with other content")
        return added

    def item(self, iid: str) -> Item:
        row = self.conn.execute("SELECT id, system, context, response FROM items WHERE id=?", (iid,)).fetchone()
        return Item(row["id"], row["system"], tuple(json.loads(row["context"])), row["response"])

    # ------------------------------------------------------------------------------ rating protocol

    def _available(self, rater_id: str, k: int, lease_s: float, now: float) -> list[sqlite3.Row]:
        """Items this rater may still get: not authored, not answered by them, fewer than k answers
        plus live assignments of others."""
        return self.conn.execute(
            """SELECT i.id,
                      (SELECT COUNT(*) FROM answers a WHERE a.item_id = i.id)
                    + (SELECT COUNT(*) FROM assignments s WHERE s.item_id = i.id AND s.rater_id <> ? AND s.created > ?)
                      AS taken
               FROM items i
               WHERE (i.exclude_rater IS NULL OR i.exclude_rater <> ?)
                 AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.item_id = i.id AND a.rater_id = ?)
                 AND taken < ?""",
            (rater_id, now - lease_s, rater_id, rater_id, k)).fetchall()

    def current_item(self, rater_id: str, k: int, lease_s: float = 3600.0) -> Item | None:
        """The rater's one open item: the one assigned already, else a new assignment (items closest to
        k answers first, so items complete early; ties in an order of the rater's own)."""
        row = self.conn.execute("SELECT item_id FROM assignments WHERE rater_id=?", (rater_id,)).fetchone()
        if row:
            return self.item(row[0])
        now = time.time()
        with self._tx():
            candidates = self._available(rater_id, k, lease_s, now)
            if not candidates:
                return None
            best = min(candidates, key=lambda r: (-r["taken"], hashlib.sha256(f"{rater_id}:{r['id']}".encode()).digest()))
            self.conn.execute("INSERT INTO assignments VALUES (?, ?, ?)", (rater_id, best["id"], now))
        return self.item(best["id"])

    def progress(self, rater_id: str, k: int, lease_s: float = 3600.0) -> dict:
        done = self.conn.execute("SELECT COUNT(*) FROM answers WHERE rater_id=?", (rater_id,)).fetchone()[0]
        remaining = len(self._available(rater_id, k, lease_s, time.time()))
        return {"done": done, "total": done + remaining}

    def answer(self, rater_id: str, iid: str, sensible: bool, specific: bool) -> None:
        """Record the rater's answer to their open item, durably; raises RatingError otherwise."""
        specific = bool(sensible and specific)
        with self._tx():
            if self.conn.execute("SELECT 1 FROM answers WHERE rater_id=? AND item_id=?", (rater_id, iid)).fetchone():
                raise RatingError("already_answered", "this item already has your answer (undo it to change it)")
            row = self.conn.execute("SELECT item_id FROM assignments WHERE rater_id=?", (rater_id,)).fetchone()
            if row is None or row[0] != iid:
                raise RatingError("not_assigned", "this item is not the one assigned to you; reload for your current item")
            self.conn.execute("INSERT INTO answers (item_id, rater_id, sensible, specific, created) VALUES (?, ?, ?, ?, ?)",
                              (iid, rater_id, int(sensible), int(specific), time.time()))
            self.conn.execute("DELETE FROM assignments WHERE rater_id=?", (rater_id,))

    def has_answers(self, rater_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM answers WHERE rater_id=? LIMIT 1", (rater_id,)).fetchone() is not None

    def undo(self, rater_id: str) -> str:
        """Withdraw the rater's latest answer; that item becomes their open item again."""
        with self._tx():
            row = self.conn.execute("SELECT seq, item_id FROM answers WHERE rater_id=? ORDER BY seq DESC LIMIT 1",
                                    (rater_id,)).fetchone()
            if row is None:
                raise RatingError("nothing_to_undo", "you have no answer to undo")
            self.conn.execute("DELETE FROM answers WHERE seq=?", (row["seq"],))
            self.conn.execute("INSERT OR REPLACE INTO assignments VALUES (?, ?, ?)", (rater_id, row["item_id"], time.time()))
        return row["item_id"]

    # ------------------------------------------------------------------------------ interactive chats

    def create_chat(self, rater_id: str, system: str, turns: int) -> str:
        if not self.conn.execute("SELECT 1 FROM raters WHERE id=?", (rater_id,)).fetchone():
            raise RatingError("bad_request", f"no rater {rater_id!r}")
        chat_id = "c" + secrets.token_hex(6)
        with self._tx():
            if self.conn.execute("SELECT 1 FROM chats WHERE rater_id=? AND status='open'", (rater_id,)).fetchone():
                raise RatingError("conflict", f"rater {rater_id} already has an open interactive session")
            self.conn.execute("INSERT INTO chats VALUES (?, ?, ?, ?, '[]', 'open', ?)",
                              (chat_id, rater_id, system, turns, time.time()))
        return chat_id

    def _chat(self, row) -> Chat | None:
        return Chat(row["id"], row["rater_id"], row["system"], row["turns"], json.loads(row["history"]),
                    row["status"]) if row else None

    def open_chat(self, rater_id: str) -> Chat | None:
        return self._chat(self.conn.execute("SELECT * FROM chats WHERE rater_id=? AND status='open'", (rater_id,)).fetchone())

    def chats(self) -> list[Chat]:
        return [self._chat(r) for r in self.conn.execute("SELECT * FROM chats ORDER BY created")]

    def extend_chat(self, chat: Chat, user_text: str, bot_text: str) -> Chat:
        """Append a user turn and the bot's reply; a conversation that reaches its length is finished:
        each bot turn becomes an item (context: the conversation before it), never shown to its author."""
        history = [*chat.history, user_text, bot_text]
        done = len(history) >= chat.turns
        with self._tx():  # the last turn and the items it releases land together
            self.conn.execute("UPDATE chats SET history=?, status=? WHERE id=?",
                              (json.dumps(history, ensure_ascii=False), "done" if done else "open", chat.id))
            if done:
                items = [Item(item_id(INTERACTIVE_SET, chat.id, t), chat.system, tuple(history[:t]), history[t])
                         for t in range(1, len(history), 2)]
                self._insert_set(RatingSet(INTERACTIVE_SET, "interactive", items, {}, None), chat.rater_id)
        return Chat(chat.id, chat.rater_id, chat.system, chat.turns, history, "done" if done else "open")

    # --------------------------------------------------------------------------------- admin views

    def ratings(self) -> list[Rating]:
        rows = self.conn.execute("""SELECT i.system, a.item_id, a.rater_id, a.sensible, a.specific
                                    FROM answers a JOIN items i ON i.id = a.item_id ORDER BY a.seq""")
        return [Rating(r[0], r[1], r[2], bool(r[3]), bool(r[4])) for r in rows]

    def system_models(self) -> dict[str, str]:
        """Systems that are models, from the loaded sets: name -> model directory."""
        out = {}
        for (meta,) in self.conn.execute("SELECT meta FROM sets ORDER BY loaded"):
            for name, info in (json.loads(meta).get("systems") or {}).items():
                if info.get("kind") == "model" and info.get("model"):
                    out[name] = info["model"]
        return out

    def status(self, k: int) -> dict:
        systems = [dict(r) for r in self.conn.execute(
            """SELECT i.system, COUNT(*) AS items, SUM(n) AS answers, SUM(n >= ?) AS complete FROM
               (SELECT i.id, i.system, (SELECT COUNT(*) FROM answers a WHERE a.item_id = i.id) AS n FROM items i) i
               GROUP BY i.system ORDER BY i.system""", (k,))]
        raters = [dict(r) for r in self.conn.execute(
            """SELECT r.id, r.name, (SELECT COUNT(*) FROM answers a WHERE a.rater_id = r.id) AS answers
               FROM raters r ORDER BY r.created""")]
        sets = [dict(r) for r in self.conn.execute(
            "SELECT s.name, s.kind, (SELECT COUNT(*) FROM items i WHERE i.set_name = s.name) AS items FROM sets s ORDER BY s.loaded")]
        return {"raters_per_item": k, "systems": systems, "raters": raters, "sets": sets,
                "chats": [{"rater_id": c.rater_id, **c.to_dict()} for c in self.chats()]}


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception): one writer, durable on exit."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
