"""``wsfiles sync LOCAL_DIR URL [PATH]``: keep a local folder and a server folder the same.

    wsfiles sync LOCAL_DIR URL [PATH] [--once] [--up-only | --down-only]
                 [--exclude GLOB]... [--max-delete PERCENT] [--poll SECONDS]
                 [--dry-run] [--json] [--reset-state]

The work is done by :mod:`wsfiles.sync` (scan, state, plan, guard, runner, watch);
this module parses the arguments, opens the state before connecting (so a
second sync on the same folder, or a folder paired with another server, is
one line and nothing else), and says what happens: one line per action on
stdout (``--json``: one JSON object per line), conflicts, skipped names and
errors on stderr, one progress bar on stderr when it is a terminal.

Exit status: 0 in sync (``--once``, ``--dry-run``) or stopped cleanly; 1 a
failure (one line on stderr; what was done is recorded and the next run
continues); 2 bad arguments; 130 interrupted (Ctrl-C), the state consistent.

Only the standard library is imported at module level (see wsfiles.cli).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsfiles.cli import CommandFailed, Interrupted

#: Rounds ``--once`` runs at most before it gives up on a tree that keeps changing.
ONCE_ROUNDS = 10


def add_sync_command(commands: Any, run_remote: Callable[..., Any]) -> None:
    """Register ``sync`` on the ``wsfiles`` parser (``run_remote`` is wsfiles.cli's)."""
    sync = commands.add_parser(
        "sync",
        help="keep a local folder and a server folder the same (live, both ways)",
        description="Mirror LOCAL_DIR with the server's folder PATH (default: the top "
        "folder), both ways. Without --once it keeps running: local changes are uploaded "
        "and the server's changes downloaded within seconds (local changes are watched "
        "with inotify: Linux). Conflicts keep both copies: the server's keeps the name, "
        "the local one is renamed 'NAME (conflict HOST DATE TIME).EXT'. The state lives "
        "in LOCAL_DIR/.wsfiles-sync. See docs/sync.md.",
        epilog="Exit status: 0 in sync, 1 failed (one line on stderr; the next run "
        "continues), 2 bad arguments, 130 interrupted (Ctrl-C).",
    )
    sync.add_argument(
        "local_dir", metavar="LOCAL_DIR", help="the local folder (created if missing)"
    )
    sync.add_argument(
        "url",
        metavar="URL",
        help="the server: ws://HOST:PORT or wss://...; its http(s):// page address works too",
    )
    sync.add_argument(
        "path", metavar="PATH", nargs="?", default="", help="the server's folder (default: top)"
    )
    sync.add_argument("--once", action="store_true", help="sync until in sync, then exit")
    way = sync.add_mutually_exclusive_group()
    way.add_argument(
        "--up-only",
        dest="direction",
        action="store_const",
        const="up",
        default="both",
        help="only change the server (never a local file)",
    )
    way.add_argument(
        "--down-only",
        dest="direction",
        action="store_const",
        const="down",
        help="only change local files (never the server's)",
    )
    sync.add_argument(
        "--exclude",
        metavar="GLOB",
        action="append",
        default=[],
        help="skip paths or names matching GLOB on both sides (repeatable)",
    )
    sync.add_argument(
        "--dry-run", action="store_true", help="print what would be done; change nothing"
    )
    sync.add_argument(
        "--poll",
        metavar="SECONDS",
        type=_poll_seconds,
        help="live mode: look for local changes every SECONDS instead of watching with inotify "
        "(network file systems: inotify misses what other machines change there)",
    )
    sync.add_argument(
        "--max-delete",
        metavar="PERCENT",
        type=_percent,
        default=None,
        help="stop before a round that would delete more than PERCENT of the files on "
        "one side (default 50; rounds of at most 10 deletes always pass; 100: no limit)",
    )
    sync.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    sync.add_argument(
        "--reset-state",
        action="store_true",
        help="forget what was last in sync (pairing LOCAL_DIR anew: copies, never deletes)",
    )
    sync.add_argument("--token", help="client token (default: $WSFILES_TOKEN)")
    sync.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar and no action lines"
    )
    sync.set_defaults(run=run_remote(_sync, _prepare), usage_error=sync.error)


