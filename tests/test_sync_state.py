"""wsfiles.sync.state: the state survives reopening, belongs to one pairing, locks its folder."""

from __future__ import annotations

import sqlite3

import pytest

from wsfiles.sync.model import Synced
from wsfiles.sync.state import (
    STATE_DIR,
    StateError,
    StateLocked,
    StateMismatch,
    SyncState,
    pairing_url,
    partial_path,
)

URL = "ws://127.0.0.1:8080"


def row(path: str, sha: str = "a" * 64, size: int = 3) -> Synced:
    return Synced(path, size, sha, 1_000, 42, 1.5)


def test_records_survive_close_and_reopen(tmp_path):
    with SyncState.open(tmp_path, URL, "docs") as state:
        state.record(row("a.txt"))
        state.record(row("b/c.txt", "b" * 64))
        state.record(row("gone.txt"))
        state.forget("gone.txt")
        state.rename("b/c.txt", "b/d.txt")
    assert (tmp_path / STATE_DIR / "state.sqlite3").is_file()
    with SyncState.open(tmp_path, URL, "docs") as state:
        assert state.all() == {"a.txt": row("a.txt"), "b/d.txt": row("b/d.txt", "b" * 64)}
        assert state.get("gone.txt") is None
        assert (state.url, state.remote_path) == (URL, "docs")


def test_rename_over_an_existing_row_replaces_it(tmp_path):
    with SyncState.open(tmp_path, URL) as state:
        state.record(row("a", "1" * 64))
        state.record(row("b", "2" * 64))
        state.rename("a", "b")
        assert state.all() == {"b": row("b", "1" * 64)}


@pytest.mark.parametrize(
    ("url", "path"),
    [("ws://other.example:8080", "docs"), (URL, "other"), (URL, "")],
)
def test_another_pairing_is_refused_unless_reset(tmp_path, url, path):
    with SyncState.open(tmp_path, URL, "docs") as state:
        state.record(row("a.txt"))
    with pytest.raises(StateMismatch) as refused:
        SyncState.open(tmp_path, url, path)
    message = str(refused.value)
    assert "\n" not in message
    assert "ws://127.0.0.1:8080 folder 'docs'" in message
    assert refused.value.code == "state_mismatch"
    # The refusal changed nothing, and released the lock.
    with SyncState.open(tmp_path, URL, "docs") as state:
        assert list(state.all()) == ["a.txt"]
    with SyncState.open(tmp_path, url, path, reset=True) as state:
        assert state.all() == {}
    with SyncState.open(tmp_path, url, path) as state:
        assert state.all() == {}


def test_credentials_are_not_stored_and_equal_urls_match(tmp_path):
    assert pairing_url("WS://bob:secret@Host:1/x/?token=t#f") == "ws://host:1/x"
    with SyncState.open(tmp_path, "ws://bob:secret@host:1/x/?token=t") as state:
        state.record(row("a"))
    assert b"secret" not in (tmp_path / STATE_DIR / "state.sqlite3").read_bytes()
    with SyncState.open(tmp_path, "ws://host:1/x") as state:
        assert list(state.all()) == ["a"]


def test_a_second_process_on_the_same_folder_is_refused(tmp_path):
    with SyncState.open(tmp_path, URL), pytest.raises(StateLocked):
        SyncState.open(tmp_path, URL)
    SyncState.open(tmp_path, URL).close()


def test_batch_commits_together_or_not_at_all(tmp_path):
    with SyncState.open(tmp_path, URL) as state:
        with pytest.raises(RuntimeError), state.batch():
            state.record(row("a"))
            state.record(row("b"))
            raise RuntimeError
        assert state.all() == {}
        with state.batch():
            state.record(row("a"))
            state.record(row("b"))
    with SyncState.open(tmp_path, URL) as state:
        assert sorted(state.all()) == ["a", "b"]


def test_each_record_is_committed_at_once_in_wal_mode(tmp_path):
    with SyncState.open(tmp_path, URL) as state:
        state.record(row("a"))
        # Another connection (as after a crash) sees the committed row.
        other = sqlite3.connect(tmp_path / STATE_DIR / "state.sqlite3")
        try:
            assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert other.execute("SELECT path FROM files").fetchall() == [("a",)]
        finally:
            other.close()


def test_a_broken_state_file_is_a_clear_error(tmp_path):
    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / "state.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StateError, match="not a usable sync state"):
        SyncState.open(tmp_path, URL)
    with SyncState.open(tmp_path, URL, reset=True) as state:
        state.record(row("a"))
    with SyncState.open(tmp_path, URL) as state:
        assert list(state.all()) == ["a"]


def test_partial_path_is_flat_stable_and_inside_the_state_folder(tmp_path):
    deep = "a/" * 30 + "é" * 100
    first = partial_path(tmp_path, deep)
    assert first == partial_path(tmp_path, deep)
    assert first.parent == tmp_path / STATE_DIR / "partial"
    assert first.parent.is_dir()
    assert len(first.name) == 64
    assert partial_path(tmp_path, "a/b") != partial_path(tmp_path, "a_b")
