"""A knowledge index: passages (SQLite) + their vectors (FAISS) + a manifest, as one directory.

    DIR/manifest.json     what this is: embedder identity and dimension, index type, counts, splitting
    DIR/index.faiss       the vectors under their int64 keys
    DIR/passages.sqlite   the passages and the key <-> passage id map

Opening a directory checks the manifest against the files and the embedder, and refuses a mismatch
with a message that says how to rebuild.  Every change (a batch of passages in, a document out) is
applied whole under one lock, so a concurrent search sees the index before or after it, never between.
A directory opened ``autosave=True`` (the CLI) writes itself after each change; the service keeps its
working copy in memory and its durability in the Redis change log (``retrieval.live``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.documents import OVERLAP_WORDS, WORDS_PER_PASSAGE, Document, DocumentError, Passage, split_documents
from retrieval.embedder import Embedder, identity_mismatch
from retrieval.store import PassageStore
from retrieval.vector_index import DEFAULT_NPROBE, VectorIndex

log = logging.getLogger(__name__)

FORMAT = "chatbot-knowledge-index"
FORMAT_VERSION = 1
MANIFEST, INDEX_FILE, PASSAGES_FILE = "manifest.json", "index.faiss", "passages.sqlite"
MAX_K = 100


class KnowledgeError(ValueError):
    """Base of the knowledge index's typed errors."""


class IndexMismatch(KnowledgeError):
    """The directory's files disagree with each other or with the embedder; the message says how to rebuild."""


class DuplicateId(KnowledgeError):
    def __init__(self, ids: Sequence[str]):
        shown = ", ".join(repr(i) for i in list(ids)[:5]) + (" ..." if len(ids) > 5 else "")
        super().__init__(f"already in the index: {shown}; delete it first to replace it")
        self.ids = list(ids)


class UnknownId(KnowledgeError):
    def __init__(self, ident: str):
        super().__init__(f"no passage or document with id {ident!r} in the index")
        self.id = ident


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # cosine similarity of query and passage, -1..1

    @property
    def id(self) -> str:
        return self.passage.id

    @property
    def title(self) -> str:
        return self.passage.title

    @property
    def text(self) -> str:
        return self.passage.text

    def source(self) -> dict:
        """The protocol's ``sources`` entry."""
        out = {"id": self.passage.id, "title": self.passage.title, "score": round(self.score, 4)}
        if self.passage.url:
            out["url"] = self.passage.url
        return out


def rebuild_hint(directory: Path) -> str:
    return (f"rebuild it: `chatbot index build --source SOURCE --out {directory}` "
            "(with the --embedder the service uses), or point --index at a matching directory")


