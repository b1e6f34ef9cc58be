"""How serialized messages move between parties.

The runner only ever hands bytes to a :class:`Transport`; the in-process one below is a
set of mailboxes. A deployment replaces it with a federated engine's channel, and secure
aggregation and audit logging attach to the same bytes.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Protocol


class Transport(Protocol):
    def send(self, recipient: str, data: bytes) -> None: ...

    def receive(self, party: str) -> list[bytes]:
        """Every message waiting for ``party``, oldest first."""
        ...


class InProcessTransport:
    """Mailboxes in memory, with byte counters per recipient for communication costs."""

    def __init__(self) -> None:
        self._mailboxes: dict[str, deque[bytes]] = defaultdict(deque)
        self.bytes_received: dict[str, int] = defaultdict(int)

    def send(self, recipient: str, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError("the transport carries serialized bytes only, never Python objects")
        self._mailboxes[recipient].append(data)
        self.bytes_received[recipient] += len(data)

    def account(self, recipient: str, data: bytes) -> None:
        """Count bytes another driver delivered (a protocol round run by ``protocols.drive_round``)."""
        self.bytes_received[recipient] += len(data)

    def receive(self, party: str) -> list[bytes]:
        box = self._mailboxes[party]
        messages = list(box)
        box.clear()
        return messages
