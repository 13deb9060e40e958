"""The SSA rating form: an aiohttp app factory that ``chatbot eval rate`` and the tests both call.

Pages are static files (``eval/static``) whose script renders every text with ``textContent``: model
output and imported transcripts are untrusted and never become markup.  The JSON API:

    GET  /api/csrf          a sign-in CSRF token (also set as an HttpOnly cookie: double submit)
    POST /api/login         {"token"} -> a session cookie and the session's CSRF token
    POST /api/logout
    GET  /api/me            who is signed in, and the session's CSRF token (same-origin readers only)
    GET  /api/next          the rater's one open item (or interactive session) and their progress
    POST /api/answer        {"item_id", "sensible", "specific"} for the open item -> the next one
    POST /api/undo          withdraw the latest answer; its item is open again
    POST /api/chat          {"text"}: a turn of the rater's interactive session, the bot's reply back
    GET  /api/admin/status  progress per system and rater, sets, sessions, agreement so far
    POST /api/admin/raters  {"name"} -> {"id", "token"} (the token is shown this once)
    POST /api/admin/sets    {"set": <rating set JSON>} -> items added
    POST /api/admin/chats   {"rater_id", "system", "turns"}: start an interactive session
    GET  /api/admin/export.csv   system,item_id,rater_id,sensible,specific

Every POST needs a JSON body, the session's (or for sign-in the cookie's) CSRF token in X-CSRF-Token,
and, when the browser sends one, an Origin equal to this server's.  Every response carries a CSP
without inline script, nosniff and frame-ancestors 'none'.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from eval.itemset import SetError, parse_set
from eval.ratings import write_ratings_csv
from eval.ratings_db import RatingError, RatingsDB
from eval.scores import agreement, item_labels

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"rate.js": "text/javascript", "admin.js": "text/javascript", "common.js": "text/javascript",
                "style.css": "text/css"}
SESSION_COOKIE, LOGIN_CSRF_COOKIE = "ssa_session", "ssa_login_csrf"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin"}
STATUS_OF = {"bad_request": 400, "unauthorized": 401, "csrf": 403, "forbidden": 403, "not_found": 404,
             "already_answered": 409, "not_assigned": 409, "nothing_to_undo": 409, "conflict": 409, "busy": 409}
MAX_CHAT_TEXT = 1000


@dataclass(frozen=True)
class RateConfig:
    host: str = "127.0.0.1"
    port: int = 8090
    db_path: str = "ratings.sqlite"
    raters_per_item: int = 5  # Meena: 5 crowd workers per response
    lease_s: float = 3600.0  # an item assigned to a rater who went away is offered to others after this
    session_max_age_s: float = 12 * 3600.0  # a sign-in lasts a working day; then the rater signs in again
    max_body_bytes: int = 32 * 1024 * 1024  # a set upload
    # Interactive sessions: system name -> model directory (None: the shipped model).
    chat_models: dict[str, str | None] = field(default_factory=dict)
    chat_turns: int = 14  # Meena: 14 to 28 turns, both sides
    num_candidates: int = 20
    max_new_tokens: int = 40

    def __post_init__(self) -> None:
        if self.session_max_age_s <= 0:
            raise ValueError("--session-max-age must be > 0 seconds")
        if self.raters_per_item < 1:
            raise ValueError("--raters-per-item must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError("--port must be in 0..65535")
        if self.chat_turns < 2 or self.chat_turns % 2:
            raise ValueError("--chat-turns must be an even number >= 2 (each rater message gets a reply)")


CONFIG = web.AppKey("config", RateConfig)
DB = web.AppKey("db", RatingsDB)
ENGINES = web.AppKey("engines", dict)
CHAT_BUSY = web.AppKey("chat_busy", set)


# ------------------------------------------------------------------------------------ middleware

def _json_error(code: str, message: str) -> web.HTTPException:
    """A typed error: HTTP status by code, body {"error": code, "message": ...}."""
    exc = web.HTTPException(text=json.dumps({"error": code, "message": message}), content_type="application/json")
    exc.set_status(STATUS_OF.get(code, 400))
    return exc


@web.middleware
async def security_headers(request: web.Request, handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    except Exception:  # a bug: a typed 500 that still carries the headers (details go to the log only)
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = web.json_response({"error": "internal", "message": "internal error"}, status=500)
    response.headers.update(SECURITY_HEADERS)
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"
    return response


@web.middleware
async def typed_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RatingError as e:
        raise _json_error(e.code, str(e)) from None
    except SetError as e:
        raise _json_error("bad_request", str(e)) from None


def session_of(request: web.Request):
    sid = request.cookies.get(SESSION_COOKIE)
    return (sid, request.app[DB].session(sid, request.app[CONFIG].session_max_age_s)) if sid else (None, None)


def require(request: web.Request, role: str):
    _, session = session_of(request)
    if session is None:
        raise _json_error("unauthorized", "sign in with your token first")
    if session.role != role:
        raise _json_error("forbidden", f"this needs a {role} sign-in")
    return session


def same_origin(request: web.Request) -> None:
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise _json_error("csrf", "cross-origin request refused")


def check_csrf(request: web.Request, expected: str | None) -> None:
    sent = request.headers.get("X-CSRF-Token", "")
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise _json_error("csrf", "missing, stale or wrong CSRF token; reload the page")


async def json_body(request: web.Request) -> dict:
    if request.content_type != "application/json":
        raise _json_error("bad_request", "send a JSON body (Content-Type: application/json)")
    try:
        body = await request.json()
    except ValueError:
        raise _json_error("bad_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _json_error("bad_request", "the body must be a JSON object")
    return body


async def state_change(request: web.Request, role: str) -> tuple:
    """The checks of every state-changing request: origin, session of ``role``, CSRF, JSON body."""
    same_origin(request)
    session = require(request, role)
    check_csrf(request, session.csrf)
    return session, await json_body(request)


def field_of(body: dict, name: str, kind: type | tuple):
    if name not in body:
        raise _json_error("bad_request", f"missing field {name!r}")
    value = body[name]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise _json_error("bad_request", f"field {name!r} has the wrong type")
    return value


# ----------------------------------------------------------------------------------------- pages

async def rate_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "rate.html", headers={"Cache-Control": "no-cache"})


async def admin_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "admin.html", headers={"Cache-Control": "no-cache"})


async def static_file(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name, headers={"Content-Type": STATIC_FILES[name], "Cache-Control": "no-cache"})


# ------------------------------------------------------------------------------------ sign-in API

def set_cookie(response: web.Response, name: str, value: str) -> None:
    response.set_cookie(name, value, httponly=True, samesite="Strict", path="/",
                        secure=False)  # served over loopback or behind a TLS proxy that sets Secure


async def login_csrf(request: web.Request) -> web.Response:
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    response = web.json_response({"csrf": token})
    set_cookie(response, LOGIN_CSRF_COOKIE, token)
    return response


async def login(request: web.Request) -> web.Response:
    same_origin(request)
    check_csrf(request, request.cookies.get(LOGIN_CSRF_COOKIE))
    token = field_of(await json_body(request), "token", str).strip()
    db = request.app[DB]
    if db.is_admin_token(token):
        role, rater_id = "admin", None
    else:
        rater_id = db.rater_for_token(token)
        if rater_id is None:
            raise _json_error("unauthorized", "unknown token")
        role = "rater"
    old_sid, _ = session_of(request)
    if old_sid:
        db.delete_session(old_sid)
    sid, csrf = db.create_session(role, rater_id, request.app[CONFIG].session_max_age_s)
    response = web.json_response({"role": role, "rater_id": rater_id, "csrf": csrf})
    set_cookie(response, SESSION_COOKIE, sid)
    return response


async def logout(request: web.Request) -> web.Response:
    same_origin(request)
    sid, session = session_of(request)
    if session is None:
        raise _json_error("unauthorized", "not signed in")
    check_csrf(request, session.csrf)
    request.app[DB].delete_session(sid)
    response = web.json_response({"ok": True})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def me(request: web.Request) -> web.Response:
    _, session = session_of(request)
    if session is None:
        raise _json_error("unauthorized", "not signed in")
    return web.json_response({"role": session.role, "rater_id": session.rater_id, "csrf": session.csrf})


# -------------------------------------------------------------------------------------- rater API

def rater_state(app: web.Application, rater_id: str) -> dict:
    db, cfg = app[DB], app[CONFIG]
    chat = db.open_chat(rater_id)
    item = None if chat else db.current_item(rater_id, cfg.raters_per_item, cfg.lease_s)
    return {"chat": chat.to_dict() if chat else None,
            "item": {"id": item.id, "context": list(item.context), "response": item.response} if item else None,
            "progress": db.progress(rater_id, cfg.raters_per_item, cfg.lease_s),
            "can_undo": db.has_answers(rater_id)}


async def next_item(request: web.Request) -> web.Response:
    session = require(request, "rater")
    return web.json_response(rater_state(request.app, session.rater_id))


async def answer(request: web.Request) -> web.Response:
    session, body = await state_change(request, "rater")
    iid = field_of(body, "item_id", str)
    sensible = field_of(body, "sensible", bool)
    specific = field_of(body, "specific", bool) if sensible else bool(body.get("specific") or False)
    if not sensible and specific:
        raise _json_error("bad_request", "a response that is not sensible cannot be specific")
    request.app[DB].answer(session.rater_id, iid, sensible, specific)  # committed before we answer
    return web.json_response({"ok": True, **rater_state(request.app, session.rater_id)})


async def undo(request: web.Request) -> web.Response:
    session, _ = await state_change(request, "rater")
    request.app[DB].undo(session.rater_id)
    return web.json_response({"ok": True, **rater_state(request.app, session.rater_id)})


async def chat_turn(request: web.Request) -> web.Response:
    session, body = await state_change(request, "rater")
    text = field_of(body, "text", str).strip()
    if not text or len(text) > MAX_CHAT_TEXT:
        raise _json_error("bad_request", f"a message is 1 to {MAX_CHAT_TEXT} characters")
    db, app = request.app[DB], request.app
    chat = db.open_chat(session.rater_id)
    if chat is None:
        raise _json_error("not_found", "you have no open interactive session")
    if not chat.history and text != "Hi!":
        raise _json_error("bad_request", 'an interactive session opens with "Hi!" (Meena\'s protocol)')
    engine = app[ENGINES].get(chat.system)
    if engine is None:
        raise _json_error("conflict", f"system {chat.system!r} is not loaded in this server (see --chat-model)")
    if chat.id in app[CHAT_BUSY]:
        raise _json_error("busy", "the bot is still replying to your previous message")
    app[CHAT_BUSY].add(chat.id)
    try:
        from chatbot.generate import DecodingConfig
        from chatbot.ranking import served_min_new_tokens

        cfg = app[CONFIG]
        decoding = DecodingConfig(num_candidates=cfg.num_candidates, max_new_tokens=cfg.max_new_tokens,
                                  min_new_tokens=served_min_new_tokens(cfg.max_new_tokens))
        reply = (await asyncio.to_thread(engine.reply, [[*chat.history, text]], decoding))[0]
        chat = db.extend_chat(chat, text, reply.text or "...")
    finally:
        app[CHAT_BUSY].discard(chat.id)
    return web.json_response({"chat": chat.to_dict(), **rater_state(app, session.rater_id)})


# -------------------------------------------------------------------------------------- admin API

async def admin_status(request: web.Request) -> web.Response:
    require(request, "admin")
    db, cfg = request.app[DB], request.app[CONFIG]
    ratings = db.ratings()
    status = db.status(cfg.raters_per_item)
    status["agreement"] = agreement(ratings, item_labels(ratings)) if ratings else None
    status["chat_systems"] = sorted(request.app[ENGINES])
    status["chat_turns"] = cfg.chat_turns
    return web.json_response(status)


async def admin_create_rater(request: web.Request) -> web.Response:
    _, body = await state_change(request, "admin")
    rater_id, token = request.app[DB].create_rater(field_of(body, "name", str))
    return web.json_response({"id": rater_id, "token": token})


async def admin_load_set(request: web.Request) -> web.Response:
    _, body = await state_change(request, "admin")
    rating_set = parse_set(field_of(body, "set", dict), "uploaded set")
    added = request.app[DB].load_set(rating_set)
    return web.json_response({"name": rating_set.name, "items": len(rating_set.items), "added": added})


async def admin_start_chat(request: web.Request) -> web.Response:
    _, body = await state_change(request, "admin")
    cfg = request.app[CONFIG]
    system = field_of(body, "system", str)
    if system not in request.app[ENGINES]:
        raise _json_error("bad_request", f"no chat system {system!r}; loaded: {', '.join(sorted(request.app[ENGINES])) or 'none'}")
    turns = body.get("turns", cfg.chat_turns)
    if not isinstance(turns, int) or isinstance(turns, bool) or not 2 <= turns <= 100 or turns % 2:
        raise _json_error("bad_request", "turns must be an even number in 2..100 (Meena: 14 to 28)")
    chat_id = request.app[DB].create_chat(field_of(body, "rater_id", str), system, turns)
    return web.json_response({"id": chat_id})


async def admin_export(request: web.Request) -> web.Response:
    require(request, "admin")
    out = io.StringIO()
    write_ratings_csv(request.app[DB].ratings(), out)
    return web.Response(text=out.getvalue(), content_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="ratings.csv"'})


# ---------------------------------------------------------------------------------------- the app

async def db_ctx(app: web.Application) -> AsyncIterator[None]:
    app[DB] = RatingsDB(app[CONFIG].db_path)
    yield
    app[DB].close()


def load_chat_engines(models: dict[str, str | None]) -> dict:
    from chatbot.generate import ReplyEngine
    from chatbot.modeldir import load_model

    engines = {}
    for name, directory in models.items():
        loaded = load_model(directory)
        engines[name] = ReplyEngine(loaded.model, loaded.tokenizer)
    return engines


def engines_ctx(engines: dict | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # Loading takes seconds of CPU: a thread keeps the loop responsive.
        app[ENGINES] = engines if engines is not None else await asyncio.to_thread(load_chat_engines, app[CONFIG].chat_models)
        yield
    return ctx


def create_app(config: RateConfig | None = None, *, engines: dict | None = None) -> web.Application:
    """Build the rating form.  ``engines``: system name -> a loaded ReplyEngine for interactive
    sessions (tests pass their own); None loads ``config.chat_models`` during startup."""
    config = config or RateConfig()
    app = web.Application(middlewares=[security_headers, typed_errors], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[CHAT_BUSY] = set()
    app.cleanup_ctx.extend([db_ctx, engines_ctx(engines)])
    app.router.add_get("/", rate_page)
    app.router.add_get("/admin", admin_page)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/api/csrf", login_csrf)
    app.router.add_post("/api/login", login)
    app.router.add_post("/api/logout", logout)
    app.router.add_get("/api/me", me)
    app.router.add_get("/api/next", next_item)
    app.router.add_post("/api/answer", answer)
    app.router.add_post("/api/undo", undo)
    app.router.add_post("/api/chat", chat_turn)
    app.router.add_get("/api/admin/status", admin_status)
    app.router.add_post("/api/admin/raters", admin_create_rater)
    app.router.add_post("/api/admin/sets", admin_load_set)
    app.router.add_post("/api/admin/chats", admin_start_chat)
    app.router.add_get("/api/admin/export.csv", admin_export)
    return app


async def start_runner(config: RateConfig, *, engines: dict | None = None, port: int | None = None) -> web.AppRunner:
    """Start listening on ``config.host`` and ``port`` (default ``config.port``; 0 picks a free one)."""
    runner = web.AppRunner(create_app(config, engines=engines), access_log=None)
    await runner.setup()
    port = config.port if port is None else port
    try:
        await web.TCPSite(runner, config.host, port).start()
    except OSError as e:
        await runner.cleanup()
        raise RuntimeError(f"cannot listen on {config.host}:{port}: {e.strerror}; pick another --port") from e
    return runner
