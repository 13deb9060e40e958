"""Typed keys for everything an app instance holds, and its lifecycle flag."""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass

from aiohttp import web

from chatbot.serve.batcher import Batcher, Engine
from chatbot.serve.config import ServeConfig
from chatbot.serve.metrics import ServiceMetrics
from chatbot.serve.ratelimit import RateLimiter
from chatbot.serve.sessions import SessionStore


@dataclass
class Lifecycle:
    closing: bool = False  # set when shutdown begins: no new sessions or messages


CONFIG = web.AppKey("config", ServeConfig)
METRICS = web.AppKey("metrics", ServiceMetrics)
LIMITER = web.AppKey("limiter", RateLimiter)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
STORE = web.AppKey("store", SessionStore)
ENGINE = web.AppKey("engine", Engine)
BATCHER = web.AppKey("batcher", Batcher)
SOCKETS = web.AppKey("sockets", weakref.WeakSet[web.WebSocketResponse])
INFLIGHT = web.AppKey("inflight", set[asyncio.Task[None]])
