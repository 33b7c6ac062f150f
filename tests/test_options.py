"""``twistd wsfiles`` options: defaults, sizes, and clear refusals."""

from __future__ import annotations

import pytest
from twisted.python import usage

from wsfiles.sizes import parse_size
from wsfiles.tap import DEFAULT_LISTEN, Options


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path, monkeypatch):
    """Parsing creates the default --root (./wsfiles-data): keep it out of the checkout."""
    monkeypatch.chdir(tmp_path)


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults(tmp_path):
    options = parse()
    assert options["listen"] == [DEFAULT_LISTEN]
    assert options["root"] == "./wsfiles-data"
    assert (tmp_path / "wsfiles-data").is_dir()  # created if missing
    assert options["max-size"] == 1024**3
    assert options["channel-timeout"] == 30
    assert options["users"] is None


def test_listen_is_repeatable():
    options = parse("--listen", "tcp:0", "--listen", "unix:/tmp/x.sock")
    assert options["listen"] == ["tcp:0", "unix:/tmp/x.sock"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("0", 0),
        ("512", 512),
        ("64K", 64 * 1024),
        ("3m", 3 * 1024**2),
        ("1G", 1024**3),
        ("2T", 2 * 1024**4),
        ("10GiB", 10 * 1024**3),
    ],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-size", "lots"], "--max-size"),
        (["--max-size", "-1"], "--max-size"),
        (["--max-size", "1.5G"], "--max-size"),
        (["--channel-timeout", "soon"], "--channel-timeout"),
        (["--channel-timeout", "0"], "--channel-timeout"),
        (["--listen", "nonsense:1234"], "--listen"),
        (["--listen", "ssl:0:privateKey=/nonexistent/key.pem"], "/nonexistent/key.pem"),
        (["--listen", "systemd:domain=INET:index=0"], "systemd passed no socket"),
        (["--root", "/proc/nonexistent/root"], "cannot create --root"),
        (["--users", "/nonexistent/users"], "users file"),
    ],
)
def test_bad_values_are_usage_errors(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_a_root_served_with_users_is_refused_without_them(tmp_path):
    """Without --users, ROOT is the anonymous folder: once it held users'
    folders, starting without --users would show them all to anyone."""
    from wsfiles.users import add_user

    root = tmp_path / "root"
    users = tmp_path / "users"
    add_user(str(users), "alice")
    parse("--root", str(root), "--users", str(users))
    (root / "alice").mkdir()
    with pytest.raises(usage.UsageError, match="was served with --users"):
        parse("--root", str(root))
    parse("--root", str(root), "--users", str(users))  # with them: fine, as before
    (root / ".wsfiles-users").unlink()  # the operator's way to say "anonymous on purpose"
    parse("--root", str(root))


def test_a_root_this_user_cannot_write_is_refused(tmp_path, monkeypatch):
    # Permission bits do not stop root (the test command runs as root), so the
    # answer of os.access is what is changed here.
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr("wsfiles.tap.os.access", lambda path, mode: False)
    with pytest.raises(usage.UsageError, match="not writable by this user"):
        parse("--root", str(tmp_path / "locked"))


def test_a_refused_command_line_creates_no_root(tmp_path):
    with pytest.raises(usage.UsageError, match="--instance-id"):
        parse("--instance-id", "not valid!")
    assert not (tmp_path / "wsfiles-data").exists()


def test_root_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(usage.UsageError, match="not a folder"):
        parse("--root", str(path))


def test_every_option_is_documented():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    options = Options()
    names = [long for long, *_ in options.optParameters]
    names += ["listen", "allow-origin", "trusted-proxy"]
    missing = [name for name in names if f"`--{name}" not in text]
    assert missing == []
