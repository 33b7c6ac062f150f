"""The users file: client names and hashes of their tokens.

Format version 2 (``docs/configuration.md``, "The users file")::

    # wsfiles users v2
    NAME TOKEN_ID scrypt$N$r$p$SALT_HEX$HASH_HEX [KEY=VALUE ...]

Optional settings override the service's options for that client:
``quota=SIZE`` (``10G``, powers of 1024; ``none``: unlimited) overrides
``--quota``, ``quota_files=N`` (or ``none``) overrides ``--quota-files``,
``max_size=SIZE`` overrides ``--max-size``; ``read_only=yes`` allows only
``list`` and ``get``; ``expires=YYYY-MM-DDTHH:MM:SSZ`` ends the token then.
Version 1 is the same without the header line (written by ``user add``
before v2; it used only ``quota=`` and ``quota_files=``): it is read as it
is and gets the header when a ``wsfiles user`` command first changes it.
A header naming another version is refused.  A token is
``TOKEN_ID.SECRET`` (both hex).  The id finds the line without trying every
hash; only the scrypt hash of the secret is stored, with a salt of its own.
Lines starting with ``#`` and blank lines are ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsfiles.names import is_valid_client_name
from wsfiles.sizes import parse_size

_log = Logger()

# scrypt cost: about 16 MiB and a few tens of milliseconds; the secret is
# 128 random bits, so this guards a leaked users file, not weak passwords.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1

#: How many recently verified tokens are remembered (least recently used go first).
VERIFIED_CACHE_SIZE = 1024
#: scrypt checks running at once (each takes 16 MiB and a core); others queue.
SCRYPT_AT_ONCE = 2
#: Distinct tokens being checked (queued or running) at once for one token id,
#: and from one address.  Past either, a check is refused at once: wrong
#: secrets for a known id cannot queue scrypt work in front of other users.
CHECKS_PER_TOKEN_ID = 4
CHECKS_PER_ADDRESS = 8


class UsersFileError(Exception):
    """The users file is unreadable or malformed, or a change was refused."""


class TooManyChecks(Exception):
    """Too many token checks are pending for this token id or address: refused unchecked."""


@dataclass(frozen=True)
class UserEntry:
    name: str
    token_id: str
    hashed: str
    #: Bytes; None: the service's default.  NO_QUOTA: unlimited.
    quota: int | None = None
    #: Files; None: the service's default.  NO_QUOTA: unlimited.
    quota_files: int | None = None
    #: Largest upload in bytes; None: the service's ``--max-size``.
    max_size: int | None = None
    #: Only ``list`` and ``get`` (the others are ``forbidden``).
    read_only: bool = False
    #: Unix time at which the token stops working; None: never.
    expires: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires


NO_QUOTA = -1

#: The header line of a version 2 file (version 1 has none).
HEADER = "# wsfiles users v2"
FORMAT_VERSION = 2
_HEADER = re.compile(r"#\s*wsfiles\s+users\s+v(\S*)\s*")


def file_version(text: str, path: str = "users file") -> int:
    """1 for a file without a header, 2 for ``# wsfiles users v2``; others are refused."""
    first = text.split("\n", 1)[0].strip()
    match = _HEADER.fullmatch(first)
    if match is None:
        return 1
    version = match.group(1)
    if version not in ("1", "2"):
        raise UsersFileError(
            f"{path}:1: users file format v{version} is not supported (this wsfiles reads"
            " v1 and v2): use the wsfiles version that wrote it"
        )
    return int(version)


def _parse_count(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"expected a whole number, not {text!r}")
    return int(text)


def _or_none(parse: Callable[[str], int]) -> Callable[[str], int]:
    def parsed(text: str) -> int:
        return NO_QUOTA if text.lower() == "none" else parse(text)

    return parsed


def _parse_flag(text: str) -> bool:
    if text.lower() not in ("yes", "no"):
        raise ValueError(f"expected yes or no, not {text!r}")
    return text.lower() == "yes"


