"""Who may talk to the server: the API key, the Host check, the body size limit.

- **API keys.** With keys set, every ``/v1/*`` route and ``/metrics`` require ``Authorization: Bearer
  KEY`` with one of them (compared in constant time); ``/health`` stays public. A digest of the key a
  request used is kept in its ASGI scope (``clasp_key``): cached prefixes and the suffix index's history
  are kept per key.
- **Draining.** While the server drains, new ``/v1/*`` requests get 503 ``shutting_down`` with
  ``Retry-After``, before their body is read.
- **Host check.** A server bound to loopback answers only requests addressed to a loopback name, so a
  web page cannot reach it through DNS rebinding (its requests carry the attacker's host name).
- **Body limit.** A request body larger than the limit is refused with 413 before it is read whole.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json

from .protocol import APIError, shutting_down

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, without port) is this machine's loopback interface."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host part of a ``Host`` header value (``name:port``, ``[v6]:port``)."""
    header = header.strip()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """A pure ASGI middleware that refuses requests before they reach a route (no body is read)."""

    def __init__(self, app, *, api_keys: list[str], check_host: bool, on_refuse=None, draining=None) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.check_host = check_host
        self.on_refuse = on_refuse  # called with (path, status) for each refused request
        self.draining = draining or (lambda: False)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self.refusal(scope)
        if error is None:
            return await self.app(scope, receive, send)
        if self.on_refuse is not None:
            self.on_refuse(scope.get("path", ""), error.status)
        headers = [(b"content-type", b"application/json")]
        if error.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        for name, value in (error.headers() or {}).items():
            headers.append((name.encode(), value.encode()))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(error.body()).encode()})

    def refusal(self, scope) -> APIError | None:
        headers = dict(scope.get("headers") or [])
        if self.check_host:
            host = headers.get(b"host", b"").decode("latin-1")
            if host and not is_loopback(host_name(host)):
                return APIError(
                    421,
                    f"Host {host!r} is not a loopback name; this server is bound to loopback and answers only "
                    "requests addressed to localhost (protection against DNS rebinding).",
                    code="misdirected_request",
                )
        path = scope.get("path", "")
        guarded = path.startswith("/v1/") or path == "/v1" or path == "/metrics"
        if self.keys and guarded:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            token = token.strip()
            matches = [hmac.compare_digest(token, k) for k in self.keys]  # every key compared: no timing hint
            if scheme.lower() != b"bearer" or not any(matches):
                return APIError(
                    401,
                    "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                    type_="invalid_request_error",
                    code="invalid_api_key",
                )
            # the key's digest names its scope (kept prefixes, the suffix index): stable across restarts,
            # and not the key itself
            scope["clasp_key"] = hashlib.sha256(self.keys[matches.index(True)]).hexdigest()[:16]
        if self.draining() and scope.get("method") == "POST" and path.startswith("/v1/"):
            return shutting_down()
        return None


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise APIError(400, "Content-Length is not a number.") from None
        if size > limit:
            raise APIError(
                413, f"The request body ({size} bytes) exceeds the limit of {limit} bytes.", code="body_too_large"
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body exceeds the limit of {limit} bytes.", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)
