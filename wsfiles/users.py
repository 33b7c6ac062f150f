"""The users file: client names and hashes of their tokens.

One line per client::

    NAME TOKEN_ID scrypt$N$r$p$SALT_HEX$HASH_HEX [KEY=VALUE ...]

Optional settings override the service's options for that client:
``quota=SIZE`` (``10G``, powers of 1024) overrides ``--quota`` and
``quota_files=N`` overrides ``--quota-files``; ``none`` lifts either.
A token is ``TOKEN_ID.SECRET`` (both hex).  The id finds the line without
trying every hash; only the scrypt hash of the secret is stored, with a salt
of its own.  Lines starting with ``#`` and blank lines are ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

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


NO_QUOTA = -1


def _parse_count(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"expected a whole number, not {text!r}")
    return int(text)


#: The optional KEY=VALUE settings of a line, and how each value is read.
_SETTINGS: dict[str, Callable[[str], int]] = {"quota": parse_size, "quota_files": _parse_count}


def _parse_settings(fields: list[str]) -> dict[str, int]:
    settings: dict[str, int] = {}
    for field in fields:
        key, _, value = field.partition("=")
        parse = _SETTINGS.get(key)
        if parse is None or not value:
            known = ", ".join(f"{k}=" for k in _SETTINGS)
            raise ValueError(f"expected one of {known} not {field!r}")
        if key in settings:
            raise ValueError(f"{key}= given twice")
        settings[key] = NO_QUOTA if value.lower() == "none" else parse(value)
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
    """Parse a users file into entries keyed by token id."""
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


def add_user(path: str, name: str) -> str:
    """Add ``name`` with a fresh random token; return the token.

    Creates the file with mode 0600 if it does not exist.
    """
    if not is_valid_client_name(name):
        raise UsersFileError(
            f"{name!r} is not a valid client name: use 1-64 of A-Z a-z 0-9 _ . -,"
            " not starting with a dot"
        )
    existing = read_users_file(path) if os.path.exists(path) else {}
    if any(entry.name == name for entry in existing.values()):
        raise UsersFileError(f"user {name!r} already exists in {path}")
    token_id = secrets.token_hex(8)
    secret = secrets.token_hex(16)
    salt = secrets.token_bytes(16)
    digest = _hash_secret(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    hashed = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"
    line = f"{name} {token_id} {hashed}\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end and os.pread(fd, 1, end - 1) != b"\n":
            line = "\n" + line  # a hand-edited file may lack its last newline
        f.write(line.encode())
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

    The file is re-read when its modification time changes, so
    ``wsfiles user add`` takes effect without a restart.  A file that
    becomes unreadable or malformed keeps the last good version in force.
    Tokens that verified are remembered (``VerifiedTokens``) until the file
    changes; checks of one token already running are shared, not repeated.
    """

    def __init__(self, path: str, cache_size: int = VERIFIED_CACHE_SIZE) -> None:
        self.path = path
        self._entries = read_users_file(path)
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

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp or stamp is None:
            return
        try:
            self._entries = read_users_file(self.path)
        except UsersFileError as e:
            _log.error("keeping the previous users: {error}", error=str(e))
        self._stamp = stamp
        self._verified.clear()
        self._generation += 1

    @property
    def generation(self) -> int:
        """Bumped whenever the users in force change."""
        return self._generation

    def reload(self) -> int:
        """Re-read the file if it changed (a stat); return the generation in force."""
        self._refresh()
        return self._generation

    def credential_of(self, name: str) -> tuple[str, str] | None:
        """The token id and hash ``name`` signs in with now; None once removed.

        A connection remembers the credential it was admitted with: when this
        no longer matches (the user was removed or its token rotated), it ends.
        """
        for entry in self._entries.values():
            if entry.name == name:
                return (entry.token_id, entry.hashed)
        return None

    def _entry_named(self, name: str) -> UserEntry | None:
        self._refresh()
        for entry in self._entries.values():
            if entry.name == name:
                return entry
        return None

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
        if entry is None:
            return succeed(None)
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
            good = ok is True and current is not None and current.hashed == entry.hashed
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
