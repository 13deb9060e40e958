"""``chatbot client URL``: a terminal client for the chat service, and ``ChatClient``, the protocol v1
client it is built on (the benchmarks use it too).

Interactive: a prompt per message and the reply streamed as it is generated.  Piped stdin: one
message per line in, one reply per line out.  A retryable error or a dropped connection is retried
with the same message id (the server stores each message once), reconnecting to the same session.
If that session expires while chatting, a new one starts and the message is sent again there.
Frames and error codes come from ``chatbot.serve.protocol``, the module the server uses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from chatbot.serve.protocol import SESSION_GONE, ErrorCode, hello_frame, message_frame

log = logging.getLogger(__name__)


class ChatError(RuntimeError):
    """The server answered with an error frame that retrying will not fix (or retries ran out)."""

    def __init__(self, code: str, message: str, retryable: bool = False):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.retryable = code, message, retryable


class ConnectionLost(ConnectionError):
    pass


def websocket_url(url: str) -> str:
    """http(s)://host:port[/] or ws(s)://host:port[/ws] -> the websocket endpoint."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a service URL: {url!r}; expected e.g. http://127.0.0.1:8080")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class ChatClient:
    def __init__(self, url: str, session_id: str | None = None, *, retries: int = 5,
                 http: aiohttp.ClientSession | None = None):
        self.url, self.session_id, self.retries = websocket_url(url), session_id, retries
        self.history: list[dict[str, Any]] = []  # as of the last session frame
        self.expired: list[str] = []  # sessions that expired while in use, oldest first
        self._http, self._own_http = http, http is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def __aenter__(self) -> ChatClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None

    async def _receive(self) -> dict[str, Any]:
        assert self._ws is not None
        msg = await self._ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            self._ws = None
            raise ConnectionLost(f"connection closed ({msg.type.name}, code {msg.data})")
        return json.loads(msg.data)

    async def connect(self) -> dict[str, Any]:
        """Open the socket and start (or resume) the session; returns the session frame."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        for attempt in range(self.retries + 1):
            try:
                self._ws = await self._http.ws_connect(self.url, heartbeat=30.0)
                await self._ws.send_json(hello_frame(self.session_id or None))
                frame = await self._receive()
            except (aiohttp.ClientError, ConnectionError) as e:
                log.debug("connect attempt %d failed: %s", attempt + 1, e)
                await asyncio.sleep(min(0.25 * 2**attempt, 5.0))
                continue
            if frame["type"] == "session":
                self.session_id, self.history = frame["session_id"], frame["history"]
                return frame
            if frame["type"] == "error" and frame["retryable"]:
                await self._ws.close()
                await asyncio.sleep(frame.get("retry_after_ms", 250 * 2**attempt) / 1000)
                continue
            raise ChatError(frame.get("code", "protocol"), frame.get("message", f"unexpected frame {frame}"))
        raise ChatError("unreachable", f"could not start a session at {self.url} after {self.retries + 1} attempts",
                        retryable=True)

    async def say(self, text: str, on_piece: Callable[[str], None] | None = None,
                  message_id: str | None = None) -> dict[str, Any]:
        """Send one message and return its final reply frame, streaming pieces to ``on_piece``."""
        message_id = message_id or uuid.uuid4().hex
        last_error: ChatError | None = None
        for attempt in range(self.retries + 1):
            try:
                if self._ws is None or self._ws.closed:
                    await self.connect()
                assert self._ws is not None
                await self._ws.send_json(message_frame(message_id, text))
                while True:
                    frame = await self._receive()
                    if frame.get("message_id") not in (None, message_id):
                        continue
                    if frame["type"] == "piece" and on_piece is not None:
                        on_piece(frame["text"])
                    elif frame["type"] == "reply":
                        return frame
                    elif frame["type"] == "error":
                        last_error = ChatError(frame["code"], frame["message"], frame["retryable"])
                        if frame["code"] == ErrorCode.UNKNOWN_SESSION and self.session_id:
                            # The session expired while in use: start a new one and send the message there.
                            log.warning("session %s expired; starting a new one", self.session_id)
                            self.expired.append(self.session_id)
                            self.session_id = None
                            await self._ws.close()
                            self._ws = None
                            break
                        if not frame["retryable"]:
                            raise last_error
                        await asyncio.sleep(frame.get("retry_after_ms", 250 * 2**attempt) / 1000)
                        break
            except (aiohttp.ClientError, ConnectionError) as e:
                log.debug("message %s attempt %d: %s", message_id, attempt + 1, e)
                self._ws = None
                await asyncio.sleep(min(0.25 * 2**attempt, 5.0))
        raise last_error or ChatError("unreachable", f"no reply after {self.retries + 1} attempts", retryable=True)


def add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="chat with a running service from the terminal", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="service URL, e.g. http://127.0.0.1:8080 (or ws://.../ws)")
    p.add_argument("--session", help="resume this session id (printed when a session starts)")
    p.add_argument("--retries", type=int, default=5, help="retries of a retryable error or dropped connection")
    p.set_defaults(func=run_client)


async def _chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    async with ChatClient(args.url, args.session, retries=args.retries) as client:
        print(f"session {client.session_id} (resume with --session {client.session_id})", file=sys.stderr)
        if interactive:
            for turn in client.history:
                print(f"{'you' if turn['role'] == 'user' else 'bot'}> {turn['text']}")
        announced_expiry = None
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = await asyncio.to_thread(sys.stdin.readline)  # stdin blocks; the loop keeps heartbeats going
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            streamed: list[str] = []

            def show(piece: str, streamed: list[str] = streamed) -> None:
                if interactive:
                    print(("bot> " if not streamed else "") + piece, end="", flush=True)
                streamed.append(piece)

            try:
                reply = await client.say(text, on_piece=show)
            except ChatError as e:
                print(f"\nerror: {e}", file=sys.stderr)
                if e.code in SESSION_GONE:
                    return 2
                continue
            if client.expired and client.expired[-1] != announced_expiry:
                announced_expiry = client.expired[-1]
                print(f"session {announced_expiry} expired; new session {client.session_id} "
                      f"(resume with --session {client.session_id})", file=sys.stderr)
            if not interactive:  # one reply a line, whatever the model put in it
                print(reply["text"].replace("\r", " ").replace("\n", " "), flush=True)
            elif "".join(streamed) != reply["text"]:  # replayed, or a retry after a partial stream
                print(("\n" if streamed else "") + f"bot> {reply['text']}")
            else:
                print()
            # Piped: stdout stays one reply per line, so sources go to stderr.
            print_sources(reply.get("sources") or [], sys.stdout if interactive else sys.stderr)
    return 0


def print_sources(sources: list[dict], out) -> None:
    for i, s in enumerate(sources, start=1):
        where = f" <{s['url']}>" if s.get("url") else ""
        score = f" ({s['score']:.2f})" if isinstance(s.get("score"), (int, float)) else ""
        print(f"     [{i}] {s.get('title') or s.get('id')}{where}{score}", file=out, flush=True)


def run_client(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_chat(args))
    except KeyboardInterrupt:
        return 130
