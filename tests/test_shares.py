"""Share links (wsfiles/shares.py; docs/protocol.md, "Share links").

Ops and refusals on real command channels; ``/s/ID`` with real HTTP on
127.0.0.1 (in-process servers, and curl/wget against a real twistd); the
Redis store across two in-process sites, and fail-closed when Redis is down.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import BIN, run_process, start_server
from e2e_helpers import within
from twisted.internet import reactor

from wsfiles.client import COMMAND_SUBPROTOCOLS, PROTOCOL_11, WsfilesError, connect
from wsfiles.shares import AddressBuckets, redact_share_uri
from wsfiles.users import add_user

CURL = shutil.which("curl")
WGET = shutil.which("wget")


# -- helpers -----------------------------------------------------------------------


class Later:
    """A clock ``shift`` seconds ahead of the reactor's: expiry without waiting."""

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift

    def seconds(self) -> float:
        return reactor.seconds() + self.shift


class Frozen:
    """A clock that never moves: token buckets that never refill during a test."""

    def __init__(self) -> None:
        self.now = reactor.seconds()

    def seconds(self) -> float:
        return self.now


def http_base(srv: Any) -> str:
    return srv.url.replace("ws://", "http://")


async def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    """(status, headers, body) of one request on its own connection."""
    sent = {name: [value] for name, value in (headers or {}).items()}
    response = await within(treq.request(method, url, headers=sent, persistent=False))
    body = await within(treq.content(response))
    return response.code, response.headers, body


async def raw_get(srv: Any, target: str) -> tuple[int, bytes]:
    """A request line sent as is (no client-side normalisation of ``..``)."""
    host, port = srv.url.split("://")[1].rsplit(":", 1)

    def exchange() -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"GET {target} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode("latin-1"))
            data = b""
            while chunk := s.recv(65536):  # bounded: the server closes (HTTP/1.0)
                data += chunk
        return data

    from twisted.internet.threads import deferToThread

    data = await within(deferToThread(exchange))
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def connect12(srv: Any, token: str | None = None) -> Any:
    client = await within(connect(srv.url, token, subprotocols=COMMAND_SUBPROTOCOLS))
    srv.clients.append(client)
    return client


async def ask(client: Any, **command: Any) -> dict[str, Any]:
    return await within(client.request(command))


async def refused(client: Any, **command: Any) -> tuple[str, str]:
    with pytest.raises(WsfilesError) as error:
        await within(client.request(command))
    return error.value.code, error.value.message


def basic(password: str, user: str = "") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# -- the ops -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_share_ops_list_revoke_and_refuse_clearly(server_factory):
    srv = await server_factory()
    await srv.put("report.pdf", b"%PDF")
    client = await connect12(srv)
    await ask(client, op="mkdir", path="docs/deep", parents=True)

    shared = await ask(client, op="share", path="report.pdf", expires=3600, max_downloads=3)
    assert shared["op"] == "shared" and shared["kind"] == "file"
    assert shared["url"] == f"/s/{shared['share']}" and len(shared["share"]) >= 22
    assert shared["expires_at"] == pytest.approx(shared["created_at"] + 3600)
    assert (shared["max_downloads"], shared["downloads"], shared["password"]) == (3, 0, False)
    folder = await ask(client, op="share", path="docs")  # the default expiry: 1 day
    assert folder["kind"] == "folder"
    assert folder["expires_at"] == pytest.approx(folder["created_at"] + 86400)
    other = await ask(client, op="share", path="report.pdf")
    assert len({shared["share"], folder["share"], other["share"]}) == 3

    listed = await ask(client, op="shares")
    assert [s["share"] for s in listed["shares"]] == [
        shared["share"],
        folder["share"],
        other["share"],
    ]
    assert (listed["default_expires"], listed["max_expires"]) == (86400, 30 * 86400)

    assert (await refused(client, op="share", path="nothing.txt"))[0] == "not_found"
    assert (await refused(client, op="share", path="report.pdf/x"))[0] == "not_found"
    assert (await refused(client, op="share", path="../etc"))[0] == "invalid_name"
    code, message = await refused(client, op="share", path="report.pdf", expires=31 * 86400)
    assert code == "bad_request" and "--share-max-ttl" in message
    for bad in ({"expires": 0}, {"expires": "1d"}, {"max_downloads": 0}, {"password": 7}):
        assert (await refused(client, op="share", path="report.pdf", **bad))[0] == "bad_request"
    assert (await refused(client, op="unshare", share="x" * 24))[0] == "not_found"
    assert (await refused(client, op="unshare"))[0] == "bad_request"

    revoked = await ask(client, op="unshare", share=folder["share"])
    assert revoked == {"op": "unshared", "share": folder["share"], "id": revoked["id"]}
    listed = await ask(client, op="shares")
    assert [s["share"] for s in listed["shares"]] == [shared["share"], other["share"]]

    # A 1.1 channel shares files of its top folder, never a folder.
    flat = await within(connect(srv.url, subprotocols=PROTOCOL_11))
    srv.clients.append(flat)
    assert (await ask(flat, op="share", path="report.pdf"))["kind"] == "file"
    assert (await refused(flat, op="share", path="docs"))[0] == "not_found"
    assert (await refused(flat, op="share", path="docs/deep"))[0] == "invalid_name"


