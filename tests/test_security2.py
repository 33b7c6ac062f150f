"""Security round 2 (issue 15): the holes found by attacking a running server.

Each test fails without its fix; docs/security.md says what each defends.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import add_user_with_cli, handshake_status, http_get
from e2e_helpers import MiB, next_reply, open_channel, stored, within
from twisted.internet import defer

from wsfiles.client import WsfilesError, connect


@pytest_twisted.ensureDeferred
async def test_get_of_a_named_pipe_is_refused_without_blocking_the_server(twistd_factory):
    # Opening a FIFO for reading blocks until a writer comes: on the reactor
    # thread that froze every connection, /healthz included.
    srv = await twistd_factory()
    os.mkfifo(srv.root / "pipe")
    (srv.root / "plain.txt").write_bytes(b"still served")
    client = await within(connect(srv.url))
    try:
        with pytest.raises(WsfilesError) as refused:
            await within(client.download("pipe", io.BytesIO()), 5)
        assert refused.value.code == "not_found"
        status, _ = await within(http_get(srv.url.replace("ws://", "http://") + "/healthz"), 5)
        assert status == 200
        sink = io.BytesIO()
        await within(client.download("plain.txt", sink), 5)
        assert sink.getvalue() == b"still served"
        assert "pipe" not in [f["name"] for f in await within(client.list(), 5)]
    finally:
        await client.close()


def _wrong_secrets(token: str, count: int) -> list[str]:
    token_id, secret = token.split(".")
    return [f"{token_id}.{n:0{len(secret)}x}" for n in range(count)]


@pytest_twisted.ensureDeferred
async def test_wrong_secrets_for_one_id_cannot_queue_scrypt_work(tmp_path):
    from wsfiles.users import CHECKS_PER_TOKEN_ID, TooManyChecks, UserDirectory, add_user

    path = str(tmp_path / "users")
    alice, bob = add_user(path, "alice"), add_user(path, "bob")
    directory = UserDirectory(path)
    burst = [
        directory.authenticate(t, address=f"10.0.0.{n}")
        for n, t in enumerate(_wrong_secrets(alice, 50))
    ]
    refused = [d for d in burst if d.called]
    assert len(refused) == 50 - CHECKS_PER_TOKEN_ID  # refused at once, unchecked
    for d in refused:
        with pytest.raises(TooManyChecks):
            await d
    assert await within(directory.authenticate(bob, address="10.0.0.99")) == "bob"
    assert [await within(d) for d in burst if d not in refused] == [None] * CHECKS_PER_TOKEN_ID
    assert directory.scrypt_checks == CHECKS_PER_TOKEN_ID + 1
    # Once the burst is over, alice signs in as usual.
    assert await within(directory.authenticate(alice, address="10.0.0.1")) == "alice"


@pytest_twisted.ensureDeferred
async def test_one_address_cannot_queue_scrypt_work_across_many_ids(tmp_path):
    from wsfiles.users import CHECKS_PER_ADDRESS, TooManyChecks, UserDirectory, add_user

    path = str(tmp_path / "users")
    tokens = [add_user(path, f"user{n}") for n in range(4)]
    directory = UserDirectory(path)
    burst = [
        directory.authenticate(wrong, address="192.0.2.7")
        for token in tokens
        for wrong in _wrong_secrets(token, 3)
    ]
    refused = [d for d in burst if d.called]
    assert len(refused) == len(burst) - CHECKS_PER_ADDRESS
    for d in refused:
        with pytest.raises(TooManyChecks):
            await d
    assert await within(directory.authenticate(tokens[0], address="192.0.2.8")) == "user0"
    for d in burst:
        if d not in refused:
            assert await within(d) is None


@pytest_twisted.ensureDeferred
async def test_another_users_first_login_is_fast_during_a_wrong_secret_burst(
    twistd_factory, tmp_path
):
    users = tmp_path / "users"
    alice, bob = add_user_with_cli(users, "alice"), add_user_with_cli(users, "bob")
    # All from one address here: the pool of not-yet-WebSocket connections
    # (256 per address) would refuse bob with 429 while the burst is open,
    # which is that pool's job, not this test's subject (the scrypt queue).
    srv = await twistd_factory(
        "--users",
        str(users),
        "--max-http-connections",
        "1000",
        "--max-http-connections-per-ip",
        "1000",
    )
    burst = [
        defer.ensureDeferred(
            handshake_status(srv.url, "/command", {"Authorization": [f"Bearer {wrong}"]})
        )
        for wrong in _wrong_secrets(alice, 300)
    ]
    started = time.monotonic()
    client = await within(connect(srv.url, token=bob), 10)
    took = time.monotonic() - started
    await client.close()
    statuses = await within(defer.gatherResults(burst), 60)
    assert took < 2.0, f"bob's first login took {took:.1f} s during the burst"
    assert set(statuses) <= {401, 403}
    assert statuses.count(403) > 250  # refused at once, never hashed
    assert "Traceback" not in srv.output


def _rewrite_users(users: Path, keep: Callable[[str], bool], extra: str = "") -> None:
    """Rewrite the users file atomically, as `wsfiles user remove` will."""
    lines = [line for line in users.read_text().splitlines(keepends=True) if keep(line)]
    temp = users.with_suffix(".new")
    temp.write_text("".join(lines) + extra)
    os.replace(temp, users)


@pytest_twisted.ensureDeferred
async def test_removing_a_user_ends_its_open_channels_and_its_upload(twistd_factory, tmp_path):
    users = tmp_path / "users"
    alice, bob = add_user_with_cli(users, "alice"), add_user_with_cli(users, "bob")
    srv = await twistd_factory("--users", str(users))
    alice_client = await within(connect(srv.url, token=alice))
    bob_client = await within(connect(srv.url, token=bob))
    try:
        # alice is half-way through an upload when she is removed.
        alice_client.send({"op": "save", "name": "half.bin", "size": 4 * MiB, "id": 1})
        offer = await next_reply(alice_client, 1)
        await open_channel(alice_client, offer["url"])
        assert (await next_reply(alice_client, 1))["op"] == "ready"
        alice_client.send_on_file_channel(b"x" * MiB)  # one message of 1 MiB: short of 4
        _rewrite_users(users, lambda line: not line.startswith("alice "))
        code = await within(alice_client._command_factory.closed, 10)
        assert code == 4401
        # Both channels ended; nothing of the upload is stored or left over.
        assert alice_client._file_factory is not None
        await within(alice_client._file_factory.closed, 10)
        assert not (srv.root / "alice" / "half.bin").exists()
        assert [p for p in (srv.root / ".wsfiles-tmp").rglob("*") if p.is_file()] == []
        assert await within(bob_client.list()) == []  # bob goes on
        assert (
            await handshake_status(srv.url, "/command", {"Authorization": [f"Bearer {alice}"]})
            == 401
        )
    finally:
        await alice_client.close()
        await bob_client.close()
    assert "Traceback" not in srv.output


@pytest_twisted.ensureDeferred
async def test_rotating_a_token_ends_the_connections_of_the_old_one(twistd_factory, tmp_path):
    from wsfiles.users import add_user

    users = tmp_path / "users"
    old = add_user_with_cli(users, "alice")
    srv = await twistd_factory("--users", str(users))
    client = await within(connect(srv.url, token=old))
    try:
        # A new line for alice (a new token id and hash) replaces the old one.
        spare = tmp_path / "spare"
        new = add_user(str(spare), "alice")
        _rewrite_users(users, lambda line: not line.startswith("alice "), spare.read_text())
        assert await within(client._command_factory.closed, 10) == 4401
    finally:
        await client.close()
    renewed = await within(connect(srv.url, token=new))
    assert await within(renewed.list()) == []
    await renewed.close()


# -- 7: file-count quota and listing cap ----------------------------------------


async def _refused_code(awaitable: Any) -> str:
    with pytest.raises(WsfilesError) as refused:
        await within(awaitable)
    return refused.value.code


@pytest_twisted.ensureDeferred
async def test_quota_files_refuses_a_new_file_past_the_count_but_not_a_replacement(
    server_factory,
):
    srv = await server_factory(quota_files=3)
    client = await within(connect(srv.url))
    try:
        for n in range(3):
            await within(client.upload(f"f{n}", b""))
        assert await _refused_code(client.upload("f3", b"")) == "quota_exceeded"
        await within(client.upload("f1", b"replaced"))  # the count does not change
        assert stored(srv) == {"f0": b"", "f1": b"replaced", "f2": b""}
        await within(client.delete("f0"))
        await within(client.upload("f3", b"now it fits"))
        assert sorted(f["name"] for f in await within(client.list())) == ["f1", "f2", "f3"]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_saves_of_new_names_cannot_all_fit_under_quota_files(server_factory):
    srv = await server_factory(quota_files=2)
    clients = [await within(connect(srv.url)) for _ in range(4)]
    try:
        results = await within(
            defer.DeferredList(
                [
                    defer.ensureDeferred(c.upload(f"n{i}", b"x" * MiB))
                    for i, c in enumerate(clients)
                ],
                consumeErrors=True,
            )
        )
        codes = [ok or failure.value.code for ok, failure in results]
        assert codes.count(True) == 2
        assert codes.count("quota_exceeded") == 2
        assert len(stored(srv)) == 2
    finally:
        for c in clients:
            await c.close()


@pytest_twisted.ensureDeferred
async def test_a_listing_never_grows_past_max_listing_and_is_never_cut(server_factory):
    srv = await server_factory(max_listing=2000)
    client = await within(connect(srv.url))
    try:
        long_names = [f"{n:03d}" + "n" * 197 for n in range(20)]  # 200 characters each
        kept = []
        for name in long_names:
            try:
                await within(client.upload(name, b""))
            except WsfilesError as e:
                assert e.code == "quota_exceeded"
                break
            kept.append(name)
        assert 3 <= len(kept) < 20
        listing = await within(client.list())
        assert sorted(f["name"] for f in listing) == kept  # whole, not truncated
        assert len(json.dumps(listing)) <= 2000
        await within(client.upload(kept[0], b"replacing is fine"))
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_users_file_quota_files_overrides_the_option(server_factory, tmp_path):
    from wsfiles.users import UserDirectory, add_user

    path = tmp_path / "users"
    alice, bob = add_user(str(path), "alice"), add_user(str(path), "bob")
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    path.write_text(f"{lines[0]} quota_files=1\n{lines[1]} quota_files=none\n")
    srv = await server_factory(users=UserDirectory(str(path)), quota_files=2)
    a = await within(connect(srv.url, token=alice))
    b = await within(connect(srv.url, token=bob))
    try:
        await within(a.upload("one", b""))
        assert await _refused_code(a.upload("two", b"")) == "quota_exceeded"
        for n in range(3):
            await within(b.upload(f"b{n}", b""))
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    "extra,message",
    [
        ("quota_files=many", "expected a whole number"),
        ("quota_files=", "expected one of"),
        ("color=blue", "expected one of quota=, quota_files="),
        ("quota=1G quota=2G", "quota= given twice"),
    ],
)
def test_bad_users_file_settings_name_their_line(extra, message):
    from wsfiles.users import UsersFileError, parse_users

    with pytest.raises(UsersFileError, match=message) as refused:
        parse_users(f"# users\nalice 00ff scrypt$1$1$1$00$00 {extra}\n", "users")
    assert "users:2:" in str(refused.value)


# -- the rate limit is per client, not per connection ----------------------------


async def _codes_of_a_burst(clients: list[Any], each: int) -> list[str | None]:
    ids = [(c, c.send({"op": "list"})) for c in clients for _ in range(each)]
    return [(await within(c.reply(i))).get("code") for c, i in ids]


@pytest_twisted.ensureDeferred
async def test_a_clients_connections_share_one_rate_limit(server_factory, tmp_path):
    from wsfiles.users import UserDirectory, add_user

    users_file = tmp_path / "users"
    alice, bob = add_user(str(users_file), "alice"), add_user(str(users_file), "bob")
    srv = await server_factory(users=UserDirectory(str(users_file)), rate_limit=5)
    alices = [await within(connect(srv.url, token=alice)) for _ in range(4)]
    bob_client = await within(connect(srv.url, token=bob))
    try:
        codes = await _codes_of_a_burst(alices, 5)  # 20 at once; one bucket of 5 between them
        assert codes.count(None) <= 7  # the burst, and what refilled meanwhile
        assert codes.count("rate_limited") >= 13
        # Another client's bucket is its own.
        assert await _codes_of_a_burst([bob_client], 5) == [None] * 5
    finally:
        for c in [*alices, bob_client]:
            await c.close()


@pytest_twisted.ensureDeferred
async def test_anonymous_clients_share_a_rate_limit_per_address(server_factory):
    srv = await server_factory(rate_limit=5, trusted_proxies=("127.0.0.1",))

    async def from_address(ip: str) -> Any:
        return await within(connect(srv.url, headers={"X-Forwarded-For": ip}))

    same = [await from_address("192.0.2.1") for _ in range(3)]
    other = await from_address("192.0.2.2")
    try:
        codes = await _codes_of_a_burst(same, 5)
        assert codes.count("rate_limited") >= 8
        assert await _codes_of_a_burst([other], 5) == [None] * 5
    finally:
        for c in [*same, other]:
            await c.close()


def test_a_shared_bucket_lives_while_a_connection_holds_it():
    from twisted.internet.task import Clock

    from wsfiles.ratelimit import ClientBuckets

    buckets = ClientBuckets(2, Clock())
    first, second = buckets.take("alice"), buckets.take("alice")
    assert first is second and buckets.take("bob") is not first
    assert first.take() and first.take() and not second.take()  # one budget
    buckets.release("alice")
    assert buckets.take("alice") is first  # still held: the same, still empty
    buckets.release("alice")
    buckets.release("alice")
    assert buckets.take("alice").take()  # all gone: a new connection starts afresh


@pytest_twisted.ensureDeferred
async def test_many_connections_of_one_client_listing_at_once_are_refused_not_closed(
    server_factory,
):
    # The bucket is shared, the flood rule is not: 80 connections sending one
    # list each (16x the rate in a moment, past the flood line of 10x) get
    # answers or rate_limited, and none is closed as a flood.
    srv = await server_factory(rate_limit=5)
    clients = [await within(connect(srv.url)) for _ in range(80)]
    try:
        codes = await _codes_of_a_burst(clients, 1)
        assert codes.count("rate_limited") >= 70 and set(codes) <= {None, "rate_limited"}
        assert all(c.close_code is None for c in clients)
    finally:
        for c in clients:
            await c.close()
