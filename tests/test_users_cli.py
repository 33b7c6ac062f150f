"""``wsfiles user list|add|remove|rotate|set`` and what a server does with the settings.

Every command runs through the installed ``wsfiles`` console script, as an
operator would run it; permissions are checked over the network, and
expiry, rotation and removal against a real ``twistd wsfiles``.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import stat
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import BIN, handshake_status, run_process
from e2e_helpers import within

from wsfiles.client import COMMAND_SUBPROTOCOLS, WsfilesError, connect
from wsfiles.users import HEADER, UserDirectory, UsersFileError, _verify, new_credential

WSFILES = str(BIN / "wsfiles")


def user(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``wsfiles user ARGS`` (blocking: for tests that run no server)."""
    return subprocess.run(
        [WSFILES, "user", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


async def user_async(*args: str) -> tuple[int, str, str]:
    """``wsfiles user ARGS`` while a server runs on our reactor."""
    return await run_process([WSFILES, "user", *args])


def lines_of(users: Path) -> dict[str, str]:
    """The users file's user lines by name."""
    return {
        line.split()[0]: line
        for line in users.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }


def token_matches(users: Path, name: str, token: str) -> bool:
    fields = lines_of(users)[name].split()
    token_id, _, secret = token.partition(".")
    return fields[1] == token_id and _verify(secret, fields[2])


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


# -- the commands ---------------------------------------------------------------


def test_add_set_rotate_remove_and_list_never_showing_a_secret(tmp_path):
    users = tmp_path / "users"
    out = ok(user("add", "--users", str(users), "alice", "--quota", "10240M", "--read-only"))
    alice = out.strip()
    assert out == alice + "\n" and token_matches(users, "alice", alice)
    ok(user("add", "--users", str(users), "bob", "--expires", "2031-02-03"))
    assert users.read_text().splitlines()[0] == HEADER
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert lines_of(users)["alice"].endswith(" quota=10G read_only=yes")
    assert lines_of(users)["bob"].endswith(" expires=2031-02-03T00:00:00Z")

    # set: settings change, the token stays.
    before = lines_of(users)["alice"].split()[:3]
    out = ok(
        user(
            "set", "--users", str(users), "alice", "--unset", "read-only", "--max-size", "2G",
            "--expires", "2030-06-01T12:30:00+02:00", "--quota-files", "none",
        )
    )  # fmt: skip
    assert "max_size=2G" in out and "token unchanged" in out
    assert lines_of(users)["alice"].split() == [
        *before,
        "quota=10G",
        "quota_files=none",
        "max_size=2G",
        "expires=2030-06-01T10:30:00Z",
    ]
    ok(user("set", "--users", str(users), "alice", "--expires", "never", "--unset", "quota"))
    assert lines_of(users)["alice"].split()[3:] == ["quota_files=none", "max_size=2G"]

    # rotate: a new token, the settings kept, the old token gone.
    rotated = ok(user("rotate", "--users", str(users), "alice")).strip()
    assert rotated != alice and token_matches(users, "alice", rotated)
    assert not token_matches(users, "alice", alice)
    assert lines_of(users)["alice"].split()[3:] == ["quota_files=none", "max_size=2G"]

    # list: names, token ids, settings, expiry; never a secret or a hash.
    table = ok(user("list", "--users", str(users)))
    rows = json.loads(ok(user("list", "--users", str(users), "--json")))
    text = users.read_text()
    secrets = [line.split()[2] for line in lines_of(users).values()] + [rotated.split(".")[1]]
    for shown in (table, json.dumps(rows)):
        assert "scrypt" not in shown and not any(secret in shown for secret in secrets)
    assert table.splitlines()[0].split() == ["NAME", "TOKEN", "ID", "EXPIRES", "SETTINGS"]
    assert table.splitlines()[1].split() == [
        "alice", rotated.split(".")[0], "never", "quota_files=none", "max_size=2G"
    ]  # fmt: skip
    assert rows == [
        {
            "name": "alice",
            "token_id": rotated.split(".")[0],
            "settings": {"quota_files": "none", "max_size": 2 * 1024**3},
            "expired": False,
        },
        {
            "name": "bob",
            "token_id": lines_of(users)["bob"].split()[1],
            "settings": {"expires": "2031-02-03T00:00:00Z"},
            "expired": False,
        },
    ]

    # remove
    ok(user("remove", "--users", str(users), "alice"))
    assert list(lines_of(users)) == ["bob"]
    assert users.read_text() != text and stat.S_IMODE(users.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temp file left


def _v1_file(users: Path) -> str:
    """A file as the old ``user add`` wrote it (no header), with a comment; alice's token."""
    token_id, secret, hashed = new_credential()
    users.write_text(f"# ours\nalice {token_id} {hashed} quota=1G\n")
    users.chmod(0o600)
    return f"{token_id}.{secret}"


@pytest.mark.parametrize(
    "args,message",
    [
        (["set", "carol", "--quota", "1G"], "no user 'carol' in "),
        (["remove", "carol"], "no user 'carol' in "),
        (["rotate", "carol"], "no user 'carol' in "),
        (["add", "alice"], "user 'alice' already exists in "),
        (["add", "bob", "--expires", "31/01/2027"], "--expires: '31/01/2027' is not a date"),
        (["set", "alice", "--max-size", "1X"], "--max-size: '1X' is not a size"),
        (["set", "alice", "--quota", "lots"], "--quota: 'lots' is not a size"),
        (["add", "bob", "--quota-files", "-3"], "--quota-files: '-3' is not a whole number"),
        (["set", "alice", "--unset", "colour"], "--unset: no setting 'colour'"),
        (["set", "alice"], "nothing to change"),
        (["add", "no/slash"], "'no/slash' is not a valid client name"),
        (["add", "--users", "{tmp}/users/x", "bob"], "cannot write users file {tmp}/users/x:"),
        (["remove", "--users", "{tmp}/absent", "alice"], "no users file {tmp}/absent"),
        (["list", "--users", "{tmp}"], "cannot read users file {tmp}:"),
    ],
)
def test_every_bad_input_is_one_line_and_exit_1_with_the_file_unchanged(tmp_path, args, message):
    users = tmp_path / "users"
    _v1_file(users)
    before = users.read_text()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--users" not in args:
        args[1:1] = ["--users", str(users)]
    result = user(*args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"wsfiles user {args[0]}: ")
    assert message.replace("{tmp}", str(tmp_path)) in result.stderr
    assert users.read_text() == before  # still v1: nothing was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]


def test_an_unknown_format_version_is_refused_by_commands_and_servers(tmp_path):
    users = tmp_path / "users"
    users.write_text("# wsfiles users v3\nalice 00ff scrypt$1$1$1$00$00 color=blue\n")
    for args in (["list"], ["add", "bob"], ["remove", "alice"]):
        result = user(args[0], "--users", str(users), *args[1:])
        assert result.returncode == 1
        assert "users file format v3 is not supported (this wsfiles reads v1 and v2)" in (
            result.stderr
        )
    with pytest.raises(UsersFileError, match="format v3 is not supported"):
        UserDirectory(str(users))


def test_a_command_waits_for_another_ones_lock_and_never_writes_past_it(tmp_path):
    users = tmp_path / "users"
    _v1_file(users)
    before = users.read_text()
    with open(users, "rb") as held:  # as a concurrent `wsfiles user` command holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        result = user("add", "--users", str(users), "bob", env={"WSFILES_USERS_LOCK_WAIT": "0.3"})
    assert result.returncode == 1
    assert "stays locked by another 'wsfiles user' command" in result.stderr
    assert users.read_text() == before
    ok(user("add", "--users", str(users), "bob"))  # once it is free
    assert list(lines_of(users)) == ["alice", "bob"]


@pytest_twisted.ensureDeferred
async def test_an_old_format_file_keeps_working_and_is_upgraded_on_first_change(tmp_path):
    users = tmp_path / "users"
    alice = _v1_file(users)
    old_line = lines_of(users)["alice"]
    directory = UserDirectory(str(users))
    assert await within(directory.authenticate(alice)) == "alice"
    assert directory.quota_of("alice") == 1024**3
    code, _, err = await user_async("list", "--users", str(users))  # reading changes nothing
    assert code == 0 and users.read_text().splitlines()[0] == "# ours"
    code, bob, err = await user_async("add", "--users", str(users), "bob")
    assert code == 0, err
    text = users.read_text().splitlines()
    assert text[0] == HEADER and text[2] == "# ours" and text[3] == old_line  # kept as written
    assert await within(directory.authenticate(alice)) == "alice"
    assert await within(directory.authenticate(bob.strip())) == "bob"
    assert directory.quota_of("alice") == 1024**3


# -- what servers do with the settings --------------------------------------------


async def _users_server(
    server_factory: Any, tmp_path: Path, options: dict[str, Any] | None = None, **users: Any
) -> Any:
    """An in-process server whose users file holds ``users`` (name: settings)."""
    from wsfiles.users import add_user

    path = tmp_path / "users"
    tokens = {name: add_user(str(path), name, values) for name, values in users.items()}
    srv = await server_factory(users=UserDirectory(str(path)), **(options or {}))
    srv.users_path, srv.tokens = path, tokens
    return srv


async def _refused(client: Any, **command: Any) -> str:
    with pytest.raises(WsfilesError) as error:
        await within(client.request(command))
    return error.value.code


@pytest_twisted.ensureDeferred
async def test_a_read_only_user_may_list_and_get_and_nothing_else(server_factory, tmp_path):
    srv = await _users_server(server_factory, tmp_path, reader={"read_only": "yes"})
    folder = srv.root / "reader"
    (folder / "docs").mkdir(parents=True)
    (folder / "docs" / "a.txt").write_bytes(b"read me")
    (folder / "empty").mkdir()
    tree = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    client = await within(connect(srv.url, srv.tokens["reader"], subprotocols=COMMAND_SUBPROTOCOLS))
    try:
        assert client.hello["read_only"] is True
        assert [e["name"] for e in client.hello["files"]] == ["docs", "empty"]
        sink = io.BytesIO()
        await within(client.download("docs/a.txt", sink))
        assert sink.getvalue() == b"read me"
        for command in (
            {"op": "save", "name": "new.txt", "size": 3},
            {"op": "save", "name": "docs/a.txt", "size": 3},
            {"op": "delete", "name": "docs/a.txt"},
            {"op": "rename", "name": "docs/a.txt", "to": "b.txt"},
            {"op": "mkdir", "path": "made"},
            {"op": "rmdir", "path": "empty"},
            {"op": "rmdir", "path": "docs", "recursive": True},
        ):
            assert await _refused(client, **command) == "forbidden", command
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == tree
        assert not (srv.root / ".wsfiles-tmp").exists() or not any(
            p.is_file() for p in (srv.root / ".wsfiles-tmp").rglob("*")
        )
        # set --read-write applies to the open connection, from the next command on.
        code, _, err = await user_async(
            "set", "--users", str(srv.users_path), "reader", "--read-write"
        )
        assert code == 0, err
        await within(client.upload("docs/new.txt", b"written"))
        assert (folder / "docs" / "new.txt").read_bytes() == b"written"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_users_max_size_overrides_the_option_both_ways(server_factory, tmp_path):
    srv = await _users_server(
        server_factory,
        tmp_path,
        {"max_size": 1000},
        big={"max_size": "4K"},
        small={"max_size": "100"},
        plain={},
    )
    clients = {}
    try:
        for name in ("big", "small", "plain"):
            clients[name] = await within(connect(srv.url, srv.tokens[name]))
        assert clients["big"].hello["max_size"] == 4096
        assert clients["small"].hello["max_size"] == 100
        assert clients["plain"].hello["max_size"] == 1000
        assert "read_only" not in clients["plain"].hello
        await within(clients["big"].upload("big.bin", b"x" * 3000))  # over --max-size
        assert (srv.root / "big" / "big.bin").stat().st_size == 3000
        # ... and its file channel was not cut for it (the option's frame limit).
        [file_channel] = [c for c in srv.site.book.open if c.channel_name == "file"]
        assert file_channel.state == file_channel.STATE_OPEN
        for name, size in (("big", 5000), ("small", 101), ("plain", 1001)):
            with pytest.raises(WsfilesError) as refused:
                await within(clients[name].upload("f.bin", b"x" * size))
            assert refused.value.code == "too_large"
        await within(clients["small"].upload("f.bin", b"x" * 100))
    finally:
        for client in clients.values():
            await client.close()


# -- a real twistd: expiry, rotation and removal end open connections -------------------


@pytest_twisted.ensureDeferred
async def test_expiry_rotate_and_remove_close_open_connections_set_does_not(
    twistd_factory, tmp_path
):
    users = tmp_path / "users"
    tokens = {name: ok(user("add", "--users", str(users), name)).strip() for name in "abcd"}
    srv = await twistd_factory("--users", str(users))
    clients = {
        name: await within(connect(srv.url, token=token, subprotocols=COMMAND_SUBPROTOCOLS))
        for name, token in tokens.items()
    }

    async def run(*args: str) -> str:
        code, out, err = await user_async(*args[:1], "--users", str(users), *args[1:])
        assert code == 0, err
        return out.strip()

    try:
        # a: an expiry a couple of seconds ahead closes its connection when it passes.
        expires = int(time.time()) + 3
        stamp = datetime.fromtimestamp(expires, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        await run("set", "a", "--expires", stamp)
        # d: settings only: its connection stays open and obeys them at once.
        await run("set", "d", "--read-only")
        assert await _refused(clients["d"], op="mkdir", path="x") == "forbidden"
        # b: rotated; c: removed.
        new_b = await run("rotate", "b")
        await run("remove", "c")
        assert await within(clients["b"]._command_factory.closed, 10) == 4401
        assert await within(clients["c"]._command_factory.closed, 10) == 4401
        assert await within(clients["a"]._command_factory.closed, 15) == 4401
        assert time.time() >= expires  # closed by the expiry, not by the edit before it
        assert await within(clients["d"].list()) == []  # still open
        headers = {name: {"Authorization": [f"Bearer {t}"]} for name, t in tokens.items()}
        for name in "abc":
            assert await handshake_status(srv.url, "/command", headers[name]) == 401
        renewed = await within(connect(srv.url, token=new_b))
        await renewed.close()
    finally:
        for client in clients.values():
            await client.close()
    assert "Traceback" not in srv.output
