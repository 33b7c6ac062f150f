"""Download tickets (wsfiles/downloads.py; docs/protocol.md, "Download
tickets"): the ``download`` op on real command channels and ``/d/TICKET``
over real HTTP on 127.0.0.1, against in-process servers.
"""

from __future__ import annotations

import os
from typing import Any

import pytest_twisted
from conftest import http_request, start_server
from e2e_helpers import blob, sha256, within
from test_shares import Later, ask, connect12, refused
from twisted.logger import globalLogPublisher

from wsfiles.client import PROTOCOL_11, connect
from wsfiles.users import UserDirectory, add_user


async def fetch(
    srv: Any, path: str, method: str = "GET", **headers: str
) -> tuple[int, dict, bytes]:
    status, received, body = await http_request(srv.url, path, method, **headers)
    return status, {name: values[-1] for name, values in received.items()}, body


@pytest_twisted.ensureDeferred
async def test_a_ticket_serves_one_file_with_ranges_until_it_changes_or_expires(server_factory):
    srv = await server_factory()
    data = blob(200_000, seed=3)
    await srv.put("docs/été 1.bin", data)
    await srv.put("docs/other.bin", b"other")
    client = await connect12(srv)
    reply = await ask(client, op="download", name="docs/été 1.bin")
    etag = f'"{sha256(data)}"'
    assert (reply["size"], reply["etag"], reply["sha256"]) == (len(data), etag, sha256(data))
    assert reply["url"].startswith("/d/") and reply["url"].endswith("/%C3%A9t%C3%A9%201.bin")
    ticket = reply["url"].split("/")[2]
    assert len(ticket) == 32  # 192 random bits
    assert reply["expires_at"] > srv.site.clock.seconds() + 290

    status, headers, body = await fetch(srv, reply["url"])
    assert (status, body, headers["etag"]) == (200, data, etag)
    assert headers["content-disposition"].endswith("filename*=UTF-8''%C3%A9t%C3%A9%201.bin")
    assert headers["referrer-policy"] == "no-referrer"
    status, headers, body = await fetch(srv, f"/d/{ticket}")  # the name may be left out
    assert (status, body) == (200, data)
    status, headers, body = await fetch(srv, reply["url"], "HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", str(len(data)))
    # What a browser sends to resume: a Range with If-Range of the ETag it has.
    status, headers, body = await fetch(srv, reply["url"], range="bytes=1000-", if_range=etag)
    assert (status, body) == (206, data[1000:])
    assert headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    status, _, body = await fetch(srv, reply["url"], range="bytes=1000-", if_range='"other"')
    assert (status, body) == (200, data)  # another version: the whole file
    status, _, _ = await fetch(srv, reply["url"], range=f"bytes={len(data)}-")
    assert status == 416

    # Useless for anything else: another file, a bad or unknown ticket, another method.
    assert (await fetch(srv, f"/d/{ticket}/other.bin"))[0] == 404
    assert (await fetch(srv, f"/d/{ticket}/../other.bin"))[0] == 404
    assert (await fetch(srv, reply["url"] + "/x"))[0] == 404
    assert (await fetch(srv, "/d/" + "A" * 32))[0] == 404
    assert (await fetch(srv, "/d/" + ticket[:-1]))[0] == 404
    assert (await fetch(srv, reply["url"], "POST"))[0] == 405

    # The file changes: the ticket is refused (410), even for a Range.
    await srv.put("docs/été 1.bin", data[:-1] + b"!")
    status, headers, body = await fetch(srv, reply["url"])
    assert status == 410 and b"file_changed" in body
    assert (await fetch(srv, reply["url"], range="bytes=0-9"))[0] == 410
    fresh = await ask(client, op="download", name="docs/été 1.bin")
    assert (await fetch(srv, fresh["url"]))[2] == data[:-1] + b"!"

    # Expired: 404 (the server's clock moved on by the TTL).
    srv.site.downloads.store._clock = Later(301)
    status, _, body = await fetch(srv, fresh["url"])
    assert status == 404 and b"expired" in body


