"""A restartable deadline on an injectable clock (tests use task.Clock)."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """Calls ``on_expiry`` unless ``reset`` or ``cancel`` comes first."""

    __slots__ = ("_call", "_clock", "_on_expiry", "seconds")  # one or two per connection

    def __init__(self, clock: IReactorTime, seconds: float, on_expiry: Callable[[], None]) -> None:
        self._clock = clock
        self.seconds = seconds
        self._on_expiry = on_expiry
        self._call: IDelayedCall | None = None

    @property
    def armed(self) -> bool:
        return self._call is not None

    def reset(self) -> None:
        """(Re)start the countdown from now."""
        if self._call is not None and self._call.active():
            self._call.reset(self.seconds)
        else:
            self._call = self._clock.callLater(self.seconds, self._expire)

    def cancel(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _expire(self) -> None:
        self._call = None
        self._on_expiry()
