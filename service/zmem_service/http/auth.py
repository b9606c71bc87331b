"""Optional bearer tokens: a write token (everything) and a read token (reads only).

Which routes read and which write, each route declares (`edge.declare`; `edge.admit`
checks a request against it): the GET routes (export and metrics included) and the
read-only POSTs `neighbors`, `risk` and `queries` read. A browser can't add a header to an `<img>`, so
`GET /?token=…` (either token) stores a read credential in an HttpOnly cookie that
later requests carry. The cookie, and the `?token=` that set it, carry read rights
only, whichever token set them: a page elsewhere on the site can make the browser
send the cookie, so writes need the `Authorization` header. The cookie holds an
HMAC of the token, never the token itself. `/healthz` and `/readyz` are always
open. Tokens are compared in constant time and never logged (the access log drops
query strings).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..settings import ServiceSettings

COOKIE = "zmem_token"


@dataclass(frozen=True)
class Tokens:
    write: str | None
    read: str | None

    @property
    def enabled(self) -> bool:
        return self.write is not None

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Tokens:
        """Tokens from files or variables; a read token without a write token is refused."""
        write = _secret(settings.token_file, settings.token)
        read = _secret(settings.read_token_file, settings.read_token)
        if read is not None and write is None:
            raise ValueError(
                "a read token without a write token leaves writes open: set ZMEM_TOKEN (or --token-file) too"
            )
        return cls(write, read)

    def cookie_valid(self, value: str | None) -> bool:
        """Whether `value` is the dashboard cookie of one of the tokens."""
        if not value:
            return False
        return any(
            t is not None and hmac.compare_digest(value.encode(), cookie_value(t).encode())
            for t in (self.write, self.read)
        )

    def level(self, token: str | None) -> str | None:
        """ "write", "read" or None for a presented token."""
        if token is None:
            return None
        if self.write is not None and hmac.compare_digest(token.encode(), self.write.encode()):
            return "write"
        if self.read is not None and hmac.compare_digest(token.encode(), self.read.encode()):
            return "read"
        return None


def _secret(path: Path | None, value: object) -> str | None:
    if path is not None:
        text = path.read_text().strip()
        if not text:
            raise ValueError(f"token file {path} is empty")
        return text
    if value is None:
        return None
    text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    return text or None


def cookie_value(token: str) -> str:
    """The dashboard cookie for `token`: an HMAC of it, so the cookie never holds a token."""
    return hmac.new(token.encode(), b"zmem dashboard read", hashlib.sha256).hexdigest()


class CookieMiddleware:
    """Pure ASGI: adds the Set-Cookie for a token that `edge.admit` accepted from `GET /?token=…`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/":
            await self.app(scope, receive, send)
            return

        async def send_cookie(message: Message) -> None:
            token = scope.get("state", {}).get("zmem_cookie")
            if message["type"] == "http.response.start" and token:
                headers = MutableHeaders(scope=message)
                cookie = SimpleCookie()
                cookie[COOKIE] = token
                cookie[COOKIE].update({"httponly": "true", "samesite": "strict", "path": "/"})
                headers.append("set-cookie", cookie.output(header="").strip())
            await send(message)

        await self.app(scope, receive, send_cookie)
