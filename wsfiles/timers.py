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


class RateDeadline:
    """A transfer's deadline: at least ``min_bytes`` must move in every ``seconds``.

    A plain stall timeout (any byte postpones it) let an upload trickle one
    byte every two seconds for ever while holding its quota reservation.
    Here only progress of ``min_bytes`` since the last postponement counts.
    """

    __slots__ = ("_deadline", "_mark", "min_bytes")

    def __init__(
        self, clock: IReactorTime, seconds: float, min_bytes: int, on_expiry: Callable[[], None]
    ) -> None:
        self._deadline = Deadline(clock, seconds, on_expiry)
        self.min_bytes = max(1, min_bytes)
        self._mark = 0

    @property
    def seconds(self) -> float:
        return self._deadline.seconds

    def start(self) -> None:
        """A transfer begins: ``seconds`` from now to move ``min_bytes``."""
        self._mark = 0
        self._deadline.reset()

    def progress(self, moved: int) -> None:
        """``moved`` bytes in all since ``start``."""
        if moved - self._mark >= self.min_bytes:
            self._mark = moved
            self._deadline.reset()

    def cancel(self) -> None:
        self._deadline.cancel()
