"""The users file and ``wsfiles user add``."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import pytest_twisted
from conftest import BIN

from wsfiles.users import UserDirectory, UsersFileError, add_user, parse_users


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "wsfiles"), *args], capture_output=True, text=True, timeout=60)


def test_user_add_prints_only_the_token_and_stores_only_a_hash(tmp_path):
    users = tmp_path / "users"
    result = run_cli("user", "add", "--users", str(users), "alice")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert len(token) >= 32
    text = users.read_text()
    assert "alice" in text
    assert token not in text and token.split(".")[1] not in text
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600


def test_adding_an_existing_name_is_an_error(tmp_path):
    users = tmp_path / "users"
    assert run_cli("user", "add", "--users", str(users), "bob").returncode == 0
    before = users.read_text()
    result = run_cli("user", "add", "--users", str(users), "bob")
    assert result.returncode != 0
    assert "already exists" in result.stderr
    assert result.stdout == ""
    assert users.read_text() == before


@pytest_twisted.ensureDeferred
async def test_adding_to_a_hand_edited_file_without_a_final_newline_keeps_both_users(tmp_path):
    users = tmp_path / "users"
    alice = add_user(str(users), "alice")
    users.write_text(users.read_text().rstrip("\n"))  # as an editor might save it
    bob = add_user(str(users), "bob")
    directory = UserDirectory(str(users))
    assert await directory.authenticate(alice) == "alice"
    assert await directory.authenticate(bob) == "bob"


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 65, "sp ace", "ü"])
def test_invalid_client_names_are_refused(tmp_path, name):
    with pytest.raises(UsersFileError):
        add_user(str(tmp_path / "users"), name)
    assert not (tmp_path / "users").exists()


def test_malformed_file_is_reported_with_its_line():
    with pytest.raises(UsersFileError, match=":2:"):
        parse_users("# comment\nonly-two fields\n")


@pytest_twisted.ensureDeferred
async def test_authenticate_right_wrong_and_reloaded(tmp_path):
    path = str(tmp_path / "users")
    alice = add_user(path, "alice")
    directory = UserDirectory(path)
    assert await directory.authenticate(alice) == "alice"
    assert await directory.authenticate(alice + "0") is None
    assert await directory.authenticate("garbage") is None
    token_id, secret = alice.split(".")
    assert await directory.authenticate(f"{token_id}.{'0' * len(secret)}") is None
    # A user added while the server runs is known without a restart.
    bob = add_user(path, "bob")
    assert await directory.authenticate(bob) == "bob"


@pytest.fixture
def scrypt_calls(monkeypatch):
    """Count the scrypt checks UserDirectory runs (the real check still runs)."""
    import wsfiles.users

    calls: list[str] = []
    real = wsfiles.users._verify

    def counting(secret: str, hashed: str) -> bool:
        calls.append(hashed)
        return real(secret, hashed)

    monkeypatch.setattr(wsfiles.users, "_verify", counting)
    return calls


@pytest_twisted.ensureDeferred
async def test_a_verified_token_skips_scrypt_next_time(tmp_path, scrypt_calls):
    path = str(tmp_path / "users")
    alice = add_user(path, "alice")
    directory = UserDirectory(path)
    assert await directory.authenticate(alice) == "alice"
    assert await directory.authenticate(alice) == "alice"
    assert await directory.authenticate(alice) == "alice"
    assert len(scrypt_calls) == 1
    # Nothing secret is kept: the memory holds neither the token nor its secret.
    remembered = repr(directory._verified._good)
    assert alice not in remembered and alice.split(".")[1] not in remembered


@pytest_twisted.ensureDeferred
async def test_a_wrong_token_is_never_remembered(tmp_path, scrypt_calls):
    path = str(tmp_path / "users")
    alice = add_user(path, "alice")
    directory = UserDirectory(path)
    token_id, secret = alice.split(".")
    wrong = f"{token_id}.{'0' * len(secret)}"
    assert await directory.authenticate(wrong) is None
    assert await directory.authenticate(wrong) is None
    assert len(scrypt_calls) == 2  # checked each time, never answered from memory
    # A right token remembered does not let a wrong one with the same id through.
    assert await directory.authenticate(alice) == "alice"
    assert await directory.authenticate(wrong) is None
    assert await directory.authenticate(alice + "0") is None
    assert await directory.authenticate(alice[:-1]) is None


@pytest_twisted.ensureDeferred
async def test_concurrent_checks_of_one_token_share_one_scrypt(tmp_path, scrypt_calls):
    from twisted.internet import defer

    path = str(tmp_path / "users")
    alice = add_user(path, "alice")
    directory = UserDirectory(path)
    token_id, secret = alice.split(".")
    wrong = f"{token_id}.{'1' * len(secret)}"
    names = await defer.gatherResults(
        [directory.authenticate(alice) for _ in range(20)]
        + [directory.authenticate(wrong) for _ in range(5)]
    )
    assert names == ["alice"] * 20 + [None] * 5
    assert len(scrypt_calls) == 2


@pytest_twisted.ensureDeferred
async def test_a_token_removed_from_the_file_stops_working(tmp_path, scrypt_calls):
    path = tmp_path / "users"
    alice = add_user(str(path), "alice")
    bob = add_user(str(path), "bob")
    directory = UserDirectory(str(path))
    assert await directory.authenticate(alice) == "alice"
    assert await directory.authenticate(bob) == "bob"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if not line.startswith("alice ")))
    assert await directory.authenticate(alice) is None
    assert await directory.authenticate(bob) == "bob"  # checked again after the change
    assert len(scrypt_calls) == 3
    # Given a new token, the old one stays refused and the new one works.
    carol = add_user(str(path), "carol")
    assert await directory.authenticate(carol) == "carol"
    assert await directory.authenticate(alice) is None


@pytest_twisted.ensureDeferred
async def test_the_memory_of_verified_tokens_is_bounded(tmp_path, scrypt_calls):
    path = str(tmp_path / "users")
    tokens = [add_user(path, f"user{i}") for i in range(4)]
    directory = UserDirectory(path, cache_size=2)
    for token in tokens:
        assert await directory.authenticate(token) is not None
    assert len(directory._verified) == 2
    assert await directory.authenticate(tokens[-1]) == "user3"  # still remembered
    assert len(scrypt_calls) == 4
    assert await directory.authenticate(tokens[0]) == "user0"  # forgotten: scrypt again
    assert len(scrypt_calls) == 5


@pytest_twisted.ensureDeferred
async def test_at_most_two_scrypt_checks_run_at_once(tmp_path, monkeypatch):
    import threading

    from twisted.internet import defer

    import wsfiles.users

    path = str(tmp_path / "users")
    tokens = [add_user(path, f"user{i}") for i in range(6)]
    directory = UserDirectory(path)
    lock = threading.Lock()
    running = [0]
    most = [0]
    real = wsfiles.users._verify

    def counting(secret: str, hashed: str) -> bool:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return real(secret, hashed)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(wsfiles.users, "_verify", counting)
    names = await defer.gatherResults([directory.authenticate(t) for t in tokens])
    assert names == [f"user{i}" for i in range(6)]
    assert most[0] <= wsfiles.users.SCRYPT_AT_ONCE == 2
