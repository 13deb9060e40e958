"""The knowledge index at scale, simulated on this machine with faiss-cpu: IVF-PQ over synthetic
sentence-embedding-like vectors (384 dimensions, unit length, inner product: the shape of the
knowledge engineer's all-MiniLM-L6-v2 vectors), measured against exact search.

Per corpus size: build time (k-means training, adding), bytes per vector of the index (its serialized
size / n, against 4 x dim for exact float32), recall@10 against exact search and queries/s at several
nprobe values, batched and one query at a time.  docs/deploy.md extrapolates these to 100M+ passages.

Synthetic vectors are clustered (a mixture of Gaussians around random centres) because uniformly
random vectors have no neighbourhood structure, which makes any IVF index look worse than on real
text embeddings; `--vectors FILE.npy` measures on real embeddings instead.  Vectors are generated in
chunks from per-chunk seeds, so the exact ground truth is computed chunk by chunk and the corpus never
has to be held uncompressed at once.

    python -m bench.bench_index_scale --sizes 100000,300000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm import tqdm

from bench.common import header, write_json

CHUNK = 100_000
K = 10


class Corpus:
    """A reproducible stream of unit vectors: synthetic, or the rows of a .npy file.

    Synthetic vectors mimic text embeddings' low intrinsic dimension: a mixture of Gaussians in a
    ``latent``-dimensional space (``clusters`` topics), mapped linearly into ``dim`` dimensions, plus a
    little full-dimensional noise, then normalised.  (Isotropic noise in all 384 dimensions instead
    makes every point nearly equidistant from every other, a worst case no text corpus looks like.)"""

    def __init__(self, n: int, dim: int, seed: int = 0, vectors: str | None = None, clusters: int = 1000,
                 latent: int = 32, spread: float = 0.5, noise: float = 0.2):
        self.n, self.dim, self.seed = n, dim, seed
        self.file = np.load(vectors, mmap_mode="r") if vectors else None
        if self.file is not None:
            if len(self.file) < n:
                raise ValueError(f"{vectors} holds {len(self.file)} vectors, fewer than {n}")
            self.dim = self.file.shape[1]
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((clusters, latent), dtype=np.float32)
        self.mixing = rng.standard_normal((latent, self.dim), dtype=np.float32) / np.sqrt(latent)
        self.spread, self.noise = spread, noise

    def _draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        z = self.centres[rng.integers(0, len(self.centres), count)]
        z = z + self.spread * rng.standard_normal(z.shape, dtype=np.float32)
        x = z @ self.mixing
        x += rng.standard_normal(x.shape, dtype=np.float32) * (self.noise * np.sqrt((x * x).mean()))
        return unit(x)

    def chunk(self, i: int) -> np.ndarray:
        lo, hi = i * CHUNK, min((i + 1) * CHUNK, self.n)
        if self.file is not None:
            return unit(np.asarray(self.file[lo:hi], dtype=np.float32))
        return self._draw(np.random.default_rng([self.seed, 1, i]), hi - lo)

    @property
    def chunks(self) -> int:
        return (self.n + CHUNK - 1) // CHUNK

    def queries(self, count: int) -> np.ndarray:
        """Fresh draws from the same distribution (or held-out rows of the file): not in the corpus."""
        if self.file is not None:
            rows = self.file[self.n:self.n + count]
            if len(rows) < count:
                raise ValueError("--vectors needs --queries rows beyond the largest size for queries")
            return unit(np.asarray(rows, dtype=np.float32))
        return self._draw(np.random.default_rng([self.seed, 2]), count)

    def sample(self, count: int) -> np.ndarray:
        """Training vectors for k-means and PQ: spread over the whole corpus."""
        per = -(-count // self.chunks)
        parts = [self.chunk(i)[:per] for i in range(self.chunks)]
        return np.ascontiguousarray(np.concatenate(parts)[:count])


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def exact_top_k(corpus: Corpus, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact top-K ids by inner product, chunk by chunk; and the seconds it took."""
    import faiss

    best_d = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), K), -1, dtype=np.int64)
    seconds = 0.0
    for c in tqdm(range(corpus.chunks), desc="exact", leave=False):
        x = corpus.chunk(c)
        start = time.perf_counter()
        flat = faiss.IndexFlatIP(corpus.dim)
        flat.add(x)
        d, i = flat.search(queries, K)
        d_all, i_all = np.concatenate([best_d, d], 1), np.concatenate([best_i, i + c * CHUNK], 1)
        order = np.argsort(-d_all, axis=1)[:, :K]
        best_d, best_i = np.take_along_axis(d_all, order, 1), np.take_along_axis(i_all, order, 1)
        seconds += time.perf_counter() - start
    return best_i, seconds


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))


