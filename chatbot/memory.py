"""The conversations as memory, part 1: a kNN-LM datastore over the training split and its interpolation.

kNN-LM (Khandelwal et al., 2020): run the model teacher-forced over the training responses and store,
for every response token, the decoder's final state before it (the vector the output projection reads)
as the key and the token as the value.  At each decoding step the current state's k nearest keys
(squared L2) vote for their tokens:

    p_knn(y) = sum over neighbours j with value y of softmax_j(-d_j / temperature)
    p(y)     = lambda * p_knn(y) + (1 - lambda) * p_model(y)

A datastore directory holds

    manifest.json   the model it belongs to (sha256 of its weights file and of its config), the
                    tokenizer fingerprint, the source and split ("train", always), key type, counts,
                    build time, and the tuned lambda / temperature / k once ``chatbot memory tune`` ran
    keys.npy        float16 (n, d) keys  (key type ``fp16``: exact search)
    keys.faiss      an IVF-PQ FAISS index of the keys (key type ``ivfpq``: compact, approximate)
    values.npy      int32 (n,) next token per key
    pointers.npy    int32 (n, 2): (example, token position); example -> (conversation, turn) below
    examples.npy    int64 (m, 4): (response turn, first context turn, conversation, the response's turn
                    number in its conversation) per example used, turns numbered as in tokens.bin
    conversations.json  the training conversation ids, in the order ``examples.npy`` numbers them
    tokens.bin, turn_offsets.npy   the tokenized training turns, so explanations can show the text

A datastore is tied to its model: ``Datastore.load`` refuses one built by another model (or another
version of the same directory) and says how to rebuild it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from chatbot.data import ExampleStore, conversations, prepare_splits, split_of
from chatbot.decoding import StepView
from chatbot.modeldir import CONFIG, WEIGHTS, LoadedModel, load_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEY_TYPES = ("fp16", "ivfpq")
MANIFEST = "manifest.json"
# Until `chatbot memory tune` records better ones (its grid, on the validation split, is in docs/memory.md).
DEFAULT_K, DEFAULT_LAMBDA, DEFAULT_TEMPERATURE = 16, 0.25, 10.0
DEFAULT_NPROBE = 16


class DatastoreError(ValueError):
    """A datastore that cannot be built or used as asked; the message says what to do."""


class DatastoreMismatch(DatastoreError):
    """The datastore was built by another model."""


def model_identity(directory: str | Path) -> dict:
    """What ties a datastore to a model: hashes of its weights file and its config."""
    directory = Path(directory)
    return {"weights_sha256": _file_sha256(directory / WEIGHTS), "config_sha256": _file_sha256(directory / CONFIG)}


# ----------------------------------------------------------------------------------------- build


def conversation_of_turns(source: str, store: ExampleStore) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(training conversation ids, conversation of each stored turn, turn's index in its conversation).

    The tokenized split does not keep ids, so they are re-read from the source in the order the split
    was written; the turn counts must add up to the split's, or the cache is stale."""
    ids, lengths = [], []
    for conv in conversations(source):
        if split_of(conv.id) == "train":
            ids.append(conv.id)
            lengths.append(len(conv.turns))
    if sum(lengths) != len(store.offsets) - 1:
        raise DatastoreError(f"{source}: its training split has {sum(lengths)} turns, the tokenized cache "
                             f"{store.dir} {len(store.offsets) - 1}; delete the cache and rebuild")
    conv_of_turn = np.repeat(np.arange(len(ids), dtype=np.int64), lengths)
    starts = np.repeat(np.cumsum([0] + lengths[:-1]), lengths)
    return ids, conv_of_turn, np.arange(len(conv_of_turn)) - starts


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def examples_to_use(n: int, max_examples: int | None, fraction: float | None,
                    error: type[ValueError] | None = None) -> int:
    """How many of the first examples in storage order (whole conversations, sorted by id) to use: a
    reproducible subset.  Bad flags raise ``error`` (default DatastoreError)."""
    error = error or DatastoreError
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise error(f"--fraction must be in (0, 1], got {fraction}")
        n = math.ceil(n * fraction)
    if max_examples is not None:
        if max_examples < 1:
            raise error(f"--max-examples must be >= 1, got {max_examples}")
        n = min(n, max_examples)
    return n


