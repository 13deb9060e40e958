"""The reply engine: one API for the terminal chat, the websocket service and the evaluation.

``ReplyEngine.reply(contexts, config)`` takes a batch of conversations and returns one ``Reply`` per
conversation.  Strategies (``DecodingConfig.strategy``):

- ``sample_and_rank`` (default, Meena): N independent samples at temperature T, optionally top-k /
  top-p truncated; filters drop bad candidates and the best-ranked survivor is the reply.  The engine's
  ``ranker`` (``chatbot.ranking``) scores the candidates: Meena's total log-likelihood, a length-
  normalised one, or maximum mutual information with a backward model.
- ``sample``: one sample per context, streamed word by word while it is decoded.
- ``greedy``: the most likely next token each step, streamed like ``sample``.
- ``beam``: beam search (``beam_size`` beams); the finished beams are the candidates.

Efficiency.  The encoder runs once per context and its projected k/v are shared by that context's
candidate rows (``start_decoding(enc, repeats=N)``); every row of every context steps together through
the incremental caches; a row that ends (end-of-turn, or cut by the safety filter) leaves the batch
(``DecoderState.select``), and a beam-search context leaves once no live beam can win.  A context is
filtered, ranked and streamed as soon as its last row ends, while the others keep decoding.

Randomness is per context: each context samples from its own ``torch.Generator``, seeded from the
call's seed and the tokens the encoder reads for that context, so a context gets the same candidates
alone or in any batch, and different contexts do not share one random stream.
Scores are model log-likelihoods at temperature 1 (what the model believes, not what the sampler drew
from), end-of-turn token included.

Filters and fallback.  Every candidate goes through the safety filter, then the repetition filter
(``chatbot.filters``); ``ScoredCandidate.dropped_by`` says which dropped it.  If every candidate is
dropped, ``Reply.all_filtered`` is set and the reply falls back to the best candidate that passed the
safety filter (repetition is a quality rule, safety a hard one); if none did, to ``fallback_text``, or
to the empty string if the safety filter rejects that too.  A reply never contains a blocked phrase.

Streaming.  ``on_piece(i, piece)`` receives context i's reply text as it becomes final; the pieces
concatenate to ``Reply.text``.  Ranked strategies deliver the chosen reply word by word right after
ranking.  ``sample``/``greedy`` deliver words while decoding, holding back the last words that a blocked
phrase could still be completing; when a blocked phrase does complete (or the classifier flags the text
about to be delivered) the reply is cut after the last delivered word, which is then the reply
(``all_filtered``; ``fallback_text`` if nothing was delivered yet).  The same cut happens without a
callback, so streaming never changes a reply.  ``on_reply(i, reply)`` hands over context i's whole
Reply right after its last piece, without waiting for the rest of the batch (the service sends its
final frame then).

Knowledge.  An engine given a ``retriever`` asks it, once per call, for each context's passages (it
decides when a turn deserves any: none for "hi").  Each Reply's ``sources`` lists the passages retrieved
for it (id, title, url, score).  The passages reach the encoder (after the context, each behind the
reserved ``<know>`` token: ``chatbot.model_input``) only for a model trained to read them
(``knowledge_passages`` > 0 in its config), so the shipped chitchat model's replies stay as they were.

Memory (docs/memory.md).  Decoding runs through one seam (``chatbot.decoding``): ``processors`` change
the distribution every strategy samples, scores and ranks by (kNN-LM, ``chatbot.memory``).  An engine
given a ``reply_memory`` (``chatbot.reply_memory``) adds the human replies of the training examples
nearest each context to the ranked candidates (``kind="conversation"``, scored teacher-forced like the
others) and lists the nearest examples in the reply's ``sources``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from chatbot.decoding import (BanTokens, CandidateDecoder, Draft, LogitsProcessor, MinLength, NextTokens, Sampling,
                              teacher_forced_logprobs)
from chatbot.model_input import join_context, knowledge_text
from chatbot.filters import RepetitionFilter, SafetyFilter
from chatbot.model import ChatModel, EncoderOutput
from chatbot.ranking import Ranker, default_ranker
from chatbot.tokenizer import EOT_ID, PAD_ID, SPECIAL_TOKENS, ChatTokenizer

log = logging.getLogger(__name__)

STRATEGIES = ("sample_and_rank", "sample", "greedy", "beam")
# Bounds that keep a bad request from exhausting memory; far above anything useful.
MAX_CANDIDATES = 256
MAX_BEAM_SIZE = 64
# Only the last max_source_len tokens of a context reach the encoder; a turn this long is a mistake.
MAX_TURN_CHARS = 10_000
FALLBACK_TEXT = "Let's talk about something else."

PieceCallback = Callable[[int, str], None]
ReplyCallback = Callable[[int, "Reply"], None]


class KnowledgePassage(Protocol):
    """A passage a retriever found (``retrieval.knowledge.Hit`` is one)."""

    @property
    def title(self) -> str: ...

    @property
    def text(self) -> str: ...

    def source(self) -> dict:
        """The protocol's ``sources`` entry: id, title, url (where known), score."""
        ...


