"""``GET /whoami``: the web page's same-origin credential check.

A browser cannot read the HTTP status of a refused WebSocket handshake (it
only sees close code 1006), so it cannot tell a wrong token from a busy or
absent server.  This plain HTTP resource answers the question the command
channel's handshake would, with the same objects (the users file, the
connection slots) and without opening a channel or taking a slot:

- 200 ``{"client": NAME}``: a handshake with this token would be accepted
  now (``"anonymous"`` without ``--users``);
- 200 ``{"client": null, "token_required": true}``: no token was sent and
  the server needs one (asking is not an error: the page asks on every load,
  and a 401 would log an error in the browser's console);
- 401: the token is wrong, or no longer valid (removed user, rotated token);
- 403: too many sign-ins are being checked at once for this token id or
  address (the handshake's answer too): wait a second and retry;
- 429: this client or address has too many connections open;
- 503: the server is stopping (``--grace``), or at its total connection limit.

The token comes only from ``Authorization: Bearer TOKEN``: never from the
query string, so it stays out of URLs.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import resource, server

from wsfiles.admission import forwarded_client
from wsfiles.command import ANONYMOUS, CommandChannelFactory
from wsfiles.users import TooManyChecks

_log = Logger()


def _client_ip(request: server.Request, trusted_proxies: tuple[str, ...]) -> str:
    """The peer's address; behind a trusted proxy, the one it forwarded for
    (the command channel's rule, so both count against the same per-IP limit)."""
    peer = getattr(request.getClientAddress(), "host", "") or ""
    forwarded = (request.getHeader(b"x-forwarded-for") or b"").decode("latin-1")
    return forwarded_client(peer, forwarded, trusted_proxies)


class WhoAmIPage(resource.Resource):
    """Would the command channel accept this token now, and if not, why not."""

    isLeaf = True

    def __init__(self, factory: CommandChannelFactory) -> None:
        super().__init__()
        self._factory = factory

    def render_GET(self, request: server.Request) -> Any:
        gone = [False]
        request.notifyFinish().addErrback(lambda _: gone.__setitem__(0, True))

        def failed(failure: Any) -> None:
            _log.failure("GET /whoami failed", failure)
            if not gone[0]:
                _answer(request, 500, {"error": "internal_error", "message": "logged"})

        Deferred.fromCoroutine(self._check(request, lambda: not gone[0])).addCallbacks(
            lambda answer: None if gone[0] else _answer(request, *answer), failed
        )
        return server.NOT_DONE_YET

    async def _check(self, request: server.Request, wanted: Any) -> tuple[int, dict[str, Any]]:
        factory = self._factory
        if factory.draining:
            return 503, {"error": "unavailable", "message": "the server is stopping"}
        users = factory.users
        ip = _client_ip(request, factory.settings.trusted_proxies)
        if users is None:
            client = ANONYMOUS
        else:
            header = (request.getHeader(b"authorization") or b"").decode("latin-1")
            if not header.strip():
                return 200, {"client": None, "token_required": True}
            scheme, _, token = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return 401, {"error": "unauthorized", "message": "send Authorization: Bearer TOKEN"}
            try:
                name = await users.authenticate(token.strip(), wanted=wanted, address=ip)
            except TooManyChecks as e:
                return 403, {"error": "too_many_sign_ins", "message": str(e)}
            if name is None:
                _log.info(
                    "GET /whoami from {peer}: wrong token", peer=str(request.getClientAddress())
                )
                return 401, {"error": "unauthorized", "message": "wrong or revoked token"}
            client = name
        refusal = factory.slots.refusal(client, ip)
        if inspect.isawaitable(refusal):
            refusal = await refusal
        if refusal is not None:
            status, reason = refusal
            code = "too_many_connections" if status == 429 else "unavailable"
            return status, {"error": code, "message": reason}
        return 200, {"client": client}


def _answer(request: server.Request, status: int, body: dict[str, Any]) -> None:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    if status == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="wsfiles"')
    request.write(json.dumps(body).encode())
    request.finish()