def parse_expiry(text: str) -> float:
    """An ISO 8601 date (that day, 00:00 UTC) or date-time (UTC unless it has an offset)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a date: use an ISO 8601 date (2027-01-31) or UTC date-time"
            " (2027-01-31T18:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def format_expiry(when: float) -> str:
    """How an expiry is written: a UTC date-time to the second, ``Z`` at the end."""
    return datetime.fromtimestamp(int(when), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_size(size: int) -> str:
    """A byte count in the largest unit that divides it (``10G``, ``1536K``, ``700``)."""
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if size and size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


#: The optional KEY=VALUE settings of a line, in the order they are written,
#: and how each value is read.
SETTINGS: dict[str, Callable[[str], Any]] = {
    "quota": _or_none(parse_size),
    "quota_files": _or_none(_parse_count),
    "max_size": parse_size,
    "read_only": _parse_flag,
    "expires": parse_expiry,
}


def _parse_settings(fields: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for field in fields:
        key, _, value = field.partition("=")
        parse = SETTINGS.get(key)
        if parse is None or not value:
            known = ", ".join(f"{k}=" for k in SETTINGS)
            raise ValueError(f"expected one of {known} not {field!r}")
        if key in settings:
            raise ValueError(f"{key}= given twice")
        settings[key] = parse(value)
    return settings


def _hash_secret(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32
    )


def _verify(secret: str, hashed: str) -> bool:
    try:
        scheme, n, r, p, salt_hex, hash_hex = hashed.split("$")
        if scheme != "scrypt":
            return False
        expected = bytes.fromhex(hash_hex)
        actual = _hash_secret(secret, bytes.fromhex(salt_hex), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(expected, actual)


def parse_users(text: str, path: str = "users file") -> dict[str, UserEntry]:
    """Parse a users file (v1 or v2) into entries keyed by token id."""
    file_version(text, path)
    entries: dict[str, UserEntry] = {}
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 3 or not is_valid_client_name(fields[0]):
            raise UsersFileError(f"{path}:{number}: expected 'NAME TOKEN_ID HASH [KEY=VALUE ...]'")
        try:
            settings = _parse_settings(fields[3:])
        except ValueError as e:
            raise UsersFileError(f"{path}:{number}: {e}") from None
        entry = UserEntry(fields[0], fields[1], fields[2], **settings)
        if entry.name in names or entry.token_id in entries:
            raise UsersFileError(f"{path}:{number}: duplicate user {entry.name!r}")
        names.add(entry.name)
        entries[entry.token_id] = entry
    return entries


def read_users_file(path: str) -> dict[str, UserEntry]:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_users(f.read(), path)
    except OSError as e:
        raise UsersFileError(f"cannot read users file {path}: {e.strerror}") from e
    except UnicodeDecodeError:
        raise UsersFileError(f"cannot read users file {path}: not UTF-8 text") from None


def check_client_name(name: str) -> None:
    if not is_valid_client_name(name):
        raise UsersFileError(
            f"{name!r} is not a valid client name: use 1-64 of A-Z a-z 0-9 _ . -,"
            " not starting with a dot"
        )


def new_credential() -> tuple[str, str, str]:
    """A fresh token id, secret and the scrypt hash of the secret (salted)."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_hex(16)
    salt = secrets.token_bytes(16)
    digest = _hash_secret(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    hashed = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"
    return token_id, secret, hashed


# -- changing the file while servers read it ------------------------------------

#: Written under the header of a file a command upgrades or creates.
FORMAT_HELP = (
    "# NAME TOKEN_ID HASH [quota=SIZE|none] [quota_files=N|none] [max_size=SIZE]"
    " [read_only=yes] [expires=YYYY-MM-DDTHH:MM:SSZ]; see docs/configuration.md"
)
#: How long a command waits for another one's lock on the file (seconds;
#: ``$WSFILES_USERS_LOCK_WAIT`` changes it).
LOCK_WAIT = 10.0


class UsersText:
    """A users file as lines, for a command that changes some of them.

    Comments, blank lines and the other users' lines are kept as they are;
    a changed user's line is written anew, its settings in a fixed order.
    """

    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.entries = parse_users(text, path)  # refuses a bad file before any change
        self.version = file_version(text, path)
        self.lines = text.splitlines()

    def _index(self, name: str) -> int:
        for index, line in enumerate(self.lines):
            fields = line.split()
            if fields and not fields[0].startswith("#") and fields[0] == name:
                return index
        raise UsersFileError(f"no user {name!r} in {self.path}")

    def fields(self, name: str) -> tuple[str, str, dict[str, str]]:
        """``name``'s token id, hash and settings as written; UsersFileError if unknown."""
        fields = self.lines[self._index(name)].split()
        settings = dict(field.partition("=")[::2] for field in fields[3:])
        return fields[1], fields[2], settings

    def has(self, name: str) -> bool:
        return any(entry.name == name for entry in self.entries.values())

    def put(self, name: str, token_id: str, hashed: str, settings: dict[str, str]) -> None:
        """Write ``name``'s line (replacing it, or added at the end)."""
        ordered = [f"{key}={settings[key]}" for key in SETTINGS if key in settings]
        line = " ".join([name, token_id, hashed, *ordered])
        parse_users(line, self.path)  # every value checked as the server will read it
        try:
            self.lines[self._index(name)] = line
        except UsersFileError:
            self.lines.append(line)

    def remove(self, name: str) -> None:
        del self.lines[self._index(name)]

    def render(self) -> str:
        """The new text: a version 1 file gets the version 2 header."""
        lines = self.lines
        if self.version == 1:
            lines = [HEADER, FORMAT_HELP, *lines]
        return "\n".join(lines) + "\n"


def _open_locked(path: str, create: bool) -> int:
    """An fd of the file at ``path`` under an exclusive lock, once it is still the one there.

    Commands replace the file (rename), so the lock must be on the file that
    is there now: one that was replaced while we waited is let go and the
    new one locked instead.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    wait = LOCK_WAIT
    with contextlib.suppress(ValueError):
        wait = float(os.environ.get("WSFILES_USERS_LOCK_WAIT", LOCK_WAIT))
    deadline = time.monotonic() + wait
    while True:  # bounded by LOCK_WAIT
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            raise UsersFileError(f"no users file {path} ('wsfiles user add' creates one)") from None
        except OSError as e:
            raise UsersFileError(f"cannot write users file {path}: {e.strerror}") from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise UsersFileError(
                            f"users file {path} stays locked by another 'wsfiles user'"
                            f" command (waited {wait:g} s)"
                        ) from None
                    time.sleep(0.02)
            held = os.fstat(fd)
            try:
                there = os.stat(path)
            except FileNotFoundError:
                there = None
            if there is not None and (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # replaced meanwhile: lock the new one
        if time.monotonic() > deadline:
            raise UsersFileError(f"users file {path} keeps being replaced; try again")


def _replace_file(path: str, text: str, old: os.stat_result) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``.

    A server reading the file sees the old version or the new, never half
    of one.  The mode (0600 for a new file) and, when allowed, the owner are
    kept, so a server running as another user can still read it.
    """
    folder = os.path.dirname(path) or "."
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise UsersFileError(f"cannot write users file {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
            with contextlib.suppress(PermissionError):
                os.fchown(f.fileno(), old.st_uid, old.st_gid)
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise UsersFileError(f"cannot write users file {path}: {e.strerror}") from None
    with contextlib.suppress(OSError):  # the rename itself, on disk
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def editing(path: str, *, create: bool = False) -> Iterator[UsersText]:
    """Change the users file: locked against other commands, replaced atomically.

    The body changes the ``UsersText`` it is given; on a clean exit the file
    is rewritten (temp file, fsync, rename) while still locked, so two
    commands at once cannot lose each other's change.  ``create``: a missing
    file is created (mode 0600).  Running servers see the new file within a
    second (they stat it).
    """
    path = os.path.realpath(path)  # a symlink (config management) stays a symlink
    existed = os.path.exists(path)
    fd = _open_locked(path, create)
    try:
        held = os.fstat(fd)
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsersFileError(f"cannot read users file {path}: not UTF-8 text") from None
        document = UsersText(text, path)
        try:
            yield document
        except BaseException:
            if not existed and not raw:  # made just now, for nothing
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        _replace_file(path, document.render(), held)
    finally:
        os.close(fd)  # (the lock goes with it)


def add_user(path: str, name: str, settings: dict[str, str] | None = None) -> str:
    """Add ``name`` with a fresh random token; return the token.

    Creates the file with mode 0600 if it does not exist.
    """
    check_client_name(name)
    token_id, secret, hashed = new_credential()
    with editing(path, create=True) as users:
        if users.has(name):
            raise UsersFileError(f"user {name!r} already exists in {users.path}")
        users.put(name, token_id, hashed, settings or {})
    return f"{token_id}.{secret}"


def rotate_user(path: str, name: str) -> str:
    """Give ``name`` a fresh token, keeping its settings; return the token."""
    token_id, secret, hashed = new_credential()
    with editing(path) as users:
        _, _, settings = users.fields(name)
        users.put(name, token_id, hashed, settings)
    return f"{token_id}.{secret}"


class VerifiedTokens:
    """A bounded memory of tokens that passed the scrypt check.

    A client that reconnects with the same token skips scrypt (tens of
    milliseconds of CPU each time).  Nothing secret is kept: the key is an
    HMAC-SHA256 of the whole presented token under a random key made per
    process, and the value is the users-file line it matched (token id and
    hash), so a hit still has to match the line in force.  Only tokens that
    verified are remembered; a wrong token is checked with scrypt every time.
    """

    def __init__(self, size: int = VERIFIED_CACHE_SIZE) -> None:
        self.size = size
        self._key = secrets.token_bytes(32)
        self._good: OrderedDict[bytes, tuple[str, str]] = OrderedDict()

    def digest(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def matches(self, digest: bytes, entry: UserEntry) -> bool:
        """Whether ``digest`` was verified against exactly ``entry``'s hash."""
        line = self._good.get(digest)
        if line is None or line != (entry.token_id, entry.hashed):
            return False
        self._good.move_to_end(digest)
        return True

    def remember(self, digest: bytes, entry: UserEntry) -> None:
        if self.size <= 0:
            return
        self._good[digest] = (entry.token_id, entry.hashed)
        self._good.move_to_end(digest)
        while len(self._good) > self.size:
            self._good.popitem(last=False)

    def clear(self) -> None:
        self._good.clear()

    def __len__(self) -> int:
        return len(self._good)


def _always() -> bool:
    return True


def _release(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class UserDirectory:
    """Authenticates tokens against a users file.

    The file is re-read when it changes (its inode, times or size), so
    ``wsfiles user`` commands take effect without a restart.  A file that
    becomes unreadable or malformed keeps the last good version in force.
    Tokens that verified are remembered (``VerifiedTokens``) until the file
    changes; checks of one token already running are shared, not repeated.
    A user whose ``expires`` has passed is refused as if removed; the moment
    it passes counts as a change of the file (``reload``).
    """

    def __init__(
        self,
        path: str,
        cache_size: int = VERIFIED_CACHE_SIZE,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        #: Wall-clock time: expiries are dates.
        self._now = now
        self._entries = read_users_file(path)
        self._by_name = {entry.name: entry for entry in self._entries.values()}
        self._next_expiry = self._first_expiry_after(now())
        self._stamp = self._file_stamp()
        self._verified = VerifiedTokens(cache_size)
        #: Bumped whenever the users in force change: a check that began
        #: under an older version is answered but not remembered.
        self._generation = 0
        #: Checks in progress: each asker's Deferred and whether it still waits.
        self._checking: dict[bytes, list[tuple[Deferred, Callable[[], bool]]]] = {}
        self._scrypt_slots = DeferredSemaphore(SCRYPT_AT_ONCE)
        self._pending_by_id: Counter[str] = Counter()
        self._pending_by_address: Counter[str] = Counter()
        #: Checks refused because too many were pending (for tests and metrics).
        self.checks_refused = 0
        #: scrypt checks run, and skipped because every asker had gone (for
        #: tests and benchmarks).
        self.scrypt_checks = 0
        self.scrypt_skipped = 0

    def _file_stamp(self) -> tuple[int, ...] | None:
        # The inode too: a command renames a new file over the old one, and two
        # versions of the same size can share a coarse timestamp.
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def _first_expiry_after(self, now: float) -> float | None:
        ahead = [e.expires for e in self._entries.values() if e.expires and e.expires > now]
        return min(ahead, default=None)

    def _refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp or stamp is None:
            return
        try:
            self._entries = read_users_file(self.path)
        except UsersFileError as e:
            _log.error("keeping the previous users: {error}", error=str(e))
        self._by_name = {entry.name: entry for entry in self._entries.values()}
        self._next_expiry = self._first_expiry_after(self._now())
        self._stamp = stamp
        self._verified.clear()
        self._generation += 1

    def _expire(self) -> None:
        """An expiry that passed changes the users in force, as an edit would."""
        if self._next_expiry is None:
            return
        now = self._now()
        if now >= self._next_expiry:
            self._next_expiry = self._first_expiry_after(now)
            self._generation += 1

    @property
    def generation(self) -> int:
        """Bumped whenever the users in force change."""
        return self._generation

    def reload(self) -> int:
        """Re-read the file if it changed (a stat); return the generation in force.

        The generation also moves when a user's expiry passes, so a caller
        checking once a second notices an expiry within a second.
        """
        self._refresh()
        self._expire()
        return self._generation

    def credential_of(self, name: str) -> tuple[str, str] | None:
        """The token id and hash ``name`` signs in with now; None once removed or expired.

        A connection remembers the credential it was admitted with: when this
        no longer matches (the user was removed, its token rotated or
        expired), it ends.  Other settings may change without ending it.
        """
        entry = self._by_name.get(name)
        if entry is None or entry.expired(self._now()):
            return None
        return (entry.token_id, entry.hashed)

    def token_id_of(self, name: str) -> str | None:
        """The id of the token ``name`` signs in with now, re-reading the file
        if it changed; None once removed or expired.  What a share link or a
        download ticket records of its owner: another token, another owner."""
        self._refresh()
        credential = self.credential_of(name)
        return credential[0] if credential is not None else None

    def _entry_named(self, name: str) -> UserEntry | None:
        self._refresh()
        return self._by_name.get(name)

    def permissions_of(self, name: str) -> UserEntry | None:
        """``name``'s line as in force now (a stat first): ``read_only``,
        ``max_size``; None once removed or expired (its channels are closing)."""
        entry = self._entry_named(name)
        if entry is None or entry.expired(self._now()):
            return None
        return entry

    def quota_of(self, name: str) -> int | None:
        """This client's own quota in bytes; None when the default applies.

        (The ledger maps NO_QUOTA to "unlimited".)
        """
        entry = self._entry_named(name)
        return entry.quota if entry is not None else None

    def quota_files_of(self, name: str) -> int | None:
        """This client's own cap on files; None when the default applies."""
        entry = self._entry_named(name)
        return entry.quota_files if entry is not None else None

    def authenticate(
        self, token: str, wanted: Callable[[], bool] | None = None, address: str | None = None
    ) -> Deferred:
        """Fire with the client name for ``token``, or None; fail with TooManyChecks.

        The hash runs in a thread: scrypt takes tens of milliseconds.  A
        token verified before (against the same users-file line) is answered
        from memory; concurrent checks of the same token share one scrypt.
        ``wanted`` says whether the answer is still awaited (the handshake's
        connection is still there): a check whose every asker has gone by the
        time its turn comes is skipped and answers None, so a burst of
        abandoned handshakes does not keep the CPU busy hashing for nobody.
        A new check beyond CHECKS_PER_TOKEN_ID pending for the token's id, or
        CHECKS_PER_ADDRESS pending from ``address``, fails at once.
        """
        self._refresh()
        token_id, dot, secret = token.partition(".")
        entry = self._entries.get(token_id) if dot else None
        if entry is None or entry.expired(self._now()):
            return succeed(None)  # (no scrypt for an expired token either)
        digest = self._verified.digest(token)
        if self._verified.matches(digest, entry):
            return succeed(entry.name)
        waiter: Deferred = Deferred()
        asker = (waiter, wanted or _always)
        waiting = self._checking.get(digest)
        if waiting is not None:
            waiting.append(asker)
            return waiter
        by_address = self._pending_by_address
        if self._pending_by_id[token_id] >= CHECKS_PER_TOKEN_ID or (
            address is not None and by_address[address] >= CHECKS_PER_ADDRESS
        ):
            self.checks_refused += 1
            return fail(TooManyChecks("too many sign-in attempts at once: retry in a moment"))
        self._checking[digest] = waiting = [asker]
        self._pending_by_id[token_id] += 1
        if address is not None:
            by_address[address] += 1
        generation = self._generation

        def checked(ok: object) -> None:
            del self._checking[digest]
            _release(self._pending_by_id, token_id)
            if address is not None:
                _release(by_address, address)
            # The users file may have changed meanwhile: the line must still be in force.
            current = self._entries.get(entry.token_id)
            good = (
                ok is True
                and current is not None
                and current.hashed == entry.hashed
                and not current.expired(self._now())
            )
            name = current.name if good and current is not None else None
            if good and generation == self._generation:
                self._verified.remember(digest, entry)
            for each, _ in waiting:
                each.callback(name)

        def failed(failure: Failure) -> bool:
            _log.failure("could not check a token", failure)
            return False

        def check() -> Deferred:
            if not any(still_wanted() for _, still_wanted in waiting):
                self.scrypt_skipped += 1
                return succeed(None)  # not True: nothing is remembered
            self.scrypt_checks += 1
            return threads.deferToThread(_verify, secret, entry.hashed)

        d = self._scrypt_slots.run(check)
        d.addErrback(failed)
        d.addCallback(checked)
        return waiter
