"""Typed keys for everything an app instance holds."""

from __future__ import annotations

import weakref

from aiohttp import web

from chatbot.serve.batcher import Batcher, Engine
from chatbot.serve.config import ServeConfig
from chatbot.serve.connection import ChatConnection
from chatbot.serve.metrics import ServiceMetrics
from chatbot.serve.replies import ReplyService
from chatbot.serve.sessions import SessionStore, StoreHealth

CONFIG = web.AppKey("config", ServeConfig)
METRICS = web.AppKey("metrics", ServiceMetrics)
STORE = web.AppKey("store", SessionStore)
HEALTH = web.AppKey("health", StoreHealth)
ENGINE = web.AppKey("engine", Engine)
BATCHER = web.AppKey("batcher", Batcher)
SERVICE = web.AppKey("service", ReplyService)
CONNECTIONS = web.AppKey("connections", weakref.WeakSet[ChatConnection])
