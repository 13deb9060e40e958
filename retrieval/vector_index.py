"""A FAISS index that speaks external int64 ids and keeps them stable on delete.

Index types (``resolve_factory``): ``flat`` (exact, the default), ``auto`` (exact below
``AUTO_EXACT_MAX`` vectors, IVF above), or any FAISS factory string for large corpora (``IVF4096,Flat``,
``IVF4096,PQ32``, ``HNSW32``, ``PQ48``, ...).  A factory that needs more training vectors than the corpus
has is scaled down (fewer IVF lists) or replaced by the exact index, with a warning: a small corpus
never hits FAISS's "nx >= k" training error.

Ids: flat and code-based indexes sit inside ``IndexIDMap2`` (whose ``remove_ids`` keeps the id map in
step with the shifted vectors); IVF indexes store ids in their lists natively.  HNSW graphs cannot
remove vectors, so a deleted id becomes a tombstone that searches skip (over-fetching to still return
k) until the index is rebuilt.  Vectors are L2-normalised and compared by inner product (cosine).

With ``faiss-gpu`` and a GPU present, IVF k-means training runs on the GPU(s); the index itself stays
on the CPU, where adds, deletes and single-query search are cheap.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

AUTO_EXACT_MAX = 100_000  # below this, exact search of a query takes about a millisecond: no reason to approximate
DEFAULT_NPROBE = 32  # IVF lists searched per query; chosen by bench/bench_knowledge.py ann (docs/benchmarks.md)
MIN_POINTS_PER_CENTROID = 39  # FAISS's own k-means guidance
TRAIN_POINTS_PER_LIST = 64  # IVF training sample per list


class IndexTypeError(ValueError):
    """An index type string FAISS cannot build."""


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def ivf_lists_for(n: int) -> int:
    """About 4 sqrt(n) lists, a power of two, at least 39 training points each."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    return max(1, min(nlist, n // MIN_POINTS_PER_CENTROID))


def resolve_factory(spec: str, n: int) -> str:
    """The FAISS factory string to build for ``spec`` and a corpus of ``n`` vectors (see the module docstring)."""
    spec = spec.strip()
    if spec.lower() in ("flat", "exact"):
        return "Flat"
    if spec.lower() == "auto":
        return "Flat" if n < AUTO_EXACT_MAX else f"IVF{ivf_lists_for(n)},Flat"
    ivf = re.match(r"^IVF(\d+)", spec)
    if ivf:
        wanted = int(ivf.group(1))
        fits = n // MIN_POINTS_PER_CENTROID
        if fits < 4:
            log.warning("index type %s needs %d training vectors; the corpus has %d: using the exact index",
                        spec, wanted * MIN_POINTS_PER_CENTROID, n)
            return "Flat"
        if wanted > fits:
            log.warning("index type %s: %d vectors train at most %d lists; using IVF%d", spec, n, fits, fits)
            spec = f"IVF{fits}" + spec[ivf.end():]
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", spec)
    if pq:
        nbits = int(pq.group(2) or 8)
        if n < MIN_POINTS_PER_CENTROID * 2 ** nbits:
            log.warning("index type %s needs about %d training vectors for its codebooks; the corpus has %d: "
                        "using the exact index", spec, MIN_POINTS_PER_CENTROID * 2 ** nbits, n)
            return "Flat"
    return spec


class VectorIndex:
    """FAISS plus external ids and tombstones.  Not thread-safe by itself: KnowledgeIndex holds the lock."""

    def __init__(self, index: faiss.Index, factory: str, nprobe: int = DEFAULT_NPROBE,
                 tombstones: set[int] | None = None):
        self.index, self.factory = index, factory
        self.tombstones: set[int] = tombstones or set()
        self.nprobe = nprobe
        ivf = self._ivf()
        if ivf is not None:
            ivf.nprobe = min(nprobe, ivf.nlist)

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def ntotal(self) -> int:
        """Vectors held, tombstones included."""
        return self.index.ntotal

    @property
    def removes_in_place(self) -> bool:
        return "HNSW" not in self.factory

    def _ivf(self) -> faiss.IndexIVF | None:
        try:
            return faiss.extract_index_ivf(self.index)
        except RuntimeError:
            return None

    @classmethod
    def create(cls, dim: int, spec: str, train_vectors: np.ndarray | None = None,
               nprobe: int = DEFAULT_NPROBE) -> "VectorIndex":
        n = 0 if train_vectors is None else len(train_vectors)
        factory = resolve_factory(spec, n)
        native_ids = factory.startswith("IVF")
        try:
            index = faiss.index_factory(dim, factory if native_ids else f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise IndexTypeError(f"FAISS cannot build index type {factory!r}: {str(e).splitlines()[-1][:200]}") from None
        if not index.is_trained:
            if n == 0:
                raise IndexTypeError(f"index type {factory!r} must be trained: build it from a corpus")
            ivf = faiss.extract_index_ivf(index) if native_ids else None
            if ivf is not None and gpu_available():
                log.info("training %s on %d GPU(s)", factory, faiss.get_num_gpus())
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))
            sample = train_vectors
            if ivf is not None and len(sample) > TRAIN_POINTS_PER_LIST * ivf.nlist:
                # k-means needs tens of points per list, not all of them: a random sample trains as well, faster
                pick = np.random.default_rng(0).choice(len(sample), TRAIN_POINTS_PER_LIST * ivf.nlist, replace=False)
                sample = sample[np.sort(pick)]
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        return cls(index, factory, nprobe)

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must be (n, {self.dim}), got {vectors.shape}")
        self.index.add_with_ids(vectors, np.asarray(keys, dtype=np.int64))

    def remove(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        if self.removes_in_place:
            self.index.remove_ids(keys)
        else:
            self.tombstones.update(int(k) for k in keys)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys) of shape (q, k); missing results have key -1.  Tombstoned keys never appear."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.ntotal == 0 or k <= 0:
            return np.zeros((len(queries), max(k, 0)), np.float32), np.full((len(queries), max(k, 0)), -1, np.int64)
        fetch = min(k + len(self.tombstones), self.ntotal)
        scores, keys = self.index.search(queries, fetch)
        if self.tombstones:
            out_s = np.full((len(queries), k), -np.inf, np.float32)
            out_k = np.full((len(queries), k), -1, np.int64)
            for q in range(len(queries)):
                kept = [(s, key) for s, key in zip(scores[q], keys[q]) if key >= 0 and int(key) not in self.tombstones][:k]
                for j, (s, key) in enumerate(kept):
                    out_s[q, j], out_k[q, j] = s, key
            return out_s, out_k
        if fetch < k:
            pad = k - fetch
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            keys = np.pad(keys, ((0, 0), (0, pad)), constant_values=-1)
        return scores, keys

    def stored_keys(self) -> np.ndarray | None:
        """Every id the index holds (flat / HNSW / PQ inside IDMap2); None for IVF (ids live in the lists)."""
        if isinstance(self.index, faiss.IndexIDMap2):
            return faiss.vector_to_array(self.index.id_map)
        return None

    def save(self, path: Path) -> None:
        """Written to a temporary name first: a crash leaves the previous file whole."""
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, factory: str, nprobe: int, valid_keys: set[int] | None = None) -> "VectorIndex":
        index = faiss.read_index(str(path))
        vi = cls(index, factory, nprobe)
        if not vi.removes_in_place and valid_keys is not None:
            stored = vi.stored_keys()
            vi.tombstones = {int(k) for k in stored if int(k) not in valid_keys}
        return vi
