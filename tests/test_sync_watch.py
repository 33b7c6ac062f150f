"""The live sync's watch on the local folder (wsfiles/sync/watch.py): inotify,
or a rescan every few seconds, asked for with ``--poll`` or where inotify is
missing.  A fake clock; the end-to-end run is in test_sync_e2e.py."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import inotify, task

from wsfiles.sync import watch


def poll_once(local: watch._LocalWatch, wake: watch._Wakeup, clock: task.Clock, seconds: float):
    """Nothing wakes the sync until ``seconds`` pass; then one rescan is asked for."""
    clock.advance(seconds - 0.01)
    assert not wake.pending
    clock.advance(0.01)
    assert wake.pending
    wake.pending = False


def test_poll_asks_for_a_rescan_every_interval_instead_of_inotify(tmp_path: Path):
    wake, clock, said = watch._Wakeup(), task.Clock(), []
    local = watch._LocalWatch(tmp_path, [], wake, said.append, poll=0.5, clock=clock)
    try:
        assert local._notifier is None and said == []  # asked for: no notice
        poll_once(local, wake, clock, 0.5)
        poll_once(local, wake, clock, 0.5)
    finally:
        local.stop()
    assert clock.getDelayedCalls() == []


def test_without_inotify_the_folder_is_polled_and_the_user_told(tmp_path: Path, monkeypatch):
    def no_inotify(*args: object) -> None:
        raise OSError("inotify_init failed")

    monkeypatch.setattr(inotify, "INotify", no_inotify)
    wake, clock, said = watch._Wakeup(), task.Clock(), []
    local = watch._LocalWatch(tmp_path, [], wake, said.append, clock=clock)
    try:
        assert said == [
            f"local changes are polled every {watch.POLL_SECONDS:.0f} s"
            " (no inotify: inotify_init failed)"
        ]
        poll_once(local, wake, clock, watch.POLL_SECONDS)
    finally:
        local.stop()
    assert clock.getDelayedCalls() == []