def _publish(tmp: Path, out: Path, manifest: dict) -> dict:
    """Write the manifest (with the directory's sizes) last, then move the finished directory into place."""
    manifest.update(directory_sizes(tmp))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


@torch.inference_mode()
def build_datastore(model_dir: str | Path | None, out: str | Path, data: str = "chitchat", key_type: str = "fp16",
                    max_examples: int | None = None, fraction: float | None = None, batch_tokens: int = 4096,
                    ivf_lists: int | None = None, pq_m: int = 32, pq_bits: int = 8, progress: bool = True) -> dict:
    """Build a datastore of ``model_dir`` (None: the shipped model) over the training split of ``data``."""
    if key_type not in KEY_TYPES:
        raise DatastoreError(f"--keys must be one of {', '.join(KEY_TYPES)}, got {key_type!r}")
    t_start = time.perf_counter()
    loaded = load_model(model_dir)
    model, cfg = loaded.model, loaded.model.config
    if cfg.direction != "forward":
        raise DatastoreError("a datastore needs a forward (reply-writing) model")
    split_dir = prepare_splits(data, loaded.tokenizer, ["train"])["train"]
    store = ExampleStore(split_dir, cfg.max_source_len, cfg.max_target_len)
    if store.meta.get("split") != "train":
        raise DatastoreError(f"{split_dir} is not a training split")
    conv_ids, conv_of_turn, turn_in_conv = conversation_of_turns(data, store)
    n_examples = examples_to_use(len(store), max_examples, fraction)
    n_keys = int(store.target_lengths[:n_examples].sum())

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    keys = np.lib.format.open_memmap(tmp / "keys.npy", mode="w+", dtype=np.float16, shape=(n_keys, cfg.d_model))
    values = np.empty(n_keys, dtype=np.int32)
    pointers = np.empty((n_keys, 2), dtype=np.int32)
    batches = store.batches(batch_tokens)
    if n_examples < len(store):
        batches = [b for b in (batch[batch < n_examples] for batch in batches) if len(b)]
    filled = 0
    t_model = time.perf_counter()
    with tqdm(total=n_keys, desc="memory build", unit=" tok", disable=None if progress else True) as bar:
        for idx in batches:
            batch = store.collate(idx)
            hidden = model.decode_hidden(batch.tgt_in, model.encode(batch.src))  # (B, T, d)
            real = batch.tgt_out.ne(cfg.pad_id)
            n = int(real.sum())
            keys[filled:filled + n] = hidden[real].numpy().astype(np.float16)
            values[filled:filled + n] = batch.tgt_out[real].numpy()
            example = torch.as_tensor(idx)[:, None].expand_as(real)[real]
            position = torch.arange(real.shape[1])[None, :].expand_as(real)[real]
            pointers[filled:filled + n] = torch.stack([example, position], 1).numpy()
            filled += n
            bar.update(n)
    model_s = time.perf_counter() - t_model
    assert filled == n_keys, (filled, n_keys)
    keys.flush()
    np.save(tmp / "values.npy", values)
    np.save(tmp / "pointers.npy", pointers)
    used = store.examples[:n_examples]
    np.save(tmp / "examples.npy", np.concatenate([used, conv_of_turn[used[:, :1]], turn_in_conv[used[:, :1]]],
                                                 axis=1).astype(np.int64))
    (tmp / "conversations.json").write_text(json.dumps(conv_ids))
    shutil.copyfile(split_dir / "tokens.bin", tmp / "tokens.bin")
    np.save(tmp / "turn_offsets.npy", store.offsets)

    index_info: dict = {}
    if key_type == "ivfpq":
        index_info = build_ivfpq(tmp, keys, ivf_lists, pq_m, pq_bits)
        del keys
        (tmp / "keys.npy").unlink()
    else:
        del keys
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": {"directory": str(loaded.directory), **model_identity(loaded.directory)},
        "tokenizer": loaded.tokenizer.fingerprint(), "token_dtype": store.meta["dtype"],
        "source": data, "split": "train",
        "key_type": key_type, **index_info,
        "dim": cfg.d_model, "keys": n_keys, "examples": n_examples, "examples_in_split": len(store),
        "conversations": len(set(conv_of_turn[used[:, 0]].tolist())), "conversations_in_split": len(conv_ids),
        "build_s": round(time.perf_counter() - t_start, 1), "model_pass_s": round(model_s, 1),
        "tokens_per_s": round(n_keys / max(model_s, 1e-9), 1),
        "tuned": None,
    }
    return _publish(tmp, out, manifest)