class Retriever(Protocol):
    """Knowledge for a batch of contexts: per context its passages, best first (empty: none wanted)."""

    def retrieve(self, contexts: list[list[str]]) -> list[list[KnowledgePassage]]: ...


class ReplyRetriever(Protocol):
    """Training examples near each context, best first (``chatbot.reply_memory.ReplyMemory`` is one);
    each hit has ``text`` (the human reply) and ``source(copied)`` (its ``sources`` entry)."""

    def retrieve(self, contexts: list[list[str]]) -> list[list[Any]]: ...


class GenerationError(ValueError):
    """Bad input to the reply engine: the message names the field, the context and turn, and the limit."""


@dataclass(frozen=True)
class DecodingConfig:
    """How to decode.  Temperature, top-k and top-p apply to the sampling strategies only;
    ``num_candidates`` to sample_and_rank (``sample`` and ``greedy`` make one candidate per context);
    ``beam_size`` to beam.  ``max_new_tokens`` is capped at the model's target limit minus one."""

    strategy: str = "sample_and_rank"
    num_candidates: int = 20
    temperature: float = 0.88
    top_k: int = 0  # 0: no top-k truncation
    top_p: float = 1.0  # 1.0: no nucleus truncation
    beam_size: int = 4
    max_new_tokens: int = 40
    min_new_tokens: int = 1  # end-of-turn is impossible before this many tokens
    seed: int | None = None  # same seed + same input -> same replies

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise GenerationError(message)

        require(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        for name in ("num_candidates", "top_k", "beam_size", "max_new_tokens", "min_new_tokens"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
        require(1 <= self.num_candidates <= MAX_CANDIDATES,
                f"num_candidates must be in 1..{MAX_CANDIDATES}, got {self.num_candidates}")
        require(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0,
                f"temperature must be a finite number > 0, got {self.temperature!r}; "
                "for deterministic replies use strategy='greedy' (temperature 0 is refused, not guessed)")
        require(self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        require(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
                f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        require(1 <= self.beam_size <= MAX_BEAM_SIZE, f"beam_size must be in 1..{MAX_BEAM_SIZE}, got {self.beam_size}")
        require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(0 <= self.min_new_tokens <= self.max_new_tokens,
                f"min_new_tokens must be in 0..max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}")
        require(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
                f"seed must be None or an integer in 0..2**63-1, got {self.seed!r}")

    @property
    def streams_while_decoding(self) -> bool:
        return self.strategy in ("sample", "greedy")


@dataclass
class ScoredCandidate:
    text: str  # candidates dropped by "safety" keep their text for inspection: never show them to users
    token_ids: list[int]
    log_likelihood: float  # sum of log p(token), end-of-turn included when the candidate finished
    normalized_log_likelihood: float  # log_likelihood / scored tokens
    dropped_by: str | None  # None: kept; else "safety", "repetition" or "self_repetition"
    scored_tokens: int = 0  # tokens that log_likelihood sums over
    score: float = 0.0  # the ranker's score, higher is better (chatbot.ranking)
    # "generated", or "conversation": a human reply from the training data (chatbot.reply_memory), whose
    # ``source`` names its conversation and turn
    kind: str = "generated"
    source: dict[str, Any] | None = None


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    log_likelihood: float
    normalized_log_likelihood: float
    candidates: list[ScoredCandidate] | None  # best first by the ranking score; only with return_candidates
    all_filtered: bool  # every candidate was dropped; ``text`` is the fallback (see the module docstring)
    # Of the call until this reply was final: retrieve_s, tokenize_s, encode_s, decode_s, rank_s, total_s, decode_steps
    timings: dict[str, float]
    # The passages retrieved for this reply, one dict each (KnowledgePassage.source(): id, title, url, ...).
    sources: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- helpers


def check_contexts(contexts: object) -> list[list[str]]:
    """Validate a batch of contexts; returns them with each turn stripped (as training data was)."""
    if isinstance(contexts, str) or not isinstance(contexts, (list, tuple)):
        raise GenerationError("contexts must be a list of conversations, each a list of turn strings (oldest first)")
    checked = []
    for i, context in enumerate(contexts):
        if isinstance(context, str) or not isinstance(context, (list, tuple)):
            raise GenerationError(f"context {i} must be a list of turn strings, got {type(context).__name__}")
        if not context:
            raise GenerationError(f"context {i} has no turns; it needs at least the user's message")
        for j, turn in enumerate(context):
            if not isinstance(turn, str):
                raise GenerationError(f"context {i}, turn {j}: expected a string, got {type(turn).__name__}")
            if not turn.strip():
                raise GenerationError(f"context {i}, turn {j} is empty or whitespace only; drop the turn or send text")
            try:
                turn.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate: the tokenizer would fail the whole batch
                raise GenerationError(f"context {i}, turn {j} is not valid Unicode ({e.reason} at character "
                                      f"{e.start}); replace unpaired surrogates") from None
            if len(turn) > MAX_TURN_CHARS:
                raise GenerationError(f"context {i}, turn {j} has {len(turn)} characters; the limit is "
                                      f"{MAX_TURN_CHARS} (the model reads only a context's last tokens)")
        checked.append([turn.strip() for turn in context])
    return checked


def context_seed(seed: int | None, source_ids: Sequence[int]) -> int:
    """The seed of one context's sampling generator: a hash of the call's seed and the token ids the
    encoder reads for that context.

    Depending on nothing else keeps a context's samples the same alone or in any batch; depending on
    the input keeps different contexts from reusing one random stream (one seed for all would give
    similar contexts the very same samples).  No seed: fresh randomness.
    """
    if seed is None:
        return secrets.randbits(63)
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, source_ids))}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def contexts_to_tensor(tokenizer: ChatTokenizer, contexts: list[list[str]], max_source_len: int,
                       knowledge: list[list[KnowledgePassage]] | None = None) -> Tensor:
    """Each context (turn texts, oldest first) -> right-padded ids (C, S): last 7 turns, cut from the left,
    then that context's knowledge passages if given (``chatbot.model_input``)."""
    knowledge = knowledge or [[] for _ in contexts]
    rows = [join_context(tokenizer.encode_batch(turns), max_source_len,
                         tokenizer.encode_batch([knowledge_text(p.title, p.text) for p in passages]) if passages else ())
            for turns, passages in zip(contexts, knowledge)]
    width = max(len(r) for r in rows)
    src = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        src[i, : len(r)] = torch.from_numpy(r)
    return src


def word_pieces(text: str) -> list[str]:
    """"a b  c" -> ["a", " b", "  c"]: whitespace travels with the word after it."""
    return re.findall(r"\s*\S+", text)


def words_before(text: str, end: int) -> str:
    """The whole words of ``text`` that lie before position ``end`` (a word cut by ``end`` is left out)."""
    if end >= len(text):
        return text.rstrip()
    while end > 0 and not text[end].isspace():
        end -= 1
    return text[:end].rstrip()


class LiveStream:
    """Delivers one reply while it is decoded (sample / greedy) without ever delivering a blocked phrase.

    A blocked phrase of k words that is not yet complete must include a word still to come, so it can
    only start within the last k words of the text so far: those are held back, everything before is
    final and delivered.  A phrase match counts once the character after it exists (or the reply has
    ended): "ass" at the end of "you ass" may still become "you assume".  On a match, or when the
    classifier flags the text about to be delivered, the reply stops at what was already delivered.
    """

    def __init__(self, index: int, context: Sequence[str], safety: SafetyFilter | None,
                 tokenizer: ChatTokenizer, on_piece: PieceCallback | None):
        self.index, self.context, self.safety = index, context, safety
        self.tokenizer, self.on_piece = tokenizer, on_piece
        self.holdback_words = safety.max_phrase_words if safety else 1
        self.delivered = ""
        self.cut = False

    def advance(self, token_ids: Sequence[int]) -> bool:
        """Called after each new token; False when the reply was cut (the row should stop decoding)."""
        # A trailing U+FFFD is a character whose bytes are still arriving: not final, so not matched yet.
        text = self.tokenizer.decode(token_ids).lstrip().rstrip("\ufffd")
        starts = [m.start() for m in re.finditer(r"\S+", text)]
        if not text or text[-1].isspace():
            starts.append(len(text))  # the next word has not started yet
        limit = starts[max(len(starts) - self.holdback_words, 0)]
        match = self.safety.first_blocked(text) if self.safety else None
        if match is not None:
            if match.end() < len(text):
                self.cut = True
                return False
            limit = min(limit, match.start())
        return self._deliver(words_before(text, limit))

    def finish(self, token_ids: Sequence[int]) -> str:
        """The row ended: deliver the rest if it is safe; returns the delivered text (the reply)."""
        if not self.cut:
            text = self.tokenizer.decode(token_ids).strip()
            match = self.safety.first_blocked(text) if self.safety else None
            self._deliver(words_before(text, match.start()) if match else text)
            self.cut = self.cut or match is not None
        return self.delivered

    def _deliver(self, prefix: str) -> bool:
        if len(prefix) <= len(self.delivered):
            return True
        if not prefix.startswith(self.delivered):  # decoding rewrote delivered text: stop rather than contradict it
            log.warning("streamed reply %d: decoded text no longer extends what was delivered; cutting it", self.index)
            self.cut = True
            return False
        if self.safety is not None and self.safety.unsafe(self.context, [prefix])[0]:
            self.cut = True
            return False
        if self.on_piece is not None:
            for piece in word_pieces(prefix[len(self.delivered):]):
                self.on_piece(self.index, piece)
        self.delivered = prefix
        return True


def rank_candidates(ranker: Ranker, context: list[str], candidates: list[ScoredCandidate]) -> list[ScoredCandidate]:
    """Sets each candidate's ``score`` and returns them best first (stable: ties keep sampling order)."""
    for cand, score in zip(candidates, ranker.scores(context, candidates)):
        cand.score = score
    return sorted(candidates, key=lambda cand: cand.score, reverse=True)


def choose(ranked: list[ScoredCandidate]) -> tuple[ScoredCandidate | None, bool]:
    """(the reply, all_filtered) from ranked candidates: the best one the filters kept; when they dropped
    all, the best that passed the safety filter; None when none did (the caller falls back)."""
    chosen = next((cand for cand in ranked if cand.dropped_by is None), None)
    if chosen is not None:
        return chosen, False
    return next((cand for cand in ranked if cand.dropped_by != "safety"), None), True


# ----------------------------------------------------------------------------------------- the engine


def _guarded(source: Retriever | ReplyRetriever | None, contexts: list[list[str]], what: str) -> list[list[Any]]:
    """``source.retrieve(contexts)``, one list per context; with no source, or when it fails or answers
    for the wrong number of contexts, empty lists (logged): a lookup may cost a reply its extras, never
    the reply."""
    if source is None:
        return [[] for _ in contexts]
    try:
        found = source.retrieve(contexts)
        if len(found) != len(contexts):
            raise GenerationError(f"{what} returned {len(found)} lists for {len(contexts)} contexts")
        return [list(items) for items in found]
    except Exception:
        log.exception("%s failed; replying without it", what)
        return [[] for _ in contexts]


class ReplyEngine:
    """Batched reply generation with filters; thread-safe for concurrent ``reply`` calls (no call state
    lives on the engine).  Puts the model in eval mode: dropout would make seeded replies irreproducible."""

    def __init__(self, model: ChatModel, tokenizer: ChatTokenizer, device: str | torch.device = "cpu",
                 repetition_filter: RepetitionFilter | None = RepetitionFilter(),
                 safety_filter: SafetyFilter | None = SafetyFilter(), *, fallback_text: str = FALLBACK_TEXT,
                 retriever: Retriever | None = None, knowledge_passages: int | None = None,
                 ranker: Ranker | None = None, processors: Sequence[LogitsProcessor] = (),
                 reply_memory: ReplyRetriever | None = None, memory_candidates: int = 0, memory_sources: int = 0):
        """``retriever``: where knowledge comes from (None: no knowledge).  ``knowledge_passages``: how
        many retrieved passages the model reads; None takes the model config's (0 for a model not
        trained on knowledge: passages are then only reported as sources).  ``ranker``: how candidates
        are ranked (None: the documented default).  ``processors``: change the next-token distribution
        that every strategy samples, scores and ranks by (``chatbot.decoding``; kNN-LM is one).
        ``reply_memory`` (``chatbot.reply_memory``): training examples near each context; the human replies
        of the nearest ``memory_candidates`` join the ranked candidates (sample_and_rank and beam), and the
        nearest ``memory_sources`` are listed in each reply's sources as its explanation."""
        if model.config.direction != "forward":
            raise GenerationError("this is a backward model, p(context | reply): it scores replies for MMI "
                                  "ranking (--mmi-model) and cannot write them")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.repetition_filter = repetition_filter
        self.safety_filter = safety_filter
        self.fallback_text = fallback_text
        self.retriever = retriever
        self.knowledge_passages = (getattr(model.config, "knowledge_passages", 0) if knowledge_passages is None
                                   else knowledge_passages)
        self.ranker = ranker if ranker is not None else default_ranker()  # None: the documented default
        self.processors = list(processors)
        if memory_candidates < 0 or memory_sources < 0:
            raise GenerationError("memory_candidates and memory_sources must be >= 0")
        self.reply_memory, self.memory_candidates, self.memory_sources = reply_memory, memory_candidates, memory_sources
        # Never generated: padding, start, separators; end-of-turn is handled by min_new_tokens.
        self.banned_ids = [i for i in range(len(SPECIAL_TOKENS)) if i != EOT_ID]

    def with_retriever(self, retriever: Retriever | None) -> "ReplyEngine":
        """A copy of this engine (sharing the model) that retrieves from ``retriever``."""
        engine = copy.copy(self)
        engine.retriever = retriever
        return engine

    def retrieve(self, contexts: list[list[str]]) -> list[list[KnowledgePassage]]:
        """Each context's passages; a failing retriever costs the sources, never the reply."""
        return _guarded(self.retriever, contexts, "knowledge retrieval")

    def retrieve_replies(self, contexts: list[list[str]]) -> list[list[Any]]:
        """Each context's nearest training examples; a failing memory costs them, never the reply."""
        wanted = self.memory_candidates or self.memory_sources
        return _guarded(self.reply_memory if wanted else None, contexts, "reply memory retrieval")

    def reply(self, contexts: list[list[str]], config: DecodingConfig = DecodingConfig(), *,
              return_candidates: bool = False, on_piece: PieceCallback | None = None,
              on_reply: ReplyCallback | None = None) -> list[Reply]:
        """One Reply per context, in order.  ``contexts``: per conversation its turn texts, oldest first,
        the last being the user's newest message; the model reads the last 7 turns, cut from the left to
        its source limit.  ``on_piece(i, piece)``: see the module docstring.  ``on_reply(i, reply)``:
        called as soon as context i's reply is final (after its last piece), while other contexts may
        still be decoding; the Reply is not changed afterwards.  Raises GenerationError."""
        if not isinstance(config, DecodingConfig):
            raise GenerationError(f"config must be a DecodingConfig, got {type(config).__name__}")
        t_start = time.perf_counter()
        contexts = check_contexts(contexts)
        if not contexts:
            return []
        with torch.inference_mode():
            call = _Call(self, contexts, config, return_candidates, on_piece, on_reply, t_start)
            call.run()
        return call.replies


class _Call:
    """The state of one ``reply`` call: tokenize and encode, decode (``chatbot.decoding``), then per context
    filter, rank, fall back and deliver."""

    def __init__(self, engine: ReplyEngine, contexts: list[list[str]], config: DecodingConfig,
                 return_candidates: bool, on_piece: PieceCallback | None, on_reply: ReplyCallback | None,
                 t_start: float):
        self.engine, self.model, self.tokenizer = engine, engine.model, engine.tokenizer
        self.contexts, self.config = contexts, config
        self.return_candidates, self.on_piece, self.on_reply = return_candidates, on_piece, on_reply
        self.t_start = self.t_decode = t_start
        self.replies: list[Reply | None] = [None] * len(contexts)
        # Running totals; each reply gets a copy with decode_s and total_s as of its finish.
        self.timings = {"tokenize_s": 0.0, "encode_s": 0.0, "rank_s": 0.0, "decode_steps": 0.0}
        limit = self.model.config.max_target_len - 1  # training cut responses to this many tokens
        self.max_new_tokens = min(config.max_new_tokens, limit)
        self.min_new_tokens = min(config.min_new_tokens, self.max_new_tokens)
        if config.max_new_tokens > limit:
            log.debug("max_new_tokens %d capped at the model's limit %d", config.max_new_tokens, limit)
        self.live: list[LiveStream] = []
        self.source_ids: list[list[int]] = []
        self.enc: EncoderOutput | None = None
        self.knowledge: list[list[KnowledgePassage]] = [[] for _ in contexts]
        self.memory_hits: list[list[Any]] = [[] for _ in contexts]
        self.copied: list[dict[str, Any] | None] = [None] * len(contexts)  # the chosen retrieved reply's source

    def run(self) -> None:
        t0 = time.perf_counter()
        self.knowledge = self.engine.retrieve(self.contexts)
        n_read = self.engine.knowledge_passages
        t_retrieved = time.perf_counter()
        self.timings["retrieve_s"] = t_retrieved - t0
        self.memory_hits = self.engine.retrieve_replies(self.contexts)
        t0 = time.perf_counter()
        self.timings["memory_s"] = t0 - t_retrieved
        src = contexts_to_tensor(self.tokenizer, self.contexts, self.model.config.max_source_len,
                                 [passages[:n_read] for passages in self.knowledge] if n_read > 0 else None)
        self.source_ids = [row[row.ne(PAD_ID)].tolist() for row in src]
        src = src.to(self.engine.device)
        t1 = time.perf_counter()
        self.enc = self.model.encode(src)
        self.timings["tokenize_s"], self.timings["encode_s"] = t1 - t0, time.perf_counter() - t1
        self.t_decode = time.perf_counter()
        cfg = self.config
        next_tokens = NextTokens(self.model, self.engine.processors,
                                 [BanTokens(tuple(self.engine.banned_ids)), MinLength(self.min_new_tokens)])
        decoder = CandidateDecoder(self.model, next_tokens, self.max_new_tokens, self._finish_context,
                                   on_step=self._count_step)
        if cfg.strategy == "beam":
            decoder.beam(self.enc, cfg.beam_size, self._rank_key)
            return
        generators = [torch.Generator(device=self.engine.device).manual_seed(context_seed(cfg.seed, ids))
                      for ids in self.source_ids]
        keep_going = None
        if cfg.streams_while_decoding:
            self.live = [LiveStream(i, ctx, self.engine.safety_filter, self.tokenizer, self.on_piece)
                         for i, ctx in enumerate(self.contexts)]
            keep_going = lambda c, draft: self.live[c].advance(draft.token_ids)  # noqa: E731
        n = cfg.num_candidates if cfg.strategy == "sample_and_rank" else 1
        sampling = Sampling(cfg.strategy == "greedy", cfg.temperature, cfg.top_k, cfg.top_p)
        decoder.sample(self.enc, n, sampling, generators, keep_going)

    def _count_step(self, steps: int) -> None:
        self.timings["decode_steps"] = float(steps)

    def _rank_key(self, draft: Draft) -> float:
        return self.engine.ranker.search_score(draft.log_likelihood, len(draft.token_logprobs))

    # -- per context: filter, rank, fall back, deliver

    def _finish_context(self, c: int, drafts: list[Draft]) -> None:
        t0 = time.perf_counter()
        reply = self._finish_streamed(c, drafts[0]) if self.live else self._finish_ranked(c, drafts)
        now = time.perf_counter()
        self.timings["rank_s"] += now - t0
        reply.timings = {**self.timings, "decode_s": now - self.t_decode - self.timings["rank_s"],
                         "total_s": now - self.t_start}
        reply.sources = [p.source() for p in self.knowledge[c]] + self._memory_sources(c)
        self.replies[c] = reply
        if self.on_reply is not None:
            self.on_reply(c, reply)

    def _verdicts(self, context: list[str], texts: list[str]) -> list[str | None]:
        safety, repetition = self.engine.safety_filter, self.engine.repetition_filter
        unsafe = safety.unsafe(context, texts) if safety else [False] * len(texts)
        repeats = repetition.check(context, texts) if repetition else [None] * len(texts)
        return ["safety" if u else r for u, r in zip(unsafe, repeats)]

    def _scored(self, drafts: list[Draft]) -> list[ScoredCandidate]:
        texts = [self.tokenizer.decode(d.token_ids).strip() for d in drafts]
        return [ScoredCandidate(text, d.token_ids, d.log_likelihood, d.normalized_log_likelihood, None,
                                scored_tokens=len(d.token_logprobs), score=self._rank_key(d))
                for text, d in zip(texts, drafts)]

    def _finish_ranked(self, c: int, drafts: list[Draft]) -> Reply:
        context = self.contexts[c]
        candidates = self._scored(drafts) + self._retrieved_candidates(c)
        for cand, verdict in zip(candidates, self._verdicts(context, [cand.text for cand in candidates])):
            cand.dropped_by = verdict
        ranked = rank_candidates(self.engine.ranker, context, candidates)
        chosen, all_filtered = choose(ranked)
        if chosen is None:
            reply = self._fallback_reply(c, "")
        else:
            reply = Reply(chosen.text, chosen.token_ids, chosen.log_likelihood, chosen.normalized_log_likelihood,
                          None, all_filtered, {})
            self.copied[c] = chosen.source
            self._deliver(c, reply.text)
        reply.candidates = ranked if self.return_candidates else None
        return reply

    def _retrieved_candidates(self, c: int) -> list[ScoredCandidate]:
        """The human replies of the nearest training examples, scored like the sampled candidates and held
        to the same length limits: a human "Yup!" under the minimum reply length would otherwise outrank
        every sampled candidate (they are kept from ending early) and undo the minimum."""
        limit = self.model.config.max_target_len - 1  # what the model was trained to score
        shortest = max(self.min_new_tokens, 1)
        hits = [(hit, ids) for hit in self.memory_hits[c][:self.engine.memory_candidates]
                if shortest <= len(ids := self.tokenizer.encode(hit.text)) <= limit]
        if not hits:
            return []
        scores = teacher_forced_logprobs(self.model, self.enc, [c] * len(hits), [ids for _, ids in hits],
                                         self.engine.processors)
        out = []
        for (hit, ids), lps in zip(hits, scores):
            draft = Draft(ids, lps, True)
            out.append(ScoredCandidate(hit.text.strip(), ids, draft.log_likelihood, draft.normalized_log_likelihood,
                                       None, scored_tokens=len(lps), score=self._rank_key(draft),
                                       kind="conversation", source=hit.source(copied=True)))
        return out

    def _memory_sources(self, c: int) -> list[dict[str, Any]]:
        """The copied human reply's source first (when the reply is one), then the nearest examples."""
        copied = self.copied[c]
        near = [hit.source(copied=False) for hit in self.memory_hits[c][:self.engine.memory_sources]]
        if copied is None:
            return near
        return [copied] + [s for s in near if s["id"] != copied["id"]]

    def _finish_streamed(self, c: int, draft: Draft) -> Reply:
        stream = self.live[c]
        delivered = stream.finish(draft.token_ids)
        (candidate,) = self._scored([draft])
        if stream.cut:
            candidate.dropped_by = "safety"
            reply = self._fallback_reply(c, delivered)
        else:
            repetition = self.engine.repetition_filter
            candidate.dropped_by = repetition.check(self.contexts[c], [candidate.text])[0] if repetition else None
            # Already delivered: a repetitive streamed reply stays (it is the best safe candidate there is).
            reply = Reply(candidate.text, candidate.token_ids, candidate.log_likelihood,
                          candidate.normalized_log_likelihood, None, candidate.dropped_by is not None, {})
        reply.candidates = [candidate] if self.return_candidates else None
        return reply

    def _fallback_reply(self, c: int, delivered: str) -> Reply:
        """A reply that is not a whole candidate: a cut streamed reply, else the fallback text.

        Its tokens are the text's own tokenization, scored by a teacher-forced pass, so the reported
        likelihood is the model's for exactly the text returned.
        """
        text = delivered
        if not text:
            safety = self.engine.safety_filter
            text = self.engine.fallback_text
            if safety is not None and safety.unsafe(self.contexts[c], [text])[0]:
                text = ""
            self._deliver(c, text)
        ids = self.tokenizer.encode(text)
        draft = Draft(ids, self._teacher_forced_logprobs(c, ids), True)
        return Reply(text, ids, draft.log_likelihood, draft.normalized_log_likelihood, None, True, {})

    def _deliver(self, c: int, text: str) -> None:
        if self.on_piece is not None:
            for piece in word_pieces(text):
                self.on_piece(c, piece)

    def _teacher_forced_logprobs(self, c: int, ids: list[int]) -> list[float]:
        return teacher_forced_logprobs(self.model, self.enc, [c], [ids], self.engine.processors)[0]
