"""Other servers the tests (and bench/cluster.py) start on loopback."""

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 right now (a server binds it a moment later:
    another process could take it in between, an accepted race in tests)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
