"""A Twisted FTP server on 127.0.0.1, the baseline for bench/throughput.py.

    python bench/_ftp_server.py ROOT USER PASSWORD

Serves folder ROOT (read-write) to USER/PASSWORD with Twisted's own
``twisted.protocols.ftp``, listens on a free port of 127.0.0.1, and prints
``ftp listening on 127.0.0.1:PORT`` once it is ready.  Passive data ports
are bound to 127.0.0.1 too (Twisted's default would be every interface).
Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, reactor
from twisted.protocols import ftp
from twisted.python import filepath
from zope.interface import implementer

LOOPBACK = "127.0.0.1"


class LoopbackFTP(ftp.FTP):
    """Twisted's FTP protocol, with passive data ports on the loopback only."""

    def getDTPPort(self, factory: Any, interface: str = "") -> Any:
        return super().getDTPPort(factory, interface=LOOPBACK)


@implementer(ICredentialsChecker)
class OneUser:
    """Accepts one user name and password.

    Twisted's FTP hands the checker ``str`` credentials, while
    ``InMemoryUsernamePasswordDatabaseDontUse`` stores ``bytes`` and so
    refuses everyone: hence this checker.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, user: str, password: str) -> None:
        self._user = user
        self._password = password

    def requestAvatarId(self, creds: Any) -> defer.Deferred:
        user = creds.username
        if isinstance(user, bytes):
            user = user.decode("utf-8", "replace")
        password = self._password
        if isinstance(creds.password, bytes):
            password = password.encode()
        if user == self._user and creds.checkPassword(password):
            return defer.succeed(user)
        return defer.fail(error.UnauthorizedLogin())


class FolderRealm(ftp.BaseFTPRealm):
    """Every authenticated user gets the same home folder."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self._home = filepath.FilePath(root)

    def getHomeDirectory(self, avatarId: Any) -> filepath.FilePath:
        return self._home


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    root, user, password = argv[1:]
    factory = ftp.FTPFactory(portal.Portal(FolderRealm(root), [OneUser(user, password)]))
    factory.protocol = LoopbackFTP
    factory.allowAnonymous = False
    port = reactor.listenTCP(0, factory, interface=LOOPBACK)  # type: ignore[attr-defined]
    print(f"ftp listening on {LOOPBACK}:{port.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