@pytest_twisted.ensureDeferred
async def test_a_client_sees_and_revokes_only_its_own_shares(tmp_path):
    users = tmp_path / "users"
    alice, bob = add_user(str(users), "alice"), add_user(str(users), "bob")
    from wsfiles.users import UserDirectory

    srv = await start_server(tmp_path / "root", users=UserDirectory(str(users)))
    try:
        a = await connect12(srv, alice)
        b = await connect12(srv, bob)
        await within(a.upload("mine.txt", __import__("io").BytesIO(b"alice's")))
        shared = await ask(a, op="share", path="mine.txt")
        assert (await ask(b, op="shares"))["shares"] == []
        assert (await refused(b, op="unshare", share=shared["share"]))[0] == "not_found"
        # bob's own "mine.txt" does not exist: a share names the sharer's file.
        assert (await refused(b, op="share", path="mine.txt"))[0] == "not_found"
        assert (await fetch(http_base(srv) + shared["url"], "HEAD"))[0] == 200
        from wsfiles.users import editing

        with editing(str(users)) as text:  # what 'wsfiles user remove alice' does
            text.remove("alice")
        assert (await fetch(http_base(srv) + shared["url"], "HEAD"))[0] == 404  # at once
    finally:
        await srv.stop()


# -- /s/ID: expiry, revocation, passwords, limits ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_link_dies_at_expiry_and_at_once_when_revoked(server_factory):
    srv = await server_factory()
    await srv.put("a.txt", b"hello")
    client = await connect12(srv)
    first = await ask(client, op="share", path="a.txt", expires=60)
    second = await ask(client, op="share", path="a.txt", expires=600)
    base = http_base(srv)
    assert (await fetch(base + first["url"], "HEAD"))[0] == 200

    await ask(client, op="unshare", share=second["share"])
    status, _, body = await fetch(base + second["url"])
    assert status == 404 and b"expired or revoked" in body

    srv.site.shares.clock = later = Later(61)
    srv.site.shares.store._clock = later
    assert (await fetch(base + first["url"]))[0] == 404
    assert (await ask(client, op="shares"))["shares"] == []
    # A well-formed ID that was never issued, and a malformed one: 404 alike.
    assert (await fetch(base + "/s/" + "A" * 24))[0] == 404
    assert (await fetch(base + "/s/short"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_a_password_is_asked_for_checked_and_wrong_guesses_are_throttled(server_factory):
    srv = await server_factory()
    await srv.put("secret.txt", b"s3cret")
    client = await connect12(srv)
    shared = await ask(client, op="share", path="secret.txt", password="horse battery")
    assert shared["password"] is True
    url = http_base(srv) + shared["url"]
    stored = json.loads((srv.root / ".wsfiles-shares.json").read_text())["shares"]
    assert "horse" not in json.dumps(stored) and stored[0]["password"].startswith("scrypt$")

    status, headers, _ = await fetch(url, "HEAD")
    assert status == 401
    assert headers.getRawHeaders("www-authenticate") == [
        'Basic realm="wsfiles share", charset="UTF-8"'
    ]
    assert (await fetch(url, "HEAD", basic("horse battery", "anyone")))[0] == 200
    srv.site.shares.passwords.by_address = AddressBuckets(5 / 60, 5, Frozen())
    for _ in range(5):
        assert (await fetch(url, "HEAD", basic("wrong")))[0] == 401
    status, headers, _ = await fetch(url, "HEAD", basic("wrong"))
    assert status == 429 and headers.getRawHeaders("retry-after") == ["60"]
    # Throttled even with the right one, until the minute refills: guesses
    # cannot be told apart from it.
    assert (await fetch(url, "HEAD", basic("horse battery")))[0] == 429


@pytest_twisted.ensureDeferred
async def test_requests_past_the_per_address_rate_get_429(server_factory):
    srv = await server_factory()
    await srv.put("a.txt", b"x")
    client = await connect12(srv)
    shared = await ask(client, op="share", path="a.txt")
    srv.site.shares.requests = AddressBuckets(3, 3, Frozen())
    url = http_base(srv) + shared["url"]
    assert [(await fetch(url, "HEAD"))[0] for _ in range(3)] == [200, 200, 200]
    status, headers, body = await fetch(url)
    assert status == 429 and headers.getRawHeaders("retry-after") == ["1"]
    assert b"requests per second" in body
    assert (await fetch(http_base(srv) + "/s/" + "B" * 24))[0] == 429  # any /s/ path
    assert (await fetch(http_base(srv) + "/whoami"))[0] == 200  # the rest is not limited
    metrics = (await fetch(http_base(srv) + "/metrics"))[2].decode()
    assert 'wsfiles_share_requests_total{outcome="rate_limited"} 2.0' in metrics
    assert 'wsfiles_share_requests_total{outcome="head"} 3.0' in metrics


# -- a shared folder's page ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_folder_page_links_its_files_and_nothing_escapes_the_folder(server_factory):
    srv = await server_factory()
    await srv.put("outside.txt", b"not shared")
    await srv.put("docs/a b.txt", b"A")
    await srv.put("docs/sub/<b>é.txt", b"B")
    client = await connect12(srv)
    shared = await ask(client, op="share", path="docs")
    base, link = http_base(srv), shared["url"]
    srv.site.shares.requests = AddressBuckets(1000, 1000, reactor)  # many requests here

    status, headers, page = await fetch(base + link)
    assert status == 200
    assert headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    csp = headers.getRawHeaders("content-security-policy")[0]
    assert "default-src 'none'" in csp and "script" not in csp
    assert headers.getRawHeaders("referrer-policy") == ["no-referrer"]
    text = page.decode()
    assert f'href="{link}/a%20b.txt"' in text
    assert f'href="{link}/sub/%3Cb%3E%C3%A9.txt"' in text and "&lt;b&gt;é.txt" in text
    assert "outside" not in text and "<b>" not in text
    assert (await fetch(base + link + "/"))[0] == 200

    assert (await fetch(base + link + "/sub/%3Cb%3E%C3%A9.txt", "HEAD"))[0] == 200
    for trick in (
        "/../outside.txt",
        "/%2e%2e/outside.txt",
        "/sub/..%2f..%2foutside.txt",
        "/sub/%2e%2e/%2e%2e/outside.txt",
        "/.wsfiles-shares.json",
        "/sub",
        "/a%00b.txt",
        "/%ff",
        "//a%20b.txt",
    ):
        status, body = await raw_get(srv, link + trick)
        assert status == 404, trick
        assert b"not shared" not in body

    # The file share of a single file answers its own name below it too (curl -O).
    one = await ask(client, op="share", path="docs/a b.txt")
    assert (await fetch(base + one["url"] + "/a%20b.txt", "HEAD"))[0] == 200
    assert (await fetch(base + one["url"] + "/other.txt", "HEAD"))[0] == 404


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
@pytest_twisted.ensureDeferred
async def test_a_symlink_in_a_shared_folder_is_neither_listed_nor_followed(server_factory):
    srv = await server_factory()
    await srv.put("docs/a.txt", b"A")
    (srv.root / "secret.txt").write_bytes(b"top secret")
    (srv.root / "docs" / "link.txt").symlink_to(srv.root / "secret.txt")
    (srv.root / "docs" / "up").symlink_to(srv.root)
    client = await connect12(srv)
    shared = await ask(client, op="share", path="docs")
    base = http_base(srv) + shared["url"]
    page = (await fetch(base))[2].decode()
    assert "a.txt" in page and "link.txt" not in page and "up/" not in page
    for path in ("/link.txt", "/up/secret.txt"):
        status, _, body = await fetch(base + path)
        assert status == 404 and b"top secret" not in body


def test_logs_show_a_share_id_cut_to_a_prefix():
    share_id = "AbCdEfGhIjKlMnOpQrStUvWx"
    assert redact_share_uri(f"/s/{share_id}/a.txt".encode()) == "/s/AbCdEf…/a.txt".encode()
    assert redact_share_uri(b"/files/x") == b"/files/x"


# -- downloads: Range, limits, curl and wget against twistd, S3 ---------------------------


@pytest.mark.every_backend
@pytest_twisted.ensureDeferred
async def test_a_shared_file_downloads_whole_and_in_ranges_on_every_backend(server_factory):
    srv = await server_factory()
    data = os.urandom(300_000)
    await srv.put("photos/big.bin", data)
    client = await connect12(srv)
    shared = await ask(client, op="share", path="photos/big.bin", max_downloads=3)
    url = http_base(srv) + shared["url"]

    status, headers, body = await fetch(url)
    assert status == 200 and body == data
    assert headers.getRawHeaders("content-disposition")[0].startswith("attachment")
    assert "big.bin" in headers.getRawHeaders("content-disposition")[0]
    etag = headers.getRawHeaders("etag")[0]
    status, headers, body = await fetch(url, headers={"Range": "bytes=1000-1999", "If-Range": etag})
    assert status == 206 and body == data[1000:2000]
    assert headers.getRawHeaders("content-range") == ["bytes 1000-1999/300000"]
    assert (await fetch(url, "HEAD"))[0] == 200  # HEAD does not count
    assert (await fetch(url))[2] == data  # the third GET
    status, _, body = await fetch(url)
    assert status == 410 and b"used up" in body
    listed = (await ask(client, op="shares"))["shares"]
    assert [(s["downloads"], s["max_downloads"]) for s in listed] == [(3, 3)]

    # A folder share on this backend: its page, and a file below it.
    folder = await ask(client, op="share", path="photos")
    page = (await fetch(http_base(srv) + folder["url"]))[2].decode()
    assert f'href="{folder["url"]}/big.bin"' in page
    status, _, body = await fetch(
        http_base(srv) + folder["url"] + "/big.bin", headers={"Range": "bytes=-10"}
    )
    assert status == 206 and body == data[-10:]


@pytest.mark.skipif(CURL is None or WGET is None, reason="needs curl and wget")
@pytest_twisted.ensureDeferred
async def test_curl_and_wget_download_a_link_the_cli_made_and_it_dies_on_unshare(
    twistd_factory, tmp_path
):
    srv = await twistd_factory()
    data = os.urandom(200_000)
    client = await within(connect(srv.url, subprotocols=COMMAND_SUBPROTOCOLS))
    try:
        await within(client.upload("report.bin", __import__("io").BytesIO(data)))
    finally:
        await within(client.close())
    wsfiles_cli = str(BIN / "wsfiles")
    code, out, err = await run_process(
        [wsfiles_cli, "share", srv.url, "report.bin", "--expires", "2h", "--max-downloads", "3"]
    )
    assert code == 0, err
    link = out.strip()
    host = srv.url.split("://")[1]
    assert link.startswith(f"http://{host}/s/") and "until" in err and "3 downloads" in err
    share_id = link.rsplit("/", 1)[1]

    code, headers_out, _ = await run_process(
        [CURL, "-sS", "-r", "100-199", "-o", str(tmp_path / "piece"), "-D", "-", link]
    )
    assert code == 0 and headers_out.startswith("HTTP/1.1 206")
    assert (tmp_path / "piece").read_bytes() == data[100:200]
    (tmp_path / "partial.bin").write_bytes(data[:5000])  # an interrupted download
    code, _, err = await run_process(
        [WGET, "-q", "-c", "-O", str(tmp_path / "partial.bin"), link], cwd=tmp_path
    )
    assert code == 0, err
    assert (tmp_path / "partial.bin").read_bytes() == data
    code, out, _ = await run_process([CURL, "-sS", "-OJ", link], cwd=tmp_path)
    assert code == 0 and (tmp_path / "report.bin").read_bytes() == data  # -J: its own name
    code, out, _ = await run_process([CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", link])
    assert out == "410"  # the 4th GET of 3

    code, out, err = await run_process([wsfiles_cli, "shares", srv.url])
    assert code == 0, err
    assert share_id in out and "3/3 downloads" in out and "report.bin" in out
    code, out, err = await run_process([wsfiles_cli, "unshare", srv.url, link])
    assert (code, out, err) == (0, "", "")
    code, out, _ = await run_process([CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", link])
    assert out == "404"
    code, _, err = await run_process([wsfiles_cli, "unshare", srv.url, share_id])
    assert code == 1 and err.startswith("wsfiles unshare: not_found:")

    # A password from stdin; curl sends it with -u.
    process_out = await run_process_with_input(
        [wsfiles_cli, "share", srv.url, "report.bin", "--password-stdin"], b"open sesame\n"
    )
    assert process_out[0] == 0, process_out
    locked = process_out[1].strip()
    code, out, _ = await run_process([CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", locked])
    assert out == "401"
    code, out, _ = await run_process(
        [CURL, "-sS", "-u", ":open sesame", "-o", str(tmp_path / "locked"), locked]
    )
    assert code == 0 and (tmp_path / "locked").read_bytes() == data

    await srv.stop()
    assert share_id not in srv.output  # logs show a prefix only
    lines = [line for line in srv.output.splitlines() if "share" in line or "/s/" in line]
    assert any(f"share {share_id[:6]}…" in line for line in lines), lines


async def run_process_with_input(argv: list[str], data: bytes) -> tuple[int, str, str]:
    """``argv`` with ``data`` on its stdin: (exit code, stdout, stderr)."""
    from conftest import spawn_process

    process, proto = spawn_process(argv)
    process.write(data)
    process.closeStdin()
    code = await within(proto.ended, 60)
    return code, proto.out.decode(), proto.err.decode()


# -- several instances: Redis ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_with_redis_every_instance_sees_shares_and_links_fail_closed_without_it(
    redis_server, tmp_path
):
    root = tmp_path / "shared-disk"
    a = await start_server(root, redis=redis_server.url)
    b = await start_server(root, redis=redis_server.url)
    states = [srv.site.command_factory.redis for srv in (a, b)]
    try:
        for state in states:
            state.start()
            await within(state.link.when_up())
        await a.put("a.txt", b"shared by a")
        on_a, on_b = await connect12(a), await connect12(b)
        shared = await ask(on_a, op="share", path="a.txt", max_downloads=2)
        once = await ask(on_a, op="share", path="a.txt")
        assert not (root / ".wsfiles-shares.json").exists()  # in Redis, not the file

        assert (await fetch(http_base(b) + shared["url"]))[2] == b"shared by a"
        assert (await fetch(http_base(a) + shared["url"]))[0] == 200
        assert (await fetch(http_base(b) + shared["url"]))[0] == 410  # counted across
        listed = (await ask(on_b, op="shares"))["shares"]
        assert [(s["share"], s["downloads"]) for s in listed] == [
            (shared["share"], 2),
            (once["share"], 0),
        ]
        await ask(on_b, op="unshare", share=once["share"])  # revoked on b...
        assert (await fetch(http_base(a) + once["url"]))[0] == 404  # ...dead on a at once

        live = await ask(on_a, op="share", path="a.txt")
        redis_server.stop()
        for state in states:
            await within(state.link.when_down())
        for srv in (a, b):
            status, headers, body = await fetch(http_base(srv) + live["url"])
            assert status == 503 and b"unavailable" in body
            assert headers.getRawHeaders("retry-after") == ["5"]
        code, message = await refused(on_a, op="share", path="a.txt")
        assert code == "unavailable" and "Redis" in message
        assert (await refused(on_b, op="shares"))[0] == "unavailable"
    finally:
        for srv in (a, b):
            await srv.stop()
        for state in states:
            await within(state.stop())


# -- review fixes: who a link belongs to, guesses in flight, one way in ------------


@pytest_twisted.ensureDeferred
async def test_a_link_dies_when_its_owner_is_re_added_or_rotated(tmp_path):
    from wsfiles.users import UserDirectory, rotate_user

    users = tmp_path / "users"
    alice = add_user(str(users), "alice")
    srv = await start_server(tmp_path / "root", users=UserDirectory(str(users)))
    try:
        client = await connect12(srv, alice)
        await within(client.upload("doc.txt", b"alice's"))
        shared = await ask(client, op="share", path="doc.txt")
        url = http_base(srv) + shared["url"]
        assert (await fetch(url, "HEAD"))[0] == 200
        rotate_user(str(users), "alice")  # what 'wsfiles user rotate alice' does
        assert (await fetch(url, "HEAD"))[0] == 404  # a leaked token's links die with it
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_an_anonymous_link_stops_when_the_server_gets_users(tmp_path):
    """ROOT is the anonymous folder; with users it holds every user's folder,
    so a link made anonymously must not open it."""
    from wsfiles.users import UserDirectory

    root = tmp_path / "root"
    srv = await start_server(root)
    try:
        client = await connect12(srv)
        shared = await ask(client, op="share", path="")
        assert (await raw_get(srv, shared["url"]))[0] == 200
    finally:
        await srv.stop()
    users = tmp_path / "users"
    add_user(str(users), "alice")
    (root / "alice").mkdir()
    (root / "alice" / "secret.txt").write_bytes(b"alice's")
    srv = await start_server(root, users=UserDirectory(str(users)))
    try:
        assert (await raw_get(srv, shared["url"]))[0] == 404
        assert (await raw_get(srv, shared["url"] + "/alice/secret.txt"))[0] == 404
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_sent_at_once_are_all_counted(server_factory):
    from twisted.internet import defer

    srv = await server_factory()
    await srv.put("secret.txt", b"s")
    client = await connect12(srv)
    shared = await ask(client, op="share", path="secret.txt", password="right one")
    url = http_base(srv) + shared["url"]
    srv.site.shares.passwords.by_address = AddressBuckets(5 / 60, 5, Frozen())
    burst = await within(
        defer.gatherResults(
            [defer.ensureDeferred(fetch(url, "HEAD", basic("x"))) for _ in range(10)]
        )
    )
    statuses = sorted(status for status, _, _ in burst)
    assert statuses.count(401) == 5 and statuses.count(429) == 5  # not ten scrypt checks


@pytest_twisted.ensureDeferred
async def test_a_share_link_has_one_way_in(server_factory):
    srv = await server_factory()
    await srv.put("a.txt", b"x")
    client = await connect12(srv)
    shared = await ask(client, op="share", path="a.txt")
    encoded = shared["url"].replace("/s/", "/%73/", 1)  # the access log would show it whole
    assert (await raw_get(srv, encoded))[0] == 404
    assert (await raw_get(srv, shared["url"]))[0] == 200