def directory_sizes(directory: Path) -> dict:
    """bytes: the whole datastore; key_bytes: the keys alone (keys.npy or keys.faiss)."""
    files = {f.name: f.stat().st_size for f in directory.iterdir() if f.name != MANIFEST}
    return {"bytes": sum(files.values()), "key_bytes": files.get("keys.npy", files.get("keys.faiss", 0))}


def build_ivfpq(directory: Path, keys: np.ndarray, ivf_lists: int | None, pq_m: int, pq_bits: int = 8) -> dict:
    """Train an IVF-PQ index on a sample of the keys and add them all, in chunks (keys stay on disk)."""
    from retrieval.vector_index import ivf_lists_for, resolve_factory

    n, d = keys.shape
    if d % pq_m:
        raise DatastoreError(f"--pq-m {pq_m} must divide the key dimension {d}")
    factory = resolve_factory(f"IVF{ivf_lists or ivf_lists_for(n)},PQ{pq_m}x{pq_bits}", n)
    index = faiss.index_factory(d, factory, faiss.METRIC_L2)
    # k-means wants tens of points per list, PQ's codebooks 2^bits x tens: a sample covering both.
    lists = faiss.extract_index_ivf(index).nlist if factory.startswith("IVF") else 1
    wanted = max(64 * lists, 64 * 2 ** pq_bits)
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, wanted), replace=False))
    index.train(np.ascontiguousarray(keys[sample], dtype=np.float32))
    for start in range(0, n, 65536):
        index.add(np.ascontiguousarray(keys[start:start + 65536], dtype=np.float32))
    faiss.write_index(index, str(directory / "keys.faiss"))
    return {"factory": factory}


def compress_datastore(src: str | Path, out: str | Path, ivf_lists: int | None = None, pq_m: int = 32,
                       pq_bits: int = 8) -> dict:
    """An IVF-PQ copy of an fp16 datastore (same values, pointers, model tie and tuning), without
    running the model again: the keys are read back from ``keys.npy``."""
    src, out = Path(src), Path(out)
    manifest = json.loads((src / MANIFEST).read_text())
    if manifest.get("key_type") != "fp16":
        raise DatastoreError(f"{src}: only an fp16 datastore can be compressed (this one is {manifest.get('key_type')})")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("keys.npy", "tuning.json"))
    t0 = time.perf_counter()
    info = build_ivfpq(tmp, np.load(src / "keys.npy", mmap_mode="r"), ivf_lists, pq_m, pq_bits)
    manifest.update(key_type="ivfpq", **info, compress_s=round(time.perf_counter() - t0, 1), tuned=None)
    return _publish(tmp, out, manifest)


# ----------------------------------------------------------------------------------------- load, search


@dataclass
class Neighbour:
    """One stored state near a query: where it came from in the training data."""

    distance: float
    token: int
    conversation_id: str
    turn: int  # the response's turn in its conversation (0-based)
    example: int
    position: int  # token position in that response


