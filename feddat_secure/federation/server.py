"""The aggregation server: sends the global state, applies the aggregate of updates, gathers metrics.

It holds no model, only the global state as numpy arrays, and sees clients only through
decoded messages; of their updates it sees only what the secure-aggregation protocol
reveals, the weighted sum (``apply_aggregate``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..model.adapters import AdapterState
from .client import SERVER_ID
from .messages import Message, MessageError, decode, encode, expect
from .updates import StateLayout, apply_mean_update


class FederationServer:
    def __init__(self, initial_state: AdapterState, *, aggregate: bool) -> None:
        """``aggregate=False`` is local-only training: nothing is sent in or out but control messages."""
        self.global_state = {k: np.array(v, dtype=np.float32) for k, v in initial_state.items()}
        self.aggregate = aggregate

    def train_messages(self, round_index: int, participants: Sequence[str]) -> list[tuple[str, bytes]]:
        tensors = self.global_state if self.aggregate else {}
        meta = {"send_update": self.aggregate}
        return [(c, encode(Message("train", round_index, SERVER_ID, c, tensors, meta))) for c in participants]

    def evaluation_messages(self, round_index: int, clients: Sequence[str]) -> list[tuple[str, bytes]]:
        tensors = self.global_state if self.aggregate else {}
        return [(c, encode(Message("evaluate", round_index, SERVER_ID, c, tensors))) for c in clients]

    def receive_updates(self, round_index: int, participants: Sequence[str], messages: Sequence[bytes]) -> dict:
        """Each participant's report that it trained: example count and losses, never the update itself
        (updates reach the server only through the secure-aggregation protocol)."""
        updates = self._collect("update", round_index, participants, messages)
        for sender, message in updates.items():
            count = message.meta.get("num_examples")
            if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
                raise MessageError(f"update from {sender!r}: num_examples must be a positive integer")
            if message.tensors:
                raise MessageError(f"update from {sender!r} carries tensors; updates travel only through the "
                                   "secure-aggregation protocol")
        return {s: {k: v for k, v in m.meta.items() if k != "num_examples"} for s, m in updates.items()}

    def apply_aggregate(self, layout: StateLayout, summed: np.ndarray, total_weight: float) -> None:
        """global ← global + Σ w_i·u_i / Σ w_i: the FedAvg step, from the protocol's aggregate only."""
        self.global_state = apply_mean_update(layout, self.global_state, summed, total_weight)

    def receive_metrics(self, round_index: int, clients: Sequence[str], messages: Sequence[bytes]) -> dict:
        return {s: dict(m.meta) for s, m in self._collect("metrics", round_index, clients, messages).items()}

    def _collect(self, kind: str, round_index: int, expected: Sequence[str],
                 messages: Sequence[bytes]) -> dict[str, Message]:
        received: dict[str, Message] = {}
        for data in messages:
            message = decode(data)
            expect(message, kind=kind, round_index=round_index, recipient=SERVER_ID)
            if message.sender not in expected:
                raise MessageError(f"{kind!r} message from {message.sender!r}, who is not in this round")
            if message.sender in received:
                raise MessageError(f"duplicate {kind!r} message from {message.sender!r} in round {round_index}")
            received[message.sender] = message
        missing = sorted(set(expected) - set(received))
        if missing:
            raise MessageError(f"round {round_index}: no {kind!r} message from {', '.join(missing)}")
        return received