class KnowledgeIndex:
    def __init__(self, directory: Path, store: PassageStore, vectors: VectorIndex, embedder: Embedder,
                 manifest: dict, autosave: bool):
        self.directory, self.store, self.vectors, self.embedder = directory, store, vectors, embedder
        self.manifest, self.autosave = manifest, autosave
        self._lock = threading.Lock()
        self.version = 0  # bumped by every change; readers use it to notice one

    # ------------------------------------------------------------------------------ create / open

    @classmethod
    def build(cls, directory: str | Path, documents: Iterable[Document], embedder: Embedder, *,
              index_type: str = "flat", words: int = WORDS_PER_PASSAGE, overlap: int = OVERLAP_WORDS,
              nprobe: int = DEFAULT_NPROBE, progress: bool = False, vectors: np.ndarray | None = None,
              added: float | None = None) -> "KnowledgeIndex":
        """Split, embed and index ``documents`` into a new directory (refused if it holds an index).
        ``vectors``: precomputed embeddings of the passages, in order (the shipped default KB)."""
        directory = Path(directory)
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise KnowledgeError(f"{directory} exists and is not empty; choose another --out or delete it first")
        passages = split_documents(documents, words, overlap, added)
        if not passages:
            raise DocumentError("no documents to index")
        if vectors is None:
            vectors = embedder.embed([p.embedding_text() for p in passages], progress=progress, desc="embedding")
        elif vectors.shape != (len(passages), embedder.dim):
            raise IndexMismatch(f"precomputed vectors are {vectors.shape}, expected ({len(passages)}, {embedder.dim})")
        index = VectorIndex.create(embedder.dim, index_type, vectors, nprobe)
        tmp = directory.with_name(directory.name + f".building{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        store = PassageStore(tmp / PASSAGES_FILE)
        store.begin()
        keys = store.insert(passages)
        store.commit()
        index.add(vectors, np.asarray(keys))
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "embedder": embedder.identity,
            "index": {"requested": index_type, "factory": index.factory, "metric": "inner_product", "nprobe": nprobe},
            "splitting": {"words": words, "overlap": overlap}, "created": time.time(),
        }
        kb = cls(tmp, store, index, embedder, manifest, autosave=True)
        kb.save()
        store.close()
        directory.parent.mkdir(parents=True, exist_ok=True)
        if directory.exists():
            directory.rmdir()  # only an empty directory (rmdir refuses anything else)
        os.replace(tmp, directory)
        return cls.open(directory, embedder)

    @classmethod
    def read_manifest(cls, directory: str | Path) -> dict:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{directory}: no knowledge index here (no {MANIFEST}); "
                                    f"build one with `chatbot index build --source wiki --out {directory}`")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise IndexMismatch(f"{path}: not valid JSON ({e.msg}); {rebuild_hint(directory)}") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise IndexMismatch(f"{directory}: index format {manifest.get('format')!r} v{manifest.get('version')} "
                                f"is not {FORMAT!r} v{FORMAT_VERSION}; {rebuild_hint(directory)}")
        return manifest

    @classmethod
    def open(cls, directory: str | Path, embedder: Embedder, *, copy_to: str | Path | None = None) -> "KnowledgeIndex":
        """Open and verify an index directory.  ``copy_to``: work on a private copy of the passages in
        that directory, held in memory otherwise (nothing is written back to ``directory``)."""
        directory = Path(directory)
        manifest = cls.read_manifest(directory)
        problem = identity_mismatch(manifest.get("embedder", {}), embedder.identity)
        if problem:
            raise IndexMismatch(f"{directory} was built with embedder {manifest['embedder'].get('name')!r} "
                                f"({problem}); queries embedded by {embedder.name!r} would not match its vectors: "
                                + rebuild_hint(directory))
        for name in (INDEX_FILE, PASSAGES_FILE):
            if not (directory / name).exists():
                raise IndexMismatch(f"{directory}: {name} is missing; {rebuild_hint(directory)}")
        if copy_to is not None:
            copy_to = Path(copy_to)
            copy_to.mkdir(parents=True, exist_ok=True)
            src = sqlite3.connect(f"file:{directory / PASSAGES_FILE}?mode=ro", uri=True)
            dst = sqlite3.connect(str(copy_to / PASSAGES_FILE))
            src.backup(dst)
            src.close()
            dst.close()
            store = PassageStore(copy_to / PASSAGES_FILE)
        else:
            store = PassageStore(directory / PASSAGES_FILE)
        info = manifest["index"]
        try:
            vectors = VectorIndex.load(directory / INDEX_FILE, info["factory"], info.get("nprobe", DEFAULT_NPROBE),
                                       valid_keys=set(store.all_keys()) if "HNSW" in info["factory"] else None)
        except RuntimeError as e:
            store.close()
            raise IndexMismatch(f"{directory / INDEX_FILE}: FAISS cannot read it ({str(e).splitlines()[-1][:120]}); "
                                + rebuild_hint(directory)) from None
        counts = manifest.get("counts", {})
        actual = {"passages": len(store), "vectors": vectors.ntotal, "dim": vectors.dim}
        expected = {"passages": counts.get("passages"), "vectors": counts.get("vectors"),
                    "dim": manifest["embedder"].get("dim")}
        if actual != expected or vectors.ntotal - len(vectors.tombstones) != actual["passages"]:
            store.close()
            raise IndexMismatch(f"{directory}: the files disagree (manifest says {expected}, found {actual}): "
                                "they were changed separately or a write was interrupted; " + rebuild_hint(directory))
        return cls(directory if copy_to is None else Path(copy_to), store, vectors, embedder, manifest,
                   autosave=copy_to is None)

    def close(self) -> None:
        with self._lock:
            self.store.close()

    # ------------------------------------------------------------------------------ persistence

    def _counts(self) -> dict:
        return {"passages": len(self.store), "documents": self.store.count_documents(), "vectors": self.vectors.ntotal}

    def save(self, directory: str | Path | None = None, extra: dict | None = None) -> Path:
        """Write the index and manifest (and, to another directory, a copy of the passages)."""
        with self._lock:
            return self._save_locked(Path(directory) if directory else self.directory, extra)

    def _save_locked(self, directory: Path, extra: dict | None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        if directory != self.directory:
            self.store.backup_to(directory / PASSAGES_FILE)
        self.vectors.save(directory / INDEX_FILE)
        manifest = dict(self.manifest, counts=self._counts(), updated=time.time(), **(extra or {}))
        tmp = directory / (MANIFEST + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, directory / MANIFEST)
        if directory == self.directory:
            self.manifest = manifest
        return directory

    # ------------------------------------------------------------------------------ changes

    def __len__(self) -> int:
        with self._lock:
            return len(self.store)

    def prepare(self, documents: Iterable[Document], progress: bool = False,
                added: float | None = None) -> tuple[list[Passage], np.ndarray]:
        """Split and embed documents (no lock held: embedding is the slow part)."""
        split = self.manifest.get("splitting", {})
        passages = split_documents(documents, split.get("words", WORDS_PER_PASSAGE),
                                   split.get("overlap", OVERLAP_WORDS), added)
        if not passages:
            raise DocumentError("no documents given")
        with self._lock:
            taken = self.store.existing_documents({p.doc_id for p in passages})
        if taken:
            raise DuplicateId(taken)
        return passages, self.embedder.embed([p.embedding_text() for p in passages], progress=progress)

    def add_documents(self, documents: Iterable[Document], progress: bool = False) -> list[Passage]:
        passages, vectors = self.prepare(documents, progress)
        self.add_passages(passages, vectors)
        return passages

    def add_passages(self, passages: Sequence[Passage], vectors: np.ndarray) -> None:
        """Add all of them or none: a duplicate id (passage or document) refuses the whole batch."""
        if len(passages) != len(vectors) or (len(vectors) and vectors.shape[1] != self.vectors.dim):
            raise KnowledgeError(f"{len(passages)} passages but vectors of shape {vectors.shape}")
        with self._lock:
            dup = self.store.existing_ids([p.id for p in passages]) + self.store.existing_documents(
                {p.doc_id for p in passages})
            if dup:
                raise DuplicateId(sorted(set(dup)))
            with self._change():
                try:
                    keys = self.store.insert(passages)
                except sqlite3.IntegrityError as e:
                    raise DuplicateId([p.id for p in passages]) from e
                self.vectors.add(vectors, np.asarray(keys))

    @contextmanager
    def _change(self) -> Iterator[None]:
        """One change, whole or not at all: the passage store's transaction and the FAISS edit inside it
        (a failure rolls the store back), then the version bump and the autosave.  Call under the lock."""
        self.store.begin()
        try:
            yield
        except BaseException:
            self.store.rollback()
            raise
        self.store.commit()
        self.version += 1
        if self.autosave:
            self._save_locked(self.directory, None)

    def delete(self, ident: str) -> list[str]:
        """Delete a passage, or every passage of a document; returns the passage ids removed."""
        with self._lock:
            found = self.store.keys_of(ident)
            if not found:
                raise UnknownId(ident)
            keys = np.asarray([k for k, _ in found], dtype=np.int64)
            with self._change():
                self.store.delete_keys(keys)
                self.vectors.remove(keys)
            return [pid for _, pid in found]

    # ------------------------------------------------------------------------------ search

    def get(self, passage_id: str) -> Passage | None:
        with self._lock:
            return self.store.get(passage_id)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        if not isinstance(query, str) or not query.strip():
            raise KnowledgeError("the query is empty")
        return self.search_vectors(self.embedder.embed([query]), k)[0]

    def search_many(self, queries: Sequence[str], k: int = 5) -> list[list[Hit]]:
        return self.search_vectors(self.embedder.embed(list(queries)), k) if queries else []

    def search_vectors(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        if not 1 <= k <= MAX_K:
            raise KnowledgeError(f"k must be in 1..{MAX_K}, got {k}")
        with self._lock:
            scores, keys = self.vectors.search(queries, k)
            found = self.store.by_keys(sorted({int(x) for x in keys.ravel() if x >= 0}))
        return [[Hit(found[int(key)], float(s)) for s, key in zip(row_s, row_k) if int(key) in found]
                for row_s, row_k in zip(scores, keys)]
