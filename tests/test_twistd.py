"""The real ``twistd -n wsfiles`` process: start-up, auth, logs, transfers."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import time

import pytest
import pytest_twisted
from conftest import BIN, add_user_with_cli, handshake_status, http_get, twistd_args
from twisted.internet import reactor
from twisted.internet.task import deferLater

from wsfiles.client import WsfilesError, connect


@pytest_twisted.ensureDeferred
async def test_anonymous_service_round_trip(twistd_factory):
    srv = await twistd_factory("--max-size", "8M")
    client = await connect(srv.url)
    try:
        assert client.hello["client"] == "anonymous"
        assert client.hello["max_size"] == 8 * 1024**2
        data = bytes(range(256)) * 12_000  # ~3 MiB: many frames
        await client.upload("big.bin", data)
        assert (srv.root / "big.bin").read_bytes() == data
        sink = io.BytesIO()
        await client.download("big.bin", sink)
        assert sink.getvalue() == data
        assert [f["name"] for f in await client.list()] == ["big.bin"]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_users_get_their_own_folders_and_wrong_tokens_get_401(twistd_factory, tmp_path):
    users = tmp_path / "users"
    alice, bob = add_user_with_cli(users, "alice"), add_user_with_cli(users, "bob")
    srv = await twistd_factory("--users", str(users))

    assert await handshake_status(srv.url, "/command") == 401
    assert await handshake_status(srv.url, "/command?token=nope") == 401
    assert (
        await handshake_status(srv.url, "/command", {"Authorization": ["Bearer " + alice + "x"]})
        == 401
    )

    a = await connect(srv.url, alice)
    b = await connect(srv.url, bob, token_in_query=True)
    try:
        assert a.hello["client"] == "alice" and b.hello["client"] == "bob"
        await a.upload("secret.txt", b"alice's")
        assert (srv.root / "alice" / "secret.txt").read_bytes() == b"alice's"
        assert await b.list() == []
        try:
            await b.download("secret.txt", io.BytesIO())
            raise AssertionError("bob read alice's file")
        except WsfilesError as e:
            assert e.code == "not_found"
    finally:
        await a.close()
        await b.close()
    # A user added while the service runs can log in without a restart.
    carol = add_user_with_cli(users, "carol")
    c = await connect(srv.url, carol)
    await c.close()

    await srv.stop()
    for token in (alice, bob, carol):
        assert token not in srv.output
        assert token.split(".")[1] not in srv.output


@pytest_twisted.ensureDeferred
async def test_a_failing_health_check_is_logged_once_not_every_second(twistd_factory):
    srv = await twistd_factory("--min-free", "1000T")  # never that much free
    base = srv.url.replace("ws://", "http://")
    for _ in range(3):  # a balancer asks every second
        status, _ = await http_get(base + "/healthz")
        assert status == 503
    # The page's access-log line comes after anything the checks logged.
    assert (await http_get(base + "/"))[0] == 200
    for _ in range(100):  # bounded: the log reaches us through a pipe
        if '"GET / HTTP/1.0" 200' in srv.output:
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert '"GET / HTTP/1.0" 200' in srv.output
    assert srv.output.count("health check failed") == 1


@pytest_twisted.ensureDeferred
async def test_stop_is_clean(twistd_factory):
    srv = await twistd_factory()
    assert await srv.stop() in (0, -signal.SIGTERM)  # twistd re-raises SIGTERM
    assert "Traceback" not in srv.output


def test_port_in_use_fails_at_start_up_with_a_clear_message(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            twistd_args("--listen", f"tcp:{port}:interface=127.0.0.1", "--root", str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("Address already in use") == 1  # one line, not a log line and stderr
    assert "Traceback" not in output


def test_port_in_use_ends_a_daemonized_twistd_too(tmp_path):
    # In daemon mode twistd's parent waits for its child's word on a pipe, and
    # hears it only for an Exception: a bare SystemExit left it waiting for ever.
    log = tmp_path / "twistd.log"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = [
            str(BIN / "twistd"),
            f"--pidfile={tmp_path / 'twistd.pid'}",
            f"--logfile={log}",
            "wsfiles",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--root",
            str(tmp_path / "root"),
        ]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    assert "wsfiles cannot start" in result.stderr
    # The daemon writes its log as it exits, maybe after the parent did.
    for _ in range(100):  # bounded: up to 10 s
        if log.exists() and "Address already in use" in log.read_text():
            break
        time.sleep(0.1)  # another process's file, not our reactor's
    assert log.read_text().count("Address already in use") == 1
    assert "Traceback" not in result.stderr + log.read_text()


def test_a_listener_that_fails_to_bind_otherwise_is_one_line_too(tmp_path):
    # Twisted's lock file for a unix: socket cannot be made (a folder in the
    # way): binding raises OSError, not CannotListenError.
    (tmp_path / "wsfiles.sock.lock").mkdir()
    result = subprocess.run(
        twistd_args("--listen", f"unix:{tmp_path}/wsfiles.sock", "--root", str(tmp_path / "r")),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("wsfiles cannot start listening: [Errno 22]") == 1
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-size", "huge"], "--max-size"),
        (["--listen", "ssl:0:privateKey=/nonexistent/key.pem"], "/nonexistent/key.pem"),
        (["--listen", "systemd:domain=INET:index=0"], "systemd passed no socket"),
        (["--root", "/proc/nonexistent/root"], "cannot create --root"),
        (["--listen", "tcp:99999"], "the port must be 0-65535"),
        (["--listen", "tcp:-1"], "the port must be 0-65535"),
        (["--listen", "unix:/proc/nope/sock"], "no folder '/proc/nope' for the socket"),
    ],
)
def test_bad_option_is_a_usage_error_without_traceback(tmp_path, argv, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    result = subprocess.run(
        twistd_args(*argv), capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert message in output and "Traceback" not in output
