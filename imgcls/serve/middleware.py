"""ASGI guards in front of the app: the body cap, the Host check and the same-origin check.

* :class:`BodyLimit`: 413 for a body over the cap, declared or streamed.
* :class:`TrustedHost` (Starlette's ``TrustedHostMiddleware`` with a JSON answer) answers 400
  to a request whose Host header is not a name of this server: a page on another site that
  rebinds its DNS name to 127.0.0.1 can reach the port but addresses it by its own name, so it
  can never read an answer.
* :class:`SameOrigin`: 403 for a browser request that a page of another origin sent (its
  Origin header names that page): any web page may *send* a form POST to a local server,
  and without this the server would do the work.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")  # as Host headers write them (IPv6 in brackets)
WILDCARD_BINDS = ("", "0.0.0.0", "::")


def allowed_hosts(bind: str = "127.0.0.1", extra: Iterable[str] = ()) -> list[str]:
    """The Host names the server answers to: this machine's loopback names, the address it
    binds (``--host``) and ``extra`` (``--allowed-host``). Bound to every interface, it also
    answers to the machine's own host names."""
    names = list(LOCAL_NAMES)
    if bind in WILDCARD_BINDS:
        names += [socket.gethostname(), socket.getfqdn()]
    else:
        names.append(bind)
    names += list(extra)
    return list(dict.fromkeys(_as_host_header(n) for n in names if n))


def _as_host_header(name: str) -> str:
    name = name.strip().lower()
    return f"[{name}]" if ":" in name and not name.startswith("[") else name  # an IPv6 address


async def send_json(send, status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over the limit, and for a body
    that grows past it while streaming (chunked uploads declare no length)."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await send_json(send, 413, {"detail": f"request body of {int(declared) / 2**20:.1f} MiB is "
                                                         f"over the {self.max_body / 2**20:.1f} MiB limit"})
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, f"request body is over the {self.max_body / 2**20:.1f} MiB limit")
            return msg

        return await self.app(scope, limited, send)


class TrustedHost:
    """ASGI middleware: Starlette's TrustedHostMiddleware decides (its Host parsing and name
    patterns), but a refusal is the one-line JSON ``detail`` every other refusal is, with the
    way to allow the name, instead of its plain-text "Invalid host header". The answer never
    lists the names allowed: a page that rebinds its DNS name can read it."""

    PASSED = "imgcls.host_ok"  # set in the scope when the request reached the app

    def __init__(self, app, allowed_hosts: Iterable[str]):
        self.app = app
        self.check = TrustedHostMiddleware(self._passed, allowed_hosts=list(allowed_hosts), www_redirect=False)

    async def _passed(self, scope, receive, send):
        scope[self.PASSED] = True
        await self.app(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.check(scope, receive, send)

        async def send_or_refuse(message):
            if scope.get(self.PASSED):
                return await send(message)
            if message["type"] == "http.response.start":  # the check's own 400: say it our way
                await send_json(send, 400, {"detail": self._refusal(scope)})

        await self.check(scope, receive, send_or_refuse)

    @staticmethod
    def _refusal(scope) -> str:
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").strip()
        if host.startswith("["):  # an IPv6 address, [::1]:8000
            name = host.split("]", 1)[0] + "]"
        else:
            name = host.rsplit(":", 1)[0]  # without the port
        name = "".join(c for c in name if c.isprintable())[:100]
        if not name:
            return "the request has no valid Host header (send the server's name or address as Host)"
        return (f"this server does not answer requests addressed to {name!r} (start imgcls serve with "
                f"--allowed-host {name} if clients use that name)")


class SameOrigin:
    """ASGI middleware: a request that carries an Origin header (browsers send one with every
    POST) must come from a page of this server, i.e. name the host it is addressed to."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin")
        if origin is not None:
            netloc = urlsplit(origin.decode("latin-1")).netloc.lower() if origin != b"null" else "null"
            if netloc != headers.get(b"host", b"").decode("latin-1").lower():
                return await send_json(send, 403, {"detail": f"cross-origin request refused: a page of "
                                                             f"{origin.decode('latin-1')[:100]!r} may not use this "
                                                             "server (only its own page at / may)"})
        return await self.app(scope, receive, send)
