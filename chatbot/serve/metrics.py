"""Prometheus metrics of one app instance.

Each app gets its own registry rather than the process-global one, so two instances in one process
(the tests run several) count separately and never collide on metric names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chatbot_requests", "Client frames received, by frame type", ["type"], registry=r)
        self.replies = Counter("chatbot_replies", "Replies sent, by origin (generated, or replayed from the store)",
                               ["origin"], registry=r)
        self.reply_latency = Histogram(
            "chatbot_reply_latency_seconds", "Message received to final reply frame sent", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0))
        self.batch_size = Histogram("chatbot_batch_size", "Conversations per batched generate call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("chatbot_batch_seconds", "Wall time of one batched generate call",
                                       registry=r, buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0))
        self.queue_depth = Gauge("chatbot_queue_depth", "Replies waiting for the model", registry=r)
        self.active_sessions = Gauge("chatbot_active_sessions", "Websocket connections with an established session",
                                     registry=r)
        self.connections = Gauge("chatbot_connections", "Open websocket connections", registry=r)
        self.errors = Counter("chatbot_errors", "Error frames sent, by code", ["code"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