class Datastore:
    def __init__(self, directory: Path, manifest: dict, index: faiss.Index, values: np.ndarray, pointers: np.ndarray,
                 examples: np.ndarray, conversation_ids: list[str]):
        self.directory, self.manifest, self.index = directory, manifest, index
        self.values, self.pointers, self.examples = values, pointers, examples
        self.conversation_ids = conversation_ids
        self._tokens: np.ndarray | None = None
        self._offsets: np.ndarray | None = None

    @classmethod
    def load(cls, directory: str | Path, model: LoadedModel, nprobe: int = DEFAULT_NPROBE) -> "Datastore":
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise DatastoreError(f"{directory}: not a datastore (no {MANIFEST}); build one with "
                                 f"`chatbot memory build --model {model.directory} --out {directory}`")
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DatastoreError(f"{directory}: datastore format {manifest.get('format_version')} != {FORMAT_VERSION}; "
                                 f"rebuild: chatbot memory build --model {model.directory} --out {directory}")
        recorded = manifest["model"]
        actual = model_identity(model.directory)
        if any(recorded.get(k) != v for k, v in actual.items()):
            raise DatastoreMismatch(
                f"{directory} was built by another model ({recorded.get('directory')}, weights "
                f"{recorded.get('weights_sha256', '?')[:12]}), not by {model.directory} (weights "
                f"{actual['weights_sha256'][:12]}): its keys are that model's states and mean nothing to this one. "
                f"Rebuild it for this model: chatbot memory build --model {model.directory} --out {directory}")
        if manifest["split"] != "train":
            raise DatastoreError(f"{directory}: built over split {manifest['split']!r}; only training data may be retrieved")
        if manifest["key_type"] == "ivfpq":
            index = faiss.read_index(str(directory / "keys.faiss"))
            if manifest.get("factory", "").startswith("IVF"):  # a small corpus may have fallen back to Flat
                faiss.extract_index_ivf(index).nprobe = nprobe
        else:
            keys = np.load(directory / "keys.npy", mmap_mode="r")
            index = faiss.IndexFlatL2(keys.shape[1])  # fp32 in memory: BLAS search, several times faster than SQfp16
            for start in range(0, len(keys), 65536):
                index.add(np.ascontiguousarray(keys[start:start + 65536], dtype=np.float32))
        return cls(directory, manifest, index, np.load(directory / "values.npy"), np.load(directory / "pointers.npy"),
                   np.load(directory / "examples.npy"), json.loads((directory / "conversations.json").read_text()))

    def __len__(self) -> int:
        return len(self.values)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, key rows) of shape (q, k); a missing neighbour has row -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(queries, min(k, len(self)))

    def neighbours(self, query: np.ndarray, k: int) -> list[Neighbour]:
        distances, rows = self.search(query[None, :], k)
        out = []
        for d, r in zip(distances[0].tolist(), rows[0].tolist()):
            if r < 0:
                continue
            example, position = (int(v) for v in self.pointers[r])
            _, _, conv, turn = (int(v) for v in self.examples[example])
            out.append(Neighbour(d, int(self.values[r]), self.conversation_ids[conv], turn, example, position))
        return out

    def example_texts(self, example: int, tokenizer) -> tuple[list[str], str]:
        """(context turns, reply) of a stored example, as text."""
        if self._tokens is None:
            self._offsets = np.load(self.directory / "turn_offsets.npy")
            self._tokens = np.memmap(self.directory / "tokens.bin", dtype=self.manifest["token_dtype"], mode="r")
        response_turn, first = (int(v) for v in self.examples[example][:2])
        text = lambda t: tokenizer.decode(self._tokens[self._offsets[t]:self._offsets[t + 1]].tolist())  # noqa: E731
        return [text(t) for t in range(first, response_turn)], text(response_turn)

    def tuned(self) -> dict:
        """The interpolation settings ``chatbot memory tune`` chose (else the defaults)."""
        tuned = self.manifest.get("tuned") or {}
        return {"k": tuned.get("k", DEFAULT_K), "lambda": tuned.get("lambda", DEFAULT_LAMBDA),
                "temperature": tuned.get("temperature", DEFAULT_TEMPERATURE)}


# ----------------------------------------------------------------------------------------- the maths