def _poll_seconds(text: str) -> float:
    """``--poll``: a number of seconds from 0.1 to a day."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= seconds <= 86400:  # (NaN fails too)
        raise argparse.ArgumentTypeError(f"must be from 0.1 to 86400 seconds: {text!r}")
    return seconds


def _percent(text: str) -> float:
    """``--max-delete``: a share from 0 to 100."""
    try:
        percent = float(text.removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 <= percent <= 100:  # (NaN fails too)
        raise argparse.ArgumentTypeError(f"must be from 0 to 100: {text!r}")
    return percent


class _NoState:
    """The state of a folder never synced, for ``--dry-run`` (which creates nothing)."""

    def all(self) -> dict[str, Any]:
        return {}

    def get(self, path: str) -> None:
        return None

    def close(self) -> None:
        pass


def _prepare(args: argparse.Namespace) -> None:
    """Check the arguments and take the state (and its lock) before connecting."""
    from wsfiles.cli_tree import folder_argument
    from wsfiles.client_tree import PathError, check_path
    from wsfiles.sync.state import StateError, SyncState, state_dir

    if args.poll is not None and (args.once or args.dry_run):
        args.usage_error("--poll is for live mode: not with --once or --dry-run")  # exits 2
    args.remote_folder = folder_argument(args.path)
    if args.remote_folder:
        try:
            check_path(args.remote_folder)
        except PathError as e:
            raise CommandFailed(f"invalid_name: PATH {args.path!r}: {e}") from None
    root = Path(args.local_dir)
    if root.exists() and not root.is_dir():
        raise CommandFailed(f"cannot sync {root}: not a folder")
    if not root.exists():
        if args.dry_run:
            raise CommandFailed(f"cannot sync {root}: no such folder")
        try:
            root.mkdir()
        except OSError as e:
            raise CommandFailed(f"cannot create {root}: {e.strerror}") from None
    args.root = root.resolve()
    if args.dry_run and not state_dir(args.root).exists():
        args.state = _NoState()
        return
    try:
        args.state = SyncState.open(
            args.root, args.url, args.remote_folder, reset=args.reset_state and not args.dry_run
        )
    except StateError as e:
        raise CommandFailed(f"{e.code}: {e.message}") from None


class _Output:
    """What the command says: action lines (or JSON) on stdout, problems on stderr."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json = args.json
        self.quiet = args.quiet
        self.bar: Any = None
        self.conflicts = 0

    def emit(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "conflict":
            self.conflicts += 1
        if self.json:
            self._out(json.dumps(event))
        line = _human(event)
        if line is None:
            return
        if kind in ("conflict", "skipped", "error"):
            self._err(f"wsfiles sync: {line}")
        elif not self.json and (not self.quiet or kind == "plan"):
            self._out(line)

    def _out(self, line: str) -> None:
        self._clear_bar()
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def _err(self, line: str) -> None:
        self._clear_bar()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def _clear_bar(self) -> None:
        if self.bar is not None:
            self.bar.clear()

    def progress(self) -> Callable[[int, int, int, int], None] | None:
        """A fresh progress display for one round (None unless stderr is a terminal)."""
        self.close_bar()
        if self.quiet or not sys.stderr.isatty():
            return None
        from wsfiles.cli_format import BAR_FORMAT, _make_bar_class

        def update(files: int, files_total: int, done: int, total: int) -> None:
            if files_total == 0:
                return
            if self.bar is None:
                self.bar = _make_bar_class()(
                    desc="sync", total=max(total, 1), bar_format=BAR_FORMAT, file=sys.stderr
                )
            self.bar.set_description_str(f"sync {files}/{files_total} files", refresh=False)
            self.bar.total = max(total, 1)
            self.bar.n = done
            # At most one redraw per tqdm mininterval, except the last.
            self.bar.refresh() if files == files_total else self.bar.update(0)

        return update

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _human(event: dict[str, Any]) -> str | None:
    """One line for an event (None: nothing to say without --json)."""
    kind, path = event["event"], event.get("path")
    if kind == "conflict":
        return (
            f"conflict: {path} changed on both sides; the server's copy keeps the name, "
            f"the local one is kept as {event['copy']}"
        )
    if kind == "skipped":
        return f"skipped {path}: {event['reason']}"
    if kind == "error":
        return event["message"]
    if kind == "retry":
        return None  # planned again next round
    if kind == "plan":  # (--dry-run: the action with why)
        return _action_line(event["action"], event, planned=True)
    return _action_line(kind, event, planned=False)


def _action_line(kind: str, event: dict[str, Any], *, planned: bool) -> str | None:
    """One line for an action (an ``action_fields`` event): done, or planned
    (``--dry-run``, saying why); None for a kind that is not an action."""
    from wsfiles.cli_format import human_size

    path, to = event.get("path"), event.get("to")
    if kind in ("upload", "download"):
        return f"{kind:<9} {path} ({human_size(event.get('size', 0))})"
    if kind == "conflict":
        return f"conflict  {path}: kept here as {to!r}; the server's copy comes down"
    verb, _, side = kind.partition("_")  # delete/rename, local/remote
    if verb not in ("delete", "rename") or side not in ("local", "remote"):
        return None
    where, cause = ("here", "on the server") if side == "local" else ("on the server", "here")
    what = f"{path} -> {to}" if verb == "rename" else path
    if planned:
        return f"{verb:<9} {what} ({where}: {verb}d {cause})"
    return f"{verb:<9} {what}" + (f" ({where})" if verb == "delete" else "")


async def _sync(client: Any, args: argparse.Namespace) -> None:
    from twisted.internet.defer import CancelledError

    from wsfiles.client_tree import require_folders
    from wsfiles.sync.guard import MAX_DELETE_PERCENT, TooManyDeletes
    from wsfiles.sync.runner import Syncer

    output = _Output(args)
    syncer: Syncer | None = None
    try:
        require_folders(client)
        syncer = Syncer(
            client,
            args.root,
            args.remote_folder,
            args.state,
            direction=args.direction,
            excludes=args.exclude,
            emit=output.emit,
            progress=output.progress,
            dry_run=args.dry_run,
            max_delete=MAX_DELETE_PERCENT if args.max_delete is None else args.max_delete,
        )
        if args.dry_run:
            await syncer.round()
        elif args.once:
            await _until_settled(syncer, args)
        else:
            from wsfiles.sync.watch import live

            await live(syncer, _reconnect(args), say=output.emit, poll=args.poll)
    except TooManyDeletes as e:
        raise CommandFailed(str(e)) from None
    except CancelledError:
        if args.interrupted:
            raise Interrupted("what was done is recorded; the next run continues") from None
        raise
    finally:
        output.close_bar()
        args.state.close()
        if syncer is not None and syncer.client is not client:  # a reconnection of ours
            await syncer.client.abort()


async def _until_settled(syncer: Any, args: argparse.Namespace) -> None:
    """``--once``: rounds until a round finds nothing to do (bounded).

    A file still being written waits for its quiet time; a conflict copy is
    uploaded by the next round; a path the server changed meanwhile is
    planned again.  A lost connection is reconnected (with backoff, bounded).
    """
    from wsfiles.sync.localtree import QUIET_SECONDS
    from wsfiles.sync.watch import pause, reconnect_with_backoff

    last = None
    for _ in range(ONCE_ROUNDS):
        try:
            last = await syncer.round()
        except Exception as e:
            from wsfiles.sync.watch import is_connection_error

            if not is_connection_error(e, syncer.client):
                raise
            await syncer.client.abort()  # whatever is left of it
            syncer.client = await reconnect_with_backoff(_reconnect(args), attempts=5)
            continue
        if last.settled:
            return
        if last.plan.waiting:
            await pause(QUIET_SECONDS)
    left = []
    if last is not None:
        left = list(last.plan.waiting) + [p for p, _ in last.result.retry + last.result.failed]
    shown = ", ".join(left[:3]) + (" ..." if len(left) > 3 else "")
    raise CommandFailed(
        f"not in sync after {ONCE_ROUNDS} rounds (still changing or failing: {shown}); "
        "what was done is recorded"
    )


def _reconnect(args: argparse.Namespace) -> Callable[[], Any]:
    """A new connection to the same server, as the first one was made."""

    async def connect_again() -> Any:
        from wsfiles.client import COMMAND_SUBPROTOCOLS, connect

        token = args.token or os.environ.get("WSFILES_TOKEN") or None
        return await connect(args.url, token, subprotocols=COMMAND_SUBPROTOCOLS)

    return connect_again