def measure_size(n: int, args: argparse.Namespace) -> dict:
    import faiss

    corpus = Corpus(n, args.dim, seed=args.seed, vectors=args.vectors)
    nlist = args.nlist or 2 ** round(np.log2(4 * np.sqrt(n)))
    factory = f"IVF{nlist},PQ{args.pq_m}"
    queries = corpus.queries(args.queries)
    truth, exact_s = exact_top_k(corpus, queries)

    index = faiss.index_factory(corpus.dim, factory, faiss.METRIC_INNER_PRODUCT)
    train_n = min(n, max(args.train_per_list * nlist, 20_000))  # PQ codebooks need >= 39 x 256
    start = time.perf_counter()
    index.train(corpus.sample(train_n))
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    for c in tqdm(range(corpus.chunks), desc=f"add {factory}", leave=False):
        index.add(corpus.chunk(c))
    add_s = time.perf_counter() - start
    index_bytes = len(faiss.serialize_index(index))

    rows = []
    for nprobe in args.nprobes:
        faiss.extract_index_ivf(index).nprobe = nprobe
        index.search(queries[:10], K)  # warm-up
        start = time.perf_counter()
        _, found = index.search(queries, K)
        batch_s = time.perf_counter() - start
        singles = queries[:args.single_queries]
        start = time.perf_counter()
        for q in singles:
            index.search(q[None], K)
        single_s = time.perf_counter() - start
        rows.append({"nprobe": nprobe, "recall_at_10": recall_at_k(found, truth),
                     "queries_per_s_batched": len(queries) / batch_s,
                     "ms_per_query_single": 1000 * single_s / len(singles)})
    return {"n": n, "dim": corpus.dim, "factory": factory, "train_vectors": train_n, "train_s": train_s, "add_s": add_s,
            "index_bytes": index_bytes, "bytes_per_vector": index_bytes / n, "exact_bytes_per_vector": 4 * corpus.dim,
            "exact_queries_per_s": len(queries) / exact_s, "search": rows}


def main(argv: list[str] | None = None) -> dict:
    import faiss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,300000", help="comma-separated corpus sizes")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--pq-m", type=int, default=48, help="PQ sub-quantizers: bytes of code per vector")
    p.add_argument("--nlist", type=int, help="IVF lists (default: about 4 sqrt(n), a power of two)")
    p.add_argument("--train-per-list", type=int, default=40, help="k-means training vectors per IVF list")
    p.add_argument("--nprobes", default="8,32,128", help="comma-separated IVF lists searched per query")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single-queries", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--threads", type=int, default=1,
                   help="faiss OpenMP threads (default 1: on a shared machine more threads spin against each other)")
    p.add_argument("--vectors", help="a .npy of real embeddings instead of synthetic vectors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    args.nprobes = [int(x) for x in args.nprobes.split(",")]
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    result = {**header(), "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
              "data": args.vectors or "synthetic clustered unit vectors", "sizes": []}
    print(f"| n | index | train s | add s | bytes/vector (exact) | exact q/s | nprobe | recall@10 | q/s batched | ms/query single |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        r = measure_size(n, args)
        result["sizes"].append(r)
        for s in r["search"]:
            print(f"| {n:,} | {r['factory']} | {r['train_s']:.1f} | {r['add_s']:.1f} | "
                  f"{r['bytes_per_vector']:.1f} ({r['exact_bytes_per_vector']}) | {r['exact_queries_per_s']:.0f} | "
                  f"{s['nprobe']} | {s['recall_at_10']:.3f} | {s['queries_per_s_batched']:.0f} | "
                  f"{s['ms_per_query_single']:.2f} |", flush=True)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
