"""The ``wsfiles`` command line, run as a subprocess against a real twistd."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest_twisted
from conftest import BIN, TEARDOWN_TIMEOUT, run_process, spawn_process
from twisted.internet import reactor, task


def spawn(*args: str, env: dict | None = None, cwd: Path | None = None):
    return spawn_process([str(BIN / "wsfiles"), *args], env=env, cwd=cwd)


async def run(*args: str, **kwargs) -> tuple[int, str, str]:
    """Run the CLI without blocking the reactor (the server may be in this process)."""
    return await run_process([str(BIN / "wsfiles"), *args], **kwargs)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest_twisted.ensureDeferred
async def test_put_ls_get_mv_rm_with_a_token(twistd_factory, tmp_path):
    users = tmp_path / "users"
    code, token, _ = await run("user", "add", "--users", str(users), "alice")
    assert code == 0
    srv = await twistd_factory("--users", str(users))
    env = {"WSFILES_TOKEN": token.strip()}
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_bytes(b"alpha")
    (work / "b.bin").write_bytes(os.urandom(3 * 1024 * 1024))

    assert (await run("put", srv.url, "a.txt", "b.bin", env=env, cwd=work))[0] == 0
    code, out, err = await run("ls", srv.url, "--json", env=env)
    assert code == 0, err
    assert [(f["name"], f["size"]) for f in json.loads(out)] == [
        ("a.txt", 5),
        ("b.bin", 3 * 1024 * 1024),
    ]
    code, out, _ = await run("ls", srv.url, env=env)
    assert "a.txt" in out and "b.bin" in out

    code, _, err = await run("get", srv.url, "b.bin", "-o", str(tmp_path / "copy"), env=env)
    assert code == 0, err
    assert sha(tmp_path / "copy") == sha(work / "b.bin")
    assert not (tmp_path / "copy.wsfiles-part").exists()

    assert (await run("mv", srv.url, "a.txt", "c.txt", env=env))[0] == 0
    code, _, err = await run("mv", srv.url, "c.txt", "b.bin", env=env)
    assert code == 1 and "exists" in err and len(err.strip().splitlines()) == 1
    assert (await run("rm", srv.url, "c.txt", env=env))[0] == 0
    code, _, err = await run("rm", srv.url, "c.txt", env=env)
    assert code == 1 and "not_found" in err

    code, _, err = await run("ls", srv.url, "--token", "wrong.token")
    assert code == 1 and "connection_failed" in err and "401" in err
    code, _, err = await run("get", srv.url, "missing", "-o", str(tmp_path / "m"), env=env)
    assert code == 1 and "not_found" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.wsfiles-part").exists()


async def _wait_until(condition, what: str) -> None:
    """Poll another process's visible state, bounded (it cannot signal us)."""
    for _ in range(1000):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_an_interrupted_put_and_get_resume(twistd_factory, tmp_path):
    srv = await twistd_factory()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(96 * 1024 * 1024))
    partials = srv.root / ".wsfiles-partial" / "@anonymous"

    def partial_size() -> int:
        return sum(p.stat().st_size for p in partials.glob("*.part")) if partials.exists() else 0

    process, proto = spawn("put", srv.url, str(big), "--resume")
    await _wait_until(lambda: partial_size() > 8 * 1024 * 1024 or proto.ended.called, "a partial")
    process.signalProcess(signal.SIGKILL)
    await proto.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
    assert not (srv.root / "big.bin").exists()
    code, _, err = await run("put", srv.url, str(big), "--resume")
    assert code == 0, err
    assert sha(srv.root / "big.bin") == sha(big)
    assert "(from offset 0)" not in srv.output.split("save 'big.bin'")[-1].split("\n")[0]

    target = tmp_path / "copy.bin"
    partial = Path(str(target) + ".wsfiles-part")
    process, proto = spawn("get", srv.url, "big.bin", "-o", str(target), "--resume")
    await _wait_until(
        lambda: (
            (partial.exists() and partial.stat().st_size > 8 * 1024 * 1024) or proto.ended.called
        ),
        "a partial download",
    )
    process.signalProcess(signal.SIGKILL)
    await proto.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
    assert partial.exists() and not target.exists()
    code, _, err = await run("get", srv.url, "big.bin", "-o", str(target), "--resume")
    assert code == 0, err
    assert sha(target) == sha(big) and not partial.exists()
    last_get = srv.output.split("get 'big.bin'")[-1].split("\n")[0]
    assert "(from offset 0)" not in last_get


def test_python_m_wsfiles_runs_the_same_cli():
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "wsfiles", "ls", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--json" in result.stdout
