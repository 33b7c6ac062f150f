"""``wsfiles``: the command line (the server itself is ``twistd wsfiles``).

    wsfiles ls URL [PATH] [-R] [--json] [-b]
    wsfiles get URL NAME [-o PATH] [--resume]
    wsfiles get -r URL PATH [-o DIR] [--resume]
    wsfiles put URL PATH... [--name N] [--resume]
    wsfiles put -r URL DIR [DEST] [--resume]
    wsfiles rm URL NAME
    wsfiles mv URL NAME NEW [--overwrite]
    wsfiles mkdir [-p] URL PATH
    wsfiles rmdir [-r] URL PATH
    wsfiles share URL PATH [--expires 1d] [--max-downloads N] [--password]
    wsfiles shares URL | wsfiles unshare URL ID
    wsfiles sync LOCAL_DIR URL [PATH] [--once] [--up-only|--down-only] [--dry-run]
    wsfiles user list|add|remove|rotate|set --users FILE [NAME] [settings]

Names may be paths (``docs/2026/report.pdf``) on a server with folders
(protocol 1.2); the folder commands live in :mod:`wsfiles.cli_tree`.

URL is the server's base, e.g. ``ws://localhost:8080``, ``wss://...``, or the
``http(s)://`` address of its web page.  The token comes from ``--token`` or
``WSFILES_TOKEN``.  Exit status 0 on success; 130 after Ctrl-C; otherwise 1.
Whatever goes wrong is one line on stderr, never a traceback.

Only the standard library is imported at module level: Ctrl-C while Twisted
and Autobahn load (most of the start-up time) lands in :func:`main`'s
``except KeyboardInterrupt``, and once the reactor runs, SIGINT is ours.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

#: Suffix of a download in progress; ``get --resume`` continues it.
PARTIAL_SUFFIX = ".wsfiles-part"
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 128 + signal.SIGINT
#: Signals that interrupt a running command: Ctrl-C, and the polite kill.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: How long an interrupted command may take to drop its connections.
ABORT_TIMEOUT = 5.0

BINARY_UNITS = "sizes in binary units: 1 KiB = 1024 bytes, 1 MiB = 1024 KiB"


class CommandFailed(Exception):
    """Ends the command with a one-line message and exit status 1."""


class Interrupted(Exception):
    """The user pressed Ctrl-C; the message says what was kept, if anything."""


# -- the commands ---------------------------------------------------------------


async def _ls(client: Any, args: argparse.Namespace) -> None:
    from wsfiles.cli_format import listing_lines
    from wsfiles.cli_tree import folder_argument

    files = await client.list(folder_argument(args.path), recursive=args.recursive)
    if args.json:
        sys.stdout.write(json.dumps(files) + "\n")
        return
    for line in listing_lines(files, exact=args.bytes):
        sys.stdout.write(line + "\n")


def _get_target(args: argparse.Namespace) -> str:
    """Where ``get`` writes, checked before anything is connected or touched.

    NAME is checked with the protocol's rule for paths (wsfiles.client_tree),
    so a name such as ``../etc/passwd`` is refused as ``invalid_name`` here,
    before it can name a local file.  A path (``docs/a.txt``) is written
    under its last name (``a.txt``).
    """
    from wsfiles.client_tree import PathError, check_path

    try:
        check_path(args.name)
    except PathError as e:
        raise CommandFailed(f"invalid_name: {e}") from None
    base = args.name.rsplit("/", 1)[-1]
    target = args.output or base
    if target == "-":
        return target
    if os.path.isdir(target):
        target = os.path.join(target, base)
    folder = os.path.dirname(target) or "."
    if not os.path.isdir(folder):
        raise CommandFailed(f"cannot write {target}: there is no folder {folder}")
    return target


async def _get(client: Any, args: argparse.Namespace) -> None:
    """Download a file (or with ``-r`` a folder's tree, wsfiles.cli_tree)."""
    from wsfiles.cli_format import progress_bar

    if args.recursive:
        from wsfiles.cli_tree import get_tree

        await get_tree(client, args)
        return
    target = args.target
    if target == "-":
        await client.download(args.name, sys.stdout.buffer, hash=preferred_hash(client))
        return
    with progress_bar(args.name, args.quiet) as progress:
        await download_file(client, args.name, target, args, progress)


def preferred_hash(client: Any) -> str:
    """BLAKE3 where the server offers it (a third of SHA-256's CPU at both
    ends), else SHA-256: what every transfer of the command asks for."""
    from wsfiles.hashes import preferred

    return preferred(client)


async def download_file(
    client: Any,
    name: str,
    target: str,
    args: argparse.Namespace,
    progress: Callable[[int, int], None] | None,
    resume_hint: str = "'wsfiles get --resume' continues it",
) -> None:
    """Download to ``TARGET.wsfiles-part``; rename only once the SHA-256 checks out.

    The part file is kept when the download is interrupted (Ctrl-C) or cut
    off with bytes in it, so ``get --resume`` continues it; it is removed when
    it is empty or its bytes are of no use (not_found, checksum_mismatch).
    """
    from twisted.internet.defer import CancelledError

    from wsfiles.cli_format import human_size
    from wsfiles.client import CHECKSUM_MISMATCH, WsfilesError

    partial = target + PARTIAL_SUFFIX
    mode = "a+b" if args.resume and os.path.exists(partial) else "w+b"
    try:
        sink = open(partial, mode)  # noqa: SIM115 (closed below, before any rename)
    except OSError as e:
        raise CommandFailed(f"cannot write {target}: {e.strerror}") from None
    try:
        sink.seek(0, os.SEEK_END)
        await client.download(
            name, sink, resume=args.resume, progress=progress, hash=preferred_hash(client)
        )
    except BaseException as e:
        sink.close()
        held = os.path.getsize(partial) if os.path.exists(partial) else 0
        useless = isinstance(e, WsfilesError) and e.code in (CHECKSUM_MISMATCH, "not_found")
        if held == 0 or useless:
            _remove(partial)
            if isinstance(e, CancelledError) or args.interrupted:
                raise Interrupted("nothing was downloaded") from None
            raise
        kept = f"kept {partial} ({human_size(held)}); {resume_hint}"
        if isinstance(e, CancelledError) or args.interrupted:
            raise Interrupted(kept) from None
        if isinstance(e, WsfilesError):
            raise CommandFailed(f"{e.code}: {e.message}; {kept}") from None
        raise
    sink.close()
    try:
        os.replace(partial, target)
    except OSError as e:
        raise CommandFailed(f"cannot write {target}: {e.strerror}") from None


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _put(client: Any, args: argparse.Namespace) -> None:
    from twisted.internet.defer import CancelledError

    from wsfiles.cli_format import progress_bar

    if args.recursive:
        from wsfiles.cli_tree import put_tree

        await put_tree(client, args)
        return
    for path in args.paths:
        name = args.name or os.path.basename(path)
        try:
            source = open(path, "rb")  # noqa: SIM115
        except OSError as e:
            raise CommandFailed(f"cannot read {path}: {e.strerror}") from None
        try:
            with source, progress_bar(name, args.quiet) as progress:
                await client.upload(
                    name,
                    source,
                    resume=args.resume,
                    progress=progress,
                    hash=preferred_hash(client),
                )
        except Exception as e:
            if not (isinstance(e, CancelledError) or args.interrupted):
                raise
            if args.resume:
                raise Interrupted(
                    f"the server keeps what it received of {name!r}; "
                    "'wsfiles put --resume' continues it"
                ) from None
            raise Interrupted(f"{name!r} was not stored") from None


async def _rm(client: Any, args: argparse.Namespace) -> None:
    from wsfiles.client import WsfilesError

    try:
        await client.delete(args.name)
    except WsfilesError as e:
        if e.code == "is_a_folder":
            raise CommandFailed(
                f"is_a_folder: {args.name!r} is a folder; use 'wsfiles rmdir'"
            ) from None
        raise


async def _mv(client: Any, args: argparse.Namespace) -> None:
    from wsfiles.client import WsfilesError

    try:
        await client.rename(args.name, args.new, overwrite=args.overwrite)
    except WsfilesError as e:
        if e.code == "exists" and not args.overwrite:
            raise CommandFailed(
                f"exists: {args.new!r} exists; add --overwrite to replace it "
                "(files only: a folder never replaces anything and is never replaced)"
            ) from None
        if e.code == "exists":  # even with overwrite: a folder on one side
            raise CommandFailed(
                f"exists: {args.new!r} exists and --overwrite does not replace it "
                "(a folder never replaces anything and is never replaced)"
            ) from None
        raise


# -- running a remote command ----------------------------------------------------


def _connection_line(error: Any, token: str | None) -> str:
    """The one line for a refused or failed connection."""
    if error.http_status == 401:
        if token is None:
            return "this server needs a token (HTTP 401): give one with --token or WSFILES_TOKEN"
        return "the server refused the token (HTTP 401): check --token or WSFILES_TOKEN"
    return f"{error.code}: {error.message}"


def _run_remote(
    action: Callable[[Any, argparse.Namespace], Awaitable[None]],
    prepare: Callable[[argparse.Namespace], None] | None = None,
) -> Callable[[argparse.Namespace], int]:
    """Run ``action`` on a connected client under the reactor.

    Failures become one line and exit status 1.  SIGINT (Ctrl-C) cancels the
    action, which keeps what a later ``--resume`` can use; the connections
    are dropped and the command exits with status 130 and one line.  SIGTERM
    does the same, then ends the process by SIGTERM (a shell says 143).
    """

    def run(args: argparse.Namespace) -> int:
        from twisted.internet import defer, reactor
        from twisted.internet.error import ReactorNotRunning
        from twisted.python.failure import Failure

        from wsfiles.client import (
            COMMAND_SUBPROTOCOLS,
            WsfilesError,
            connect,
            websocket_base_url,
        )

        token = args.token or os.environ.get("WSFILES_TOKEN") or None
        try:
            url = websocket_base_url(args.url)
            if prepare is not None:
                prepare(args)
        except WsfilesError as e:
            return _fail(args, f"{e.code}: {e.message}")
        except CommandFailed as e:
            return _fail(args, str(e))
        _quiet_twisted_log()

        args.interrupted = False  # set on Ctrl-C: the action says what it kept
        running = True
        lines: list[str] = []

        async def work() -> None:
            try:
                client = await connect(url, token, subprotocols=COMMAND_SUBPROTOCOLS)
            except WsfilesError as e:
                if e.code == "connection_failed":
                    raise CommandFailed(_connection_line(e, token)) from None
                raise
            try:
                await action(client, args)
            finally:
                if args.interrupted:
                    await client.abort()
                else:
                    with contextlib.suppress(Exception):  # the action's outcome counts
                        await client.close()

        def stop() -> None:
            with contextlib.suppress(ReactorNotRunning):  # (already stopping)
                reactor.stop()

        def finish(result: object) -> None:
            if isinstance(result, Failure):
                lines.append(_failure_line(result, args.interrupted))
            if reactor.running:
                stop()
            else:
                reactor.callWhenRunning(stop)

        def interrupt() -> None:
            if finished.called:
                return
            if args.interrupted:  # a second Ctrl-C: stop without waiting
                stop()
                return
            args.interrupted = True
            finished.cancel()
            # Bounded: a command stuck past its cancellation still ends.
            reactor.callLater(ABORT_TIMEOUT, lambda: finished.called or stop())

        stopped_by: list[int] = []  # the signals that came, first first

        def on_signal(signum: int, frame: Any) -> None:
            stopped_by.append(signum)
            if running:  # (never touch a stopped reactor)
                reactor.callFromThread(interrupt)

        # SIGTERM (systemctl stop, docker stop, kill) ends the command as Ctrl-C
        # does; an ignored signal stays ignored (SIGINT in a background job).
        handled = [s for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN]
        for signum in handled:
            signal.signal(signum, on_signal)
        finished = defer.ensureDeferred(work())
        finished.addBoth(finish)
        try:
            reactor.run(installSignalHandlers=False)
        finally:
            running = False
            for signum in handled:
                signal.signal(signum, signal.SIG_IGN)  # one line, whatever comes now
        if args.interrupted and (lines or not finished.called):
            detail = lines[0] if lines else ""
            if stopped_by and stopped_by[0] == signal.SIGTERM:
                status = _fail(
                    args, "terminated" + (f"; {detail}" if detail else ""), 128 + signal.SIGTERM
                )
                _die_by(signal.SIGTERM)
                return status  # PID 1 of a container: the kernel ignores its own kill
            return _fail(args, "interrupted" + (f"; {detail}" if detail else ""), EXIT_INTERRUPTED)
        if lines:
            return _fail(args, lines[0])
        return 0

    return run


def _die_by(signum: int) -> None:
    """End the process by ``signum``'s default action, once its line is out.

    What a shell and systemd expect of a program stopped by a signal (status
    128+N; for systemd a clean stop, where exit status 143 would be a
    failure), as Python itself does after an unhandled KeyboardInterrupt.
    As PID 1 of a container (``docker run`` without ``--init``) the kernel
    ignores the signal, and the caller exits with status 128+N instead.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _failure_line(failure: Any, interrupted: bool) -> str:
    """One line for how the action failed (empty: plainly interrupted).

    Once interrupted, whatever the cancellation caused (a connection attempt
    given up, say) is no news: only what the action kept is said.
    """
    from wsfiles.client import WsfilesError

    error = failure.value
    if isinstance(error, Interrupted):
        return str(error)
    if interrupted:
        return ""
    if isinstance(error, WsfilesError):
        from wsfiles.client_tree import NOT_SUPPORTED

        if error.code == NOT_SUPPORTED:  # the one line, as the folder commands promise
            return error.message
        return f"{error.code}: {error.message}"
    if isinstance(error, CommandFailed):
        return str(error)
    if isinstance(error, OSError):
        where = f" {error.filename}" if error.filename else ""
        return f"cannot use{where}: {error.strerror or error}"
    return f"internal error: {type(error).__name__}: {error}"


def _fail(args: argparse.Namespace, line: str, status: int = 1) -> int:
    sys.stderr.write(f"wsfiles {args.command}: {line}\n")
    return status


def _quiet_twisted_log() -> None:
    """Nothing from Twisted's log on stderr (the command's contract is one line).

    Until logging is started Twisted prints errors to stderr; a connection
    dropped on Ctrl-C could do so.  ``WSFILES_DEBUG=1`` shows the log instead.
    """
    from twisted.logger import globalLogBeginner, textFileLogObserver

    observer = textFileLogObserver(sys.stderr) if os.environ.get("WSFILES_DEBUG") else None
    globalLogBeginner.beginLoggingTo(
        [observer or (lambda event: None)], discardBuffer=True, redirectStandardIO=False
    )


def _prepare_get(args: argparse.Namespace) -> None:
    if args.recursive:
        from wsfiles.cli_tree import prepare_get_tree

        prepare_get_tree(args)
        return
    args.target = _get_target(args)


def _prepare_put(args: argparse.Namespace) -> None:
    if args.recursive:
        from wsfiles.cli_tree import prepare_put_tree

        prepare_put_tree(args)
    elif args.name and len(args.paths) > 1:
        raise CommandFailed("--name needs exactly one PATH")


# -- the parser ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsfiles",
        description="wsfiles client and tools. Run the server with 'twistd wsfiles'.",
        epilog="Exit status: 0 done, 1 failed (one line on stderr), 130 interrupted (Ctrl-C).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def remote(
        name: str,
        help_text: str,
        action: Callable[..., Any],
        prepare: Callable[[argparse.Namespace], None] | None = None,
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=description or help_text)
        sub.add_argument(
            "url",
            metavar="URL",
            help="the server: ws://HOST:PORT or wss://...; its http(s):// page address works too",
        )
        sub.add_argument("--token", help="client token (default: $WSFILES_TOKEN)")
        sub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        sub.set_defaults(run=_run_remote(action, prepare))
        return sub

    ls = remote(
        "ls",
        "list your files",
        _ls,
        description=f"List your files ({BINARY_UNITS}). Folders end in '/'.",
    )
    ls.add_argument("path", metavar="PATH", nargs="?", default="", help="a folder (default: top)")
    ls.add_argument(
        "-R", "--recursive", action="store_true", help="the whole tree, by path (folders first)"
    )
    ls.add_argument("--json", action="store_true", help="print the list as JSON (exact bytes)")
    ls.add_argument(
        "-b", "--bytes", action="store_true", help="exact sizes in bytes instead of KiB/MiB/GiB"
    )
    get = remote(
        "get",
        "download a file (-r: a folder)",
        _get,
        _prepare_get,
        description="Download a file into NAME.wsfiles-part, renamed to NAME once its SHA-256 "
        "checks out. Interrupted (Ctrl-C, a lost connection), the part file is kept: "
        "--resume continues it. With -r, NAME is a folder: its whole tree is downloaded "
        "into DIR (-o; default: the folder's last name here), each file that way; "
        "files already in DIR are replaced, and -r --resume continues the part files "
        "(finished files are fetched again). "
        "The progress bar counts in binary units (1 MiB = 1024 KiB).",
    )
    get.add_argument("name", metavar="NAME", help="a file, or a folder with -r (a path)")
    get.add_argument(
        "-o", "--output", metavar="PATH", help="where to write ('-': stdout; with -r: a folder)"
    )
    get.add_argument("-r", "--recursive", action="store_true", help="download a folder's tree")
    get.add_argument("--resume", action="store_true", help="continue an interrupted download")
    put = remote(
        "put",
        "upload files (-r: a folder)",
        _put,
        _prepare_put,
        description="Upload files. With -r: put -r URL DIR [DEST] uploads the local folder "
        "DIR's whole tree into the server's folder DEST (default: DIR's name at the top), "
        "creating folders, empty ones too; files already there are replaced; symlinks and "
        "special files are skipped (and said). Every local name is checked first: "
        "one the protocol cannot carry stops the command before anything is sent.",
    )
    put.add_argument("paths", metavar="PATH", nargs="+", help="files; with -r: DIR [DEST]")
    put.add_argument("--name", help="store under this name or path (one PATH only)")
    put.add_argument("-r", "--recursive", action="store_true", help="upload a folder's tree")
    put.add_argument("--resume", action="store_true", help="resume an interrupted upload")
    rm = remote("rm", "delete a file", _rm)
    rm.add_argument("name", metavar="NAME")
    mv = remote("mv", "rename or move a file or folder (paths: across folders)", _mv)
    mv.add_argument("name", metavar="NAME")
    mv.add_argument("new", metavar="NEW")
    mv.add_argument("--overwrite", action="store_true", help="replace NEW if it is a file")
    from wsfiles.cli_tree import add_folder_commands

    add_folder_commands(remote)
    from wsfiles.cli_share import add_share_commands

    add_share_commands(remote)  # share, shares, unshare (wsfiles/cli_share.py)
    from wsfiles.cli_sync import add_sync_command

    add_sync_command(commands, _run_remote)  # sync LOCAL_DIR URL [PATH] (wsfiles/cli_sync.py)

    # wsfiles user ...: the users file, in its own module (wsfiles/users_cli.py).
    from wsfiles.users_cli import add_user_commands

    user = commands.add_parser("user", help="manage the users file (safe while servers run)")
    add_user_commands(user.add_subparsers(dest="user_command", required=True))

    # wsfiles s3 ...: object store tools, in their own module (wsfiles/s3admin.py).
    from wsfiles.s3admin import add_s3_commands

    add_s3_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; Ctrl-C before the reactor runs is one line and status 130."""
    try:
        args = build_parser().parse_args(argv)
        from wsfiles.tuning import tune_malloc

        tune_malloc()  # big buffers reused: cheaper uploads (wsfiles.tuning)
        return args.run(args)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write("wsfiles: interrupted\n")
        return EXIT_INTERRUPTED
