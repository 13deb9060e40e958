"""The websocket protocol, version 1, for both ends: the server and ``chatbot.client`` import it
(see docs/protocol.md).  Standard library only, so a client does not pull in the server.

Every frame is a JSON object with a ``type``.  Client frames are parsed into small frozen dataclasses
here, so the connection code only ever sees valid input; anything else becomes a ``ProtocolError``
carrying the error code the client receives.  Server frames are built here too, and every outgoing
frame goes through ``encode_frame``, which cannot fail on text that came from storage.
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
# A Python str holds a surrogate code point only when it is unpaired (JSON's "\ud83d\ude00" decodes to
# one code point): such text cannot be encoded as UTF-8, so it can be neither sent nor tokenized.
LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")


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
    REPLY_IN_PROGRESS = "reply_in_progress"  # another connection is answering this message right now
    INTERNAL = "internal"


# Retrying the same frame later can succeed for these; for the rest the client must change something.
RETRYABLE = frozenset({
    ErrorCode.RATE_LIMITED, ErrorCode.BUSY, ErrorCode.STORE_UNAVAILABLE, ErrorCode.GENERATION_FAILED,
    ErrorCode.SHUTTING_DOWN, ErrorCode.TOO_MANY_CONNECTIONS, ErrorCode.REPLY_IN_PROGRESS, ErrorCode.INTERNAL,
})
# The session a client holds is gone for good: start a new one (hello without session_id).
SESSION_GONE = frozenset({ErrorCode.UNKNOWN_SESSION, ErrorCode.INVALID_SESSION_ID})


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


def shutting_down(message_id: str | None = None) -> ProtocolError:
    """The one refusal every stage sends while the server drains."""
    return ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect and retry",
                         message_id=message_id)


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
    if obj.get("type") is None:
        raise ProtocolError(ErrorCode.MISSING_FIELD, "frame needs a string field 'type'")
    kind = obj["type"]
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.INVALID_FIELD, "field 'type' must be a string")
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
        if (bad := LONE_SURROGATE_RE.search(text)) is not None:
            raise ProtocolError(ErrorCode.INVALID_FIELD,
                                f"text holds an unpaired UTF-16 surrogate (\\u{ord(bad.group()):04x} at character "
                                f"{bad.start()}); send valid Unicode", message_id=message_id)
        if not text:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "text is empty", message_id=message_id)
        if len(text) > max_text_chars:
            raise ProtocolError(ErrorCode.TEXT_TOO_LONG,
                                f"text has {len(text)} characters; the limit is {max_text_chars}",
                                message_id=message_id)
        return Message(message_id, text)
    if kind == "ping":
        return Ping()
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE,
                        f"unknown frame type {scrub_text(kind[:40])!r}; expected hello, message or ping")


# ------------------------------------------------------------------------------------ frames out


def scrub_text(text: str) -> str:
    """Text safe to encode: unpaired surrogates (which only text stored before validation can hold)
    become U+FFFD, the replacement character."""
    return LONE_SURROGATE_RE.sub("\ufffd", text)


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode_frame(frame: dict[str, Any]) -> str:
    """A frame as JSON text that always encodes as UTF-8.  With ensure_ascii off a lone surrogate stays
    a raw character, and raw surrogates can only occur inside JSON strings, so scrubbing the whole text
    is the same as scrubbing every string in the frame."""
    return scrub_text(_dumps(frame))


def hello_frame(session_id: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "hello", "version": PROTOCOL_VERSION}
    if session_id is not None:
        frame["session_id"] = session_id
    return frame


def message_frame(message_id: str, text: str) -> dict[str, Any]:
    return {"type": "message", "message_id": message_id, "text": text}


def session_frame(session_id: str, resumed: bool, history: list[dict[str, Any]],
                  limits: dict[str, Any]) -> dict[str, Any]:
    return {"type": "session", "version": PROTOCOL_VERSION, "session_id": session_id, "resumed": resumed,
            "history": history, "limits": limits}


def accepted_frame(message_id: str, index: int, duplicate: bool) -> dict[str, Any]:
    return {"type": "accepted", "message_id": message_id, "index": index, "duplicate": duplicate}


def piece_frame(message_id: str, text: str) -> dict[str, Any]:
    return {"type": "piece", "message_id": message_id, "text": text}


def reply_frame(message_id: str, reply_id: str, text: str, sources: list[dict[str, Any]], latency_ms: float,
                replayed: bool) -> dict[str, Any]:
    return {"type": "reply", "message_id": message_id, "reply_id": reply_id, "text": text, "sources": sources,
            "latency_ms": latency_ms, "replayed": replayed}


PONG = {"type": "pong"}
