"""Tickets and pairs: which file channel belongs to which command channel.

Like FTP's data connection, a file channel is set up by the server for a
command channel that needs one.  The command side asks for a ticket, sends
its URL to the client, and the file channel presents it when it connects.
A ticket is random (128 bits), single-use, bound to one command session, and
expires after ``channel_timeout`` seconds.
"""

from __future__ import annotations

import secrets
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class TicketHolder(Protocol):
    """What the registry needs from a command session."""

    def ticket_expired(self, ticket: str) -> None: ...


class PairingRegistry:
    """The factory-side record of pending tickets and attached pairs."""

    def __init__(
        self, clock: IReactorTime, channel_timeout: float, instance_id: str | None = None
    ) -> None:
        self._clock = clock
        self.channel_timeout = channel_timeout
        #: Behind a load balancer, tickets start with ``ID.`` so the balancer
        #: can route a file channel to the instance that issued its ticket.
        self._prefix = f"{instance_id}." if instance_id else ""
        self._tickets: dict[str, tuple[TicketHolder, IDelayedCall]] = {}
        self._pairs: dict[TicketHolder, object] = {}

    def issue(self, holder: TicketHolder) -> str:
        """Create a ticket for ``holder``; it expires unless redeemed in time."""
        ticket = self._prefix + secrets.token_urlsafe(16)
        call = self._clock.callLater(self.channel_timeout, self._expire, ticket)
        self._tickets[ticket] = (holder, call)
        return ticket

    def _expire(self, ticket: str) -> None:
        holder, _ = self._tickets.pop(ticket)
        holder.ticket_expired(ticket)

    def redeem(self, ticket: str) -> TicketHolder | None:
        """Use up ``ticket``; return its holder, or None if it is not valid."""
        found = self._tickets.pop(ticket, None)
        if found is None:
            return None
        holder, call = found
        call.cancel()
        return holder

    def revoke(self, holder: TicketHolder) -> None:
        """Forget every ticket and pair of ``holder`` (its command channel closed)."""
        for ticket, (owner, call) in list(self._tickets.items()):
            if owner is holder:
                del self._tickets[ticket]
                call.cancel()
        self._pairs.pop(holder, None)

    def pair(self, holder: TicketHolder, file_channel: object) -> None:
        self._pairs[holder] = file_channel

    def unpair(self, holder: TicketHolder, file_channel: object) -> None:
        if self._pairs.get(holder) is file_channel:
            del self._pairs[holder]

    def file_channel_of(self, holder: TicketHolder) -> object | None:
        return self._pairs.get(holder)

    @property
    def pending_tickets(self) -> int:
        return len(self._tickets)

    @property
    def pair_count(self) -> int:
        return len(self._pairs)
