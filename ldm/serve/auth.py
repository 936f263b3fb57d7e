"""HTTP basic auth on every path (API, page, static files, ComfyUI's websocket): an ASGI middleware, so nothing can be mounted around it.

`--api-auth user:pass[,user2:pass2]`, as A1111's; passwords are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import json
from hmac import compare_digest

from ldm.errors import UserError


def parse_credentials(text: str) -> dict[str, str]:
    """'user:pass,user2:pass2' -> {user: pass}; a password may contain ':' (only the first one splits)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise UserError(f"--api-auth '{item.strip()}' is not user:password (several: user:pass,user2:pass2)")
        out[user] = password
    return out


class BasicAuth:
    def __init__(self, app, credentials: dict[str, str]) -> None:
        self.app = app
        self.credentials = {u.encode(): p.encode() for u, p in credentials.items()}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket" and not self._allowed(dict(scope["headers"]).get(b"authorization", b"")):
            await send({"type": "websocket.close", "code": 1008})  # before the handshake: the client gets 403
            return
        if scope["type"] == "http" and not self._allowed(dict(scope["headers"]).get(b"authorization", b"")):
            body = json.dumps({"error": "HTTPException", "detail": "Incorrect username or password"}).encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Basic realm="ldm-serve"')]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _allowed(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, _, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        ok = False
        for u, p in self.credentials.items():  # every pair, so the time taken does not say which user exists
            ok |= compare_digest(user, u) & compare_digest(password, p)
        return ok
