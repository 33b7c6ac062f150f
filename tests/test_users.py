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
