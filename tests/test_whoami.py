"""``GET /whoami``: the page's same-origin credential check (docs/protocol.md,
Authentication), over real HTTP against a server on loopback.

It must give the answer the command channel's handshake would give, so a
browser (which sees only 1006 for a refused handshake) can tell a wrong token
(ask for another) from a busy or stopping server (try again later).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest_twisted
from conftest import handshake_status, http_request
from twisted.internet import defer

from wsfiles.admission import Limits
from wsfiles.users import CHECKS_PER_TOKEN_ID, SCRYPT_AT_ONCE, UserDirectory, add_user


async def whoami(srv: Any, token: str | None = None, path: str = "/whoami", **headers: str):
    """(status, JSON body, headers by lower-case name) of ``GET /whoami`` over HTTP/1.0."""
    status, received, body = await http_request(
        srv.url, path, token=token, version="1.0", **headers
    )
    return status, json.loads(body), received


def users_with(tmp_path: Path, *names: str) -> tuple[UserDirectory, dict[str, str], Path]:
    path = tmp_path / "users"
    tokens = {name: add_user(str(path), name) for name in names}
    return UserDirectory(str(path)), tokens, path


@pytest_twisted.ensureDeferred
async def test_without_users_everyone_is_anonymous(server_factory):
    srv = await server_factory()
    status, body, headers = await whoami(srv)
    assert (status, body) == (200, {"client": "anonymous"})
    assert headers["cache-control"] == ["no-store"]
    assert headers["content-type"] == ["application/json"]


@pytest_twisted.ensureDeferred
async def test_a_good_token_names_its_client_and_a_wrong_one_is_401(server_factory, tmp_path):
    users, tokens, _ = users_with(tmp_path, "alice")
    srv = await server_factory(users=users)
    assert (await whoami(srv, tokens["alice"]))[:2] == (200, {"client": "alice"})
    status, body, headers = await whoami(srv, tokens["alice"] + "0")
    assert status == 401
    assert body["error"] == "unauthorized"
    assert headers["www-authenticate"] == ['Bearer realm="wsfiles"']
    # The handshake agrees.
    wrong = {"Authorization": [f"Bearer {tokens['alice']}0"]}
    assert await handshake_status(srv.url, "/command", wrong) == 401


@pytest_twisted.ensureDeferred
async def test_asking_without_a_token_is_not_an_error(server_factory, tmp_path):
    """A page asks on every load; a 401 would log an error in the browser's console."""
    users, tokens, _ = users_with(tmp_path, "alice")
    srv = await server_factory(users=users)
    status, body, _ = await whoami(srv)
    assert (status, body) == (200, {"client": None, "token_required": True})
    # A token in the query string is not read: tokens stay out of URLs.
    _, body, _ = await whoami(srv, path="/whoami?token=" + tokens["alice"])
    assert body["client"] is None
    # Another scheme is a wrong credential, not a missing one.
    status, _, _ = await whoami(srv, Authorization=f"Basic {tokens['alice']}")
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_a_revoked_token_is_401(server_factory, tmp_path):
    users, tokens, path = users_with(tmp_path, "alice", "bob")
    srv = await server_factory(users=users)
    assert (await whoami(srv, tokens["alice"]))[0] == 200
    kept = [line for line in path.read_text().splitlines() if not line.startswith("alice ")]
    path.write_text("\n".join(kept) + "\n")
    assert (await whoami(srv, tokens["alice"]))[0] == 401
    assert (await whoami(srv, tokens["bob"]))[:2] == (200, {"client": "bob"})


@pytest_twisted.ensureDeferred
async def test_too_many_connections_is_429_not_a_login(server_factory, tmp_path):
    users, tokens, _ = users_with(tmp_path, "alice", "bob")
    srv = await server_factory(users=users, limits=Limits(per_client=1))
    client = await srv.connect(tokens["alice"])
    status, body, _ = await whoami(srv, tokens["alice"])
    assert (status, body["error"]) == (429, "too_many_connections")
    assert (await whoami(srv, tokens["bob"]))[0] == 200  # only alice is at her limit
    await srv.close_client(client)
    assert (await whoami(srv, tokens["alice"]))[:2] == (200, {"client": "alice"})


@pytest_twisted.ensureDeferred
async def test_asking_takes_no_connection_slot(server_factory):
    srv = await server_factory(limits=Limits(total=1))
    for _ in range(3):
        assert (await whoami(srv))[0] == 200
    client = await srv.connect()
    assert client.hello["client"] == "anonymous"
    # Now the server is full: 503, as the handshake would answer.
    status, body, _ = await whoami(srv)
    assert (status, body["error"]) == (503, "unavailable")
    assert await handshake_status(srv.url, "/command") == 503


@pytest_twisted.ensureDeferred
async def test_too_many_sign_ins_at_once_is_403_as_in_the_handshake(server_factory, tmp_path):
    users, tokens, _ = users_with(tmp_path, "alice")
    srv = await server_factory(users=users)
    # Hold the scrypt workers, so that the checks below stay pending.
    for _ in range(SCRYPT_AT_ONCE):
        await users._scrypt_slots.acquire()
    wrongs = [tokens["alice"] + str(i) for i in range(CHECKS_PER_TOKEN_ID)]
    held = [users.authenticate(wrong) for wrong in wrongs]
    status, body, _ = await whoami(srv, tokens["alice"])
    assert (status, body["error"]) == (403, "too_many_sign_ins")
    header = {"Authorization": [f"Bearer {tokens['alice']}"]}
    assert await handshake_status(srv.url, "/command", header) == 403
    for _ in range(SCRYPT_AT_ONCE):
        users._scrypt_slots.release()
    assert await defer.gatherResults(held) == [None] * CHECKS_PER_TOKEN_ID
    assert (await whoami(srv, tokens["alice"]))[:2] == (200, {"client": "alice"})


@pytest_twisted.ensureDeferred
async def test_a_stopping_server_is_503(server_factory):
    srv = await server_factory()
    srv.site.command_factory.draining = True  # what a graceful stop (SIGTERM, --grace) sets
    status, body, _ = await whoami(srv)
    assert (status, body["error"]) == (503, "unavailable")


@pytest_twisted.ensureDeferred
async def test_twistd_serves_whoami(twistd_factory, tmp_path):
    """The real service (twistd wsfiles --users) has the resource wired in."""
    path = tmp_path / "users"
    token = add_user(str(path), "alice")
    srv = await twistd_factory("--users", str(path))
    assert (await whoami(srv, token))[:2] == (200, {"client": "alice"})
    assert (await whoami(srv, "0123456789abcdef.nope"))[0] == 401
