"""An HTTP client of the rating form that goes through exactly what a browser does: the sign-in CSRF
token, the session cookie, the session's CSRF token on every POST, one item at a time.  Simulated
raters, the example report and the tests use it."""

from __future__ import annotations

import aiohttp


class FormError(RuntimeError):
    """The form refused a request; ``code`` is its typed error ("csrf", "not_assigned", ...)."""

    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code = status, code


class RatingClient:
    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        # unsafe=True: keep cookies from an IP-address host such as 127.0.0.1.
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf: str | None = None
        self.role: str | None = None

    async def __aenter__(self) -> "RatingClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.close()

    async def request(self, method: str, path: str, body: dict | None = None, *, csrf: str | None = None):
        headers = {}
        if method != "GET":
            headers["X-CSRF-Token"] = self.csrf if csrf is None else csrf
        async with self.http.request(method, self.base_url + path, json=body if method != "GET" else None,
                                     headers=headers) as resp:
            if resp.content_type == "text/csv":
                data = await resp.text()
            else:
                data = await resp.json(content_type=None)
            if resp.status >= 400:
                data = data if isinstance(data, dict) else {}
                raise FormError(resp.status, data.get("error"), data.get("message", ""))
            return data

    async def sign_in(self, token: str) -> dict:
        self.csrf = (await self.request("GET", "/api/csrf"))["csrf"]
        session = await self.request("POST", "/api/login", {"token": token})
        self.csrf, self.role = session["csrf"], session["role"]
        return session

    # rater
    async def next(self) -> dict:
        return await self.request("GET", "/api/next")

    async def answer(self, item_id: str, sensible: bool, specific: bool) -> dict:
        return await self.request("POST", "/api/answer", {"item_id": item_id, "sensible": sensible, "specific": specific})

    async def undo(self) -> dict:
        return await self.request("POST", "/api/undo", {})

    async def chat(self, text: str) -> dict:
        return await self.request("POST", "/api/chat", {"text": text})

    # admin
    async def create_rater(self, name: str) -> dict:
        return await self.request("POST", "/api/admin/raters", {"name": name})

    async def load_set(self, set_dict: dict) -> dict:
        return await self.request("POST", "/api/admin/sets", {"set": set_dict})

    async def start_chat(self, rater_id: str, system: str, turns: int) -> dict:
        return await self.request("POST", "/api/admin/chats", {"rater_id": rater_id, "system": system, "turns": turns})

    async def status(self) -> dict:
        return await self.request("GET", "/api/admin/status")

    async def export_csv(self) -> str:
        return await self.request("GET", "/api/admin/export.csv")