def knn_log_probs(distances: Tensor, tokens: Tensor, vocab_size: int, temperature: float) -> Tensor:
    """log p_knn (R, V) from each row's neighbours: squared distances (R, k) and their tokens (R, k),
    a token < 0 marking a missing neighbour.  p_knn(y) = sum of softmax(-d / temperature) over the
    neighbours whose token is y; a row without neighbours gets -inf everywhere."""
    present = tokens.ge(0)
    weights = (-distances.float() / temperature).masked_fill(~present, float("-inf")).softmax(-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # a row with no neighbour at all
    probs = torch.zeros(tokens.shape[0], vocab_size, dtype=torch.float32, device=distances.device)
    probs.scatter_add_(1, tokens.clamp_min(0).long(), weights * present)
    return probs.log()


def interpolate(model_logprobs: Tensor, knn_logprobs: Tensor, lam: float) -> Tensor:
    """log(lambda * p_knn + (1 - lambda) * p_model), stably."""
    if lam <= 0:
        return model_logprobs
    return torch.logaddexp(model_logprobs + math.log1p(-lam), knn_logprobs + math.log(lam))


def check_settings(k: int, lam: float, temperature: float) -> None:
    if not (isinstance(k, int) and k >= 1):
        raise DatastoreError(f"--knn-k must be an integer >= 1, got {k!r}")
    if not 0 <= lam < 1:
        raise DatastoreError(f"--knn-lambda must be in [0, 1) (1 would give tokens no neighbour voted for "
                             f"probability 0), got {lam}")
    if not temperature > 0:
        raise DatastoreError(f"--knn-temperature must be > 0, got {temperature}")


class KnnLM:
    """The kNN-LM logits processor (``chatbot.decoding``): interpolates each row's next-token
    distribution with its neighbours' vote."""

    def __init__(self, datastore: Datastore, k: int | None = None, lam: float | None = None,
                 temperature: float | None = None):
        tuned = datastore.tuned()
        self.datastore = datastore
        self.k = tuned["k"] if k is None else k
        self.lam = tuned["lambda"] if lam is None else lam
        self.temperature = tuned["temperature"] if temperature is None else temperature
        check_settings(self.k, self.lam, self.temperature)
        self.values = torch.from_numpy(datastore.values.astype(np.int64))

    def knn_logprobs(self, hidden: Tensor, vocab_size: int) -> Tensor:
        distances, rows = self.datastore.search(hidden.float().cpu().numpy(), self.k)
        rows_t = torch.from_numpy(rows)
        tokens = torch.where(rows_t >= 0, self.values[rows_t.clamp_min(0)], torch.full_like(rows_t, -1))
        return knn_log_probs(torch.from_numpy(distances), tokens, vocab_size, self.temperature).to(hidden.device)

    def __call__(self, logprobs: Tensor, view: StepView) -> Tensor:
        if self.lam <= 0 or len(view.hidden) == 0:
            return logprobs
        return interpolate(logprobs, self.knn_logprobs(view.hidden, logprobs.shape[-1]), self.lam)


def load_knn(directory: str | Path, model: LoadedModel, k: int | None = None, lam: float | None = None,
             temperature: float | None = None) -> KnnLM:
    return KnnLM(Datastore.load(directory, model), k, lam, temperature)


# ----------------------------------------------------------------------------------------- perplexity, tuning


@dataclass
class EvalNeighbours:
    """Per evaluated token: the model's log-probability of it, and its k nearest keys' distances and
    whether each voted for it.  Any (k' <= k, lambda, temperature) is then a cheap array computation."""

    model_logprob: np.ndarray  # (N,) float64
    distances: np.ndarray  # (N, k) float32, inf where no neighbour
    match: np.ndarray  # (N, k) bool
    words: int
    examples: int


@torch.inference_mode()
def collect_neighbours(loaded: LoadedModel, store: ExampleStore, datastore: Datastore, k: int,
                       max_examples: int | None = None, batch_tokens: int = 4096, progress: bool = True) -> EvalNeighbours:
    model, pad = loaded.model, loaded.model.config.pad_id
    batches = store.batches(batch_tokens)
    if max_examples is not None:  # the first examples in storage order, as `chatbot eval perplexity` takes them
        batches = [b for b in (batch[batch < max_examples] for batch in batches) if len(b)]
    lps, dists, matches, words, examples = [], [], [], 0, 0
    for idx in tqdm(batches, desc="kNN perplexity", unit=" batch", disable=None if progress else True, leave=False):
        batch = store.collate(idx)
        hidden = model.decode_hidden(batch.tgt_in, model.encode(batch.src))
        real = batch.tgt_out.ne(pad)
        targets = batch.tgt_out[real]
        logprobs = model.logits(hidden[real]).float().log_softmax(-1)
        lps.append(logprobs.gather(1, targets[:, None])[:, 0].double().numpy())
        d, rows = datastore.search(hidden[real].numpy(), k)
        tokens = np.where(rows >= 0, datastore.values[np.maximum(rows, 0)], -1)
        dists.append(np.where(rows >= 0, d, np.inf).astype(np.float32))
        matches.append(tokens == targets.numpy()[:, None])
        words += batch.words
        examples += len(idx)
    return EvalNeighbours(np.concatenate(lps), np.concatenate(dists), np.concatenate(matches), words, examples)


def knn_nll(nb: EvalNeighbours, k: int, lam: float, temperature: float) -> float:
    """Summed NLL of the evaluated tokens under lambda * p_knn + (1 - lambda) * p_model."""
    d = nb.distances[:, :k].astype(np.float64) / temperature
    with np.errstate(invalid="ignore", divide="ignore"):
        logits = -d - (-d).max(1, keepdims=True)
        w = np.exp(logits)
        w = np.nan_to_num(w / w.sum(1, keepdims=True))
        p_knn = (w * nb.match[:, :k]).sum(1)
        if lam <= 0:
            return float(-nb.model_logprob.sum())
        logp = np.logaddexp(math.log1p(-lam) + nb.model_logprob, math.log(lam) + np.log(p_knn))
    return float(-logp.sum())


def knn_perplexity_report(nb: EvalNeighbours, k: int, lam: float, temperature: float) -> dict:
    from eval.perplexity import perplexity_from_totals

    n = len(nb.model_logprob)
    alone = perplexity_from_totals(float(-nb.model_logprob.sum()), n, nb.words, nb.examples)
    mixed = perplexity_from_totals(knn_nll(nb, k, lam, temperature), n, nb.words, nb.examples)
    return {**alone.to_dict(),
            "knn": {**mixed.to_dict(), "k": k, "lambda": lam, "temperature": temperature,
                    "ratio": mixed.perplexity / alone.perplexity}}


def eval_store(loaded: LoadedModel, data: str) -> ExampleStore:
    cfg = loaded.model.config
    if data in ("test", "valid"):
        directory = prepare_splits("chitchat", loaded.tokenizer, [data])[data]
    else:
        directory = prepare_splits(data, loaded.tokenizer, ["test"], whole_file_as="test")["test"]
    return ExampleStore(directory, cfg.max_source_len, cfg.max_target_len)


def knn_perplexity(model_dir: str | None, knn_dir: str, data: str = "test", k: int | None = None,
                   lam: float | None = None, temperature: float | None = None, max_examples: int | None = None,
                   progress: bool = True) -> dict:
    """Perplexity with and without the datastore, from one pass (``chatbot eval perplexity --knn``)."""
    loaded = load_model(model_dir)
    datastore = Datastore.load(knn_dir, loaded)
    tuned = datastore.tuned()
    k = tuned["k"] if k is None else k
    lam = tuned["lambda"] if lam is None else lam
    temperature = tuned["temperature"] if temperature is None else temperature
    check_settings(k, lam, temperature)
    t0 = time.perf_counter()
    nb = collect_neighbours(loaded, eval_store(loaded, data), datastore, k, max_examples, progress=progress)
    report = knn_perplexity_report(nb, k, lam, temperature)
    return {"model": str(loaded.directory), "data": data, "datastore": str(knn_dir), "datastore_keys": len(datastore),
            "seconds": round(time.perf_counter() - t0, 1), **report}


TUNE_K = (4, 8, 16, 32, 64)
TUNE_LAMBDA = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
TUNE_TEMPERATURE_SCALE = (0.03, 0.1, 0.3, 1.0, 3.0)  # times the median nearest-neighbour distance


def tune(model_dir: str | None, knn_dir: str, data: str = "valid", max_examples: int | None = None,
         progress: bool = True) -> dict:
    """Grid over k, lambda and temperature on held-out data (the validation split); records the best in
    the datastore's manifest (``tuned``) and the whole grid in ``tuning.json``."""
    if data == "test":
        raise DatastoreError("tune on the validation split (or a JSONL file), never on the test split")
    loaded = load_model(model_dir)
    datastore = Datastore.load(knn_dir, loaded)
    nb = collect_neighbours(loaded, eval_store(loaded, data), datastore, max(TUNE_K), max_examples, progress=progress)
    nearest = nb.distances[:, 0][np.isfinite(nb.distances[:, 0])]
    scale = float(np.median(nearest)) if len(nearest) else 1.0
    n = len(nb.model_logprob)
    model_ppl = math.exp(-nb.model_logprob.sum() / n)
    grid = []
    for k in TUNE_K:
        for t_scale in TUNE_TEMPERATURE_SCALE:
            temperature = float(f"{scale * t_scale:.3g}")
            for lam in TUNE_LAMBDA:
                grid.append({"k": k, "temperature": temperature, "lambda": lam,
                             "perplexity": math.exp(knn_nll(nb, k, lam, temperature) / n)})
    best = min(grid, key=lambda g: g["perplexity"])
    tuned = {**best, "model_perplexity": model_ppl, "ratio": best["perplexity"] / model_ppl, "data": data,
             "examples": nb.examples, "tokens": n, "median_nearest_distance": scale}
    directory = Path(knn_dir)
    (directory / "tuning.json").write_text(json.dumps({"tuned": tuned, "grid": grid}, indent=1) + "\n")
    manifest = dict(datastore.manifest, tuned=tuned)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(directory / MANIFEST)
    return tuned


# ----------------------------------------------------------------------------------------- CLI


def add_memory(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="kNN-LM datastore over the training conversations (docs/memory.md)")
    msub = p.add_subparsers(dest="memory_command", required=True)
    b = msub.add_parser("build", help="run the model over the training split and store (state -> next token)",
                        description="Teacher-forced pass over the TRAINING split only; keys are the decoder's final "
                                    "states, values the next tokens, pointers (conversation, turn, token).")
    b.add_argument("--model", help="model directory (default: the shipped model)")
    b.add_argument("--out", required=True, help="datastore directory to write")
    b.add_argument("--data", default="chitchat", help="'chitchat' or a JSONL corpus (its training split is used)")
    b.add_argument("--keys", choices=KEY_TYPES, default="fp16", help="fp16: exact search; ivfpq: compact, approximate")
    b.add_argument("--ivf-lists", type=int, help="IVF lists for --keys ivfpq (default: about 4 sqrt(n))")
    b.add_argument("--pq-m", type=int, default=32, help="PQ sub-quantizers for --keys ivfpq (bytes per key)")
    b.add_argument("--pq-bits", type=int, default=8, help="bits per PQ code for --keys ivfpq")
    b.add_argument("--max-examples", type=int, help="only the first N training examples (a subset while developing)")
    b.add_argument("--fraction", type=float, help="only the first FRACTION of the training examples")
    b.add_argument("--batch-tokens", type=int, default=4096)
    b.set_defaults(func=run_build)
    t = msub.add_parser("tune", help="choose k, lambda and temperature on the validation split (recorded in the datastore)")
    t.add_argument("--model", help="model directory (default: the shipped model)")
    t.add_argument("--knn", required=True, help="datastore directory")
    t.add_argument("--data", default="valid", help="'valid' or a JSONL file (never the test split)")
    t.add_argument("--max-examples", type=int, help="only the first N examples")
    t.set_defaults(func=run_tune)
    c = msub.add_parser("compress", help="an IVF-PQ copy of an fp16 datastore (no model pass); tune it again")
    c.add_argument("--knn", required=True, help="fp16 datastore directory")
    c.add_argument("--out", required=True, help="IVF-PQ datastore directory to write")
    c.add_argument("--ivf-lists", type=int, help="IVF lists (default: about 4 sqrt(n))")
    c.add_argument("--pq-m", type=int, default=32, help="PQ sub-quantizers (bytes per key at 8 bits)")
    c.add_argument("--pq-bits", type=int, default=8, help="bits per PQ code")
    c.set_defaults(func=lambda a: print(json.dumps(compress_datastore(a.knn, a.out, a.ivf_lists, a.pq_m, a.pq_bits))) or 0)
    from chatbot.reply_memory import add_reply_memory_command

    add_reply_memory_command(msub)


def run_build(args: argparse.Namespace) -> int:
    manifest = build_datastore(args.model, args.out, args.data, args.keys, args.max_examples, args.fraction,
                               args.batch_tokens, args.ivf_lists, args.pq_m, args.pq_bits)
    print(json.dumps({k: v for k, v in manifest.items() if k != "tuned"}))
    return 0


def run_tune(args: argparse.Namespace) -> int:
    print(json.dumps(tune(args.model, args.knn, args.data, args.max_examples)))
    return 0


# ----------------------------------------------------------------------------------------- engine options


@dataclass(frozen=True)
class MemoryConfig:
    """The memory options of `chatbot chat` and `chatbot serve`: kNN-LM and retrieved human replies."""

    knn: str | None = None  # datastore directory; None: no kNN-LM
    knn_k: int | None = None  # None: the datastore's tuned values
    knn_lambda: float | None = None
    knn_temperature: float | None = None
    reply_memory: str | None = None  # chatbot.reply_memory directory; None: none
    memory_candidates: int = 5  # retrieved human replies among the ranked candidates
    memory_sources: int = 3  # nearest training examples in each reply's sources

    def __post_init__(self) -> None:
        if self.memory_candidates < 0 or self.memory_sources < 0:
            raise DatastoreError("--memory-candidates and --memory-sources must be >= 0")

    def engine_options(self, loaded: LoadedModel, embedder: str | None = None) -> dict:
        """Keyword arguments for ReplyEngine (processors, reply_memory, memory_candidates, memory_sources)."""
        options: dict = {}
        if self.knn:
            options["processors"] = [load_knn(self.knn, loaded, self.knn_k, self.knn_lambda, self.knn_temperature)]
        if self.reply_memory:
            from chatbot.reply_memory import ReplyMemory

            options.update(reply_memory=ReplyMemory(self.reply_memory, embedder,
                                                    k=max(self.memory_candidates, self.memory_sources, 1)),
                           memory_candidates=self.memory_candidates, memory_sources=self.memory_sources)
        return options


def add_memory_arguments(g) -> None:
    g.add_argument("--knn", metavar="DIR", help="kNN-LM datastore (chatbot memory build) interpolated at every step")
    g.add_argument("--knn-k", type=int, help="neighbours per step (default: the datastore's tuned value)")
    g.add_argument("--knn-lambda", type=float, help="weight of the neighbours' distribution (default: tuned)")
    g.add_argument("--knn-temperature", type=float, help="softmax temperature over -distance (default: tuned)")
    g.add_argument("--reply-memory", metavar="DIR",
                   help="reply memory (chatbot memory replies): nearest training replies join the candidates, "
                        "marked as human replies, and the nearest examples are listed as sources")
    g.add_argument("--memory-candidates", type=int, default=MemoryConfig.memory_candidates,
                   help="retrieved human replies ranked with the sampled ones (0: explanations only)")
    g.add_argument("--memory-sources", type=int, default=MemoryConfig.memory_sources,
                   help="nearest training examples listed in each reply's sources")


def memory_config_from_args(args: argparse.Namespace) -> MemoryConfig:
    return MemoryConfig(args.knn, args.knn_k, args.knn_lambda, args.knn_temperature, args.reply_memory,
                        args.memory_candidates, args.memory_sources)
