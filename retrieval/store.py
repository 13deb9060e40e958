"""The durable passage store: SQLite, one row per passage, keyed by the int64 id FAISS holds.

The integer ``key`` is the id map between FAISS (which speaks int64) and passage ids (strings).  Keys
come from an AUTOINCREMENT column, so a deleted passage's key is never given to another passage: a
stale FAISS hit can never resolve to the wrong text.  One connection, serialised by the caller's lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from retrieval.documents import Passage

SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL,
    text TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    url TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    added REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_doc ON passages(doc_id);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""
_COLUMNS = "key, id, doc_id, text, title, url, source, added"


def _passage(row: tuple) -> tuple[int, Passage]:
    key, pid, doc_id, text, title, url, source, added = row
    return key, Passage(pid, doc_id, text, title, url, source, added)


class PassageStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        # The caller serialises access (KnowledgeIndex's lock), so one connection may cross threads.
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        # A rollback journal, not WAL: one connection needs no concurrent readers, and a database at rest
        # is then one file that opens read-only anywhere (a snapshot, a read-only base directory).
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- transactions: explicit, so a batch of passages goes in (or out) whole

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    # -- reads

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    def count_documents(self) -> int:
        return self.db.execute("SELECT COUNT(DISTINCT doc_id) FROM passages").fetchone()[0]

    def existing_ids(self, ids: Iterable[str]) -> list[str]:
        ids = list(ids)
        found: list[str] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = self.db.execute(f"SELECT id FROM passages WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            found.extend(r[0] for r in rows)
        return found

    def existing_documents(self, doc_ids: Iterable[str]) -> list[str]:
        doc_ids = list(doc_ids)
        found: list[str] = []
        for start in range(0, len(doc_ids), 500):
            chunk = doc_ids[start:start + 500]
            rows = self.db.execute(f"SELECT DISTINCT doc_id FROM passages WHERE doc_id IN ({','.join('?' * len(chunk))})",
                                   chunk)
            found.extend(r[0] for r in rows)
        return found

    def by_keys(self, keys: Sequence[int]) -> dict[int, Passage]:
        keys = [int(k) for k in keys]
        if not keys:
            return {}
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM passages WHERE key IN ({','.join('?' * len(keys))})", keys)
        return dict(_passage(r) for r in rows)

    def keys_of(self, ident: str) -> list[tuple[int, str]]:
        """(key, passage id) of a passage id, or of every passage of a document id."""
        rows = self.db.execute("SELECT key, id FROM passages WHERE id = ? OR doc_id = ? ORDER BY key", (ident, ident))
        return [(k, pid) for k, pid in rows]

    def get(self, passage_id: str) -> Passage | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM passages WHERE id = ?", (passage_id,)).fetchone()
        return _passage(row)[1] if row else None

    def all_keys(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT key FROM passages ORDER BY key")]

    def iter_passages(self) -> Iterable[tuple[int, Passage]]:
        for row in self.db.execute(f"SELECT {_COLUMNS} FROM passages ORDER BY key"):
            yield _passage(row)

    # -- writes (inside begin/commit)

    def insert(self, passages: Sequence[Passage]) -> list[int]:
        """Insert passages; returns their keys in order.  Raises sqlite3.IntegrityError on a duplicate id."""
        keys = []
        for p in passages:
            cur = self.db.execute("INSERT INTO passages (id, doc_id, text, title, url, source, added) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?)", (p.id, p.doc_id, p.text, p.title, p.url, p.source, p.added))
            keys.append(cur.lastrowid)
        return keys

    def delete_keys(self, keys: Sequence[int]) -> None:
        self.db.executemany("DELETE FROM passages WHERE key = ?", [(int(k),) for k in keys])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    def backup_to(self, path: str | Path) -> None:
        """A consistent copy of the whole database (SQLite's online backup)."""
        target = sqlite3.connect(str(path))
        try:
            self.db.backup(target)
        finally:
            target.close()
