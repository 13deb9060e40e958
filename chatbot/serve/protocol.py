"""The websocket protocol, version 1: frame parsing, validation and typed errors (see docs/protocol.md).

Every frame is a JSON object with a ``type``.  Client frames are parsed into small frozen dataclasses
here, so the connection code only ever sees valid input; anything else becomes a ``ProtocolError``
carrying the error code the client receives.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

PROTOCOL_VERSION = 1

# 160 random bits as 40 lowercase hex digits (hex, not base64: an id never starts with "-", which
# command lines would read as an option).
SESSION_ID_RE = re.compile(r"^[0-9a-f]{40}$")
MESSAGE_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class ErrorCode(StrEnum):
    BAD_JSON = "bad_json"  # not JSON, or not a JSON object
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    UNSUPPORTED_VERSION = "unsupported_version"
    TEXT_TOO_LONG = "text_too_long"
    HELLO_REQUIRED = "hello_required"  # a message before the session is established
    ALREADY_STARTED = "already_started"  # a second hello on one connection
    INVALID_SESSION_ID = "invalid_session_id"  # malformed: can never exist
    UNKNOWN_SESSION = "unknown_session"  # well formed but not in the store (never created, or expired)
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"  # the reply queue is full
    STORE_UNAVAILABLE = "store_unavailable"  # Redis is unreachable
    GENERATION_FAILED = "generation_failed"
    SHUTTING_DOWN = "shutting_down"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    INTERNAL = "internal"


# Retrying the same frame later can succeed for these; for the rest the client must change something.
RETRYABLE = frozenset({
    ErrorCode.RATE_LIMITED, ErrorCode.BUSY, ErrorCode.STORE_UNAVAILABLE, ErrorCode.GENERATION_FAILED,
    ErrorCode.SHUTTING_DOWN, ErrorCode.TOO_MANY_CONNECTIONS, ErrorCode.INTERNAL,
})


class ProtocolError(Exception):
    """An error the client is told about in an ``error`` frame; the connection stays open."""

    def __init__(self, code: ErrorCode, message: str, *, message_id: str | None = None,
                 retry_after_ms: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message
        self.message_id, self.retry_after_ms = message_id, retry_after_ms

    def frame(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "error", "code": str(self.code), "message": self.message,
                               "retryable": self.code in RETRYABLE}
        if self.message_id is not None:
            out["message_id"] = self.message_id
        if self.retry_after_ms is not None:
            out["retry_after_ms"] = self.retry_after_ms
        return out


@dataclass(frozen=True)
class Hello:
    session_id: str | None  # None: start a new session


@dataclass(frozen=True)
class Message:
    message_id: str
    text: str


@dataclass(frozen=True)
class Ping:
    pass


ClientFrame = Hello | Message | Ping


def _field(obj: dict[str, Any], name: str, kind: type, *, required: bool = True,
           message_id: str | None = None) -> Any:
    if name not in obj or obj[name] is None:
        if required:
            raise ProtocolError(ErrorCode.MISSING_FIELD, f"{obj['type']!r} frame needs field {name!r}",
                                message_id=message_id)
        return None
    value = obj[name]
    # bool is an int subclass; a version of `true` is a mistake, not 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"field {name!r} must be a {kind.__name__}",
                            message_id=message_id)
    return value


def validate_session_id(session_id: str) -> str:
    if not SESSION_ID_RE.fullmatch(session_id):
        raise ProtocolError(ErrorCode.INVALID_SESSION_ID,
                            "session_id must be the 40-hex-digit id the server issued")
    return session_id


def parse_client_frame(raw: str, max_text_chars: int) -> ClientFrame:
    """One text frame -> a validated client frame, or ``ProtocolError``."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "frame must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.MISSING_FIELD, "frame needs a string field 'type'")
    if kind == "hello":
        version = _field(obj, "version", int)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                                f"protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}")
        session_id = _field(obj, "session_id", str, required=False)
        return Hello(None if session_id is None else validate_session_id(session_id))
    if kind == "message":
        # The id comes first so that every later error can name the message it is about.
        message_id = _field(obj, "message_id", str)
        if not MESSAGE_ID_RE.fullmatch(message_id):
            raise ProtocolError(ErrorCode.INVALID_FIELD,
                                "message_id must be 1-64 characters from A-Z a-z 0-9 _ . : -")
        text = _field(obj, "text", str, message_id=message_id).strip()
        if not text:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "text is empty", message_id=message_id)
        if len(text) > max_text_chars:
            raise ProtocolError(ErrorCode.TEXT_TOO_LONG,
                                f"text has {len(text)} characters; the limit is {max_text_chars}",
                                message_id=message_id)
        return Message(message_id, text)
    if kind == "ping":
        return Ping()
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind[:40]!r}; expected hello, message or ping")