@pytest_twisted.ensureDeferred
async def test_tickets_keep_to_their_client_and_are_never_logged_whole(tmp_path):
    users_path = str(tmp_path / "users")
    alice = add_user(users_path, "alice", {"read_only": "yes"})  # reading is enough
    bob = add_user(users_path, "bob")
    srv = await start_server(tmp_path / "root", users=UserDirectory(users_path))
    log: list[str] = []
    globalLogPublisher.addObserver(observer := lambda event: log.append(repr(event)))
    try:
        for name in ("alice", "bob"):
            os.makedirs(tmp_path / "root" / name / "sub")
            (tmp_path / "root" / name / "a.txt").write_bytes(name.encode())  # no recorded hash
        on_alice = await connect12(srv, alice)
        reply = await ask(on_alice, op="download", name="a.txt")
        assert reply["etag"].startswith('W/"') and "sha256" not in reply
        assert (await fetch(srv, reply["url"]))[2] == b"alice"  # no token: the ticket is it
        bobs = await ask(await connect12(srv, bob), op="download", name="a.txt")
        assert (await fetch(srv, bobs["url"]))[2] == b"bob"
        assert await refused(on_alice, op="download", name="nope") == (
            "not_found",
            "no file named 'nope'",
        )
        assert (await refused(on_alice, op="download", name="sub"))[0] == "is_a_folder"
        assert (await refused(on_alice, op="download", name="../x"))[0] == "invalid_name"
        assert (await refused(on_alice, op="download"))[0] == "bad_request"
        on_11 = await within(connect(srv.url, bob, subprotocols=PROTOCOL_11))
        srv.clients.append(on_11)
        assert (await refused(on_11, op="download", name="sub/a.txt"))[0] == "invalid_name"
        assert (await within(on_11.request({"op": "download", "name": "a.txt"})))["size"] == 3

        from wsfiles.users import editing

        with editing(users_path) as users:  # bob is removed: his tickets die with him
            users.remove("bob")
        assert (await fetch(srv, bobs["url"]))[0] == 404
        assert (await fetch(srv, reply["url"]))[0] == 200
    finally:
        globalLogPublisher.removeObserver(observer)
        await srv.stop()
    for url in (reply["url"], bobs["url"]):
        ticket = url.split("/")[2]
        assert not [line for line in log if ticket in line]  # never logged whole
        assert [line for line in log if ticket[:6] + "…" in line]


@pytest_twisted.ensureDeferred
async def test_with_redis_a_ticket_works_on_every_instance_and_fails_closed(redis_server, tmp_path):
    root = tmp_path / "shared-disk"
    a = await start_server(root, redis=redis_server.url)
    b = await start_server(root, redis=redis_server.url)
    states = [srv.site.command_factory.redis for srv in (a, b)]
    try:
        for state in states:
            state.start()
            await within(state.link.when_up())
        await a.put("a.txt", b"from a")
        on_a = await connect12(a)
        reply = await ask(on_a, op="download", name="a.txt")
        ticket = reply["url"].split("/")[2]
        assert (await fetch(b, reply["url"]))[2] == b"from a"  # issued by a, honoured by b
        keys = await within(states[0].link.command("KEYS", "*dticket*"))
        assert len(keys) == 1 and ticket not in keys[0]  # stored under its digest only

        redis_server.stop()
        for state in states:
            await within(state.link.when_down())
        status, headers, _ = await fetch(b, reply["url"])
        assert (status, headers["retry-after"]) == (503, "5")
        assert (await refused(on_a, op="download", name="a.txt"))[0] == "unavailable"
    finally:
        for srv in (a, b):
            await srv.stop()
        for state in states:
            await within(state.stop())


@pytest_twisted.ensureDeferred
async def test_a_ticket_ends_with_a_rotated_token_and_has_one_way_in(tmp_path):
    from wsfiles.users import rotate_user

    users_path = str(tmp_path / "users")
    alice = add_user(users_path, "alice")
    srv = await start_server(tmp_path / "root", users=UserDirectory(users_path))
    try:
        os.makedirs(tmp_path / "root" / "alice")
        (tmp_path / "root" / "alice" / "a.txt").write_bytes(b"alice")
        client = await connect12(srv, alice)
        url = (await ask(client, op="download", name="a.txt"))["url"]
        # /%64/ would route here too, but the access log's redaction reads the raw path.
        assert (await fetch(srv, url.replace("/d/", "/%64/", 1)))[0] == 404
        assert (await fetch(srv, url))[0] == 200
        rotate_user(users_path, "alice")  # what 'wsfiles user rotate alice' does
        assert (await fetch(srv, url))[0] == 404  # a leaked token's tickets die with it
    finally:
        await srv.stop()
