"""The aggregation server: sends the global state, checks and averages updates, gathers metrics.

It holds no model, only the global state as numpy arrays, and sees clients only through
decoded messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..model.adapters import AdapterState, AdapterStateError, check_state_matches
from .client import SERVER_ID
from .messages import Message, MessageError, decode, encode, expect


def weighted_average(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> AdapterState:
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    return {
        key: (sum(np.float64(w) * state[key].astype(np.float64) for state, w in zip(states, weights)) / total)
        .astype(np.float32)
        for key in states[0]
    }


class FederationServer:
    def __init__(self, initial_state: AdapterState, *, aggregation: str, aggregate: bool) -> None:
        """``aggregate=False`` is local-only training: nothing is sent in or out but control messages."""
        self.global_state = {k: np.array(v, dtype=np.float32) for k, v in initial_state.items()}
        self.aggregation = aggregation
        self.aggregate = aggregate

    def train_messages(self, round_index: int, participants: Sequence[str]) -> list[tuple[str, bytes]]:
        tensors = self.global_state if self.aggregate else {}
        meta = {"send_update": self.aggregate}
        return [(c, encode(Message("train", round_index, SERVER_ID, c, tensors, meta))) for c in participants]

    def evaluation_messages(self, round_index: int, clients: Sequence[str]) -> list[tuple[str, bytes]]:
        tensors = self.global_state if self.aggregate else {}
        return [(c, encode(Message("evaluate", round_index, SERVER_ID, c, tensors))) for c in clients]

    def receive_updates(self, round_index: int, participants: Sequence[str], messages: Sequence[bytes]) -> dict:
        """Check every update of the round, then (only if all are valid) replace the global state."""
        updates = self._collect("update", round_index, participants, messages)
        counts = {}
        for sender, message in updates.items():
            count = message.meta.get("num_examples")
            if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
                raise MessageError(f"update from {sender!r}: num_examples must be a positive integer")
            counts[sender] = count
            if self.aggregate:
                try:
                    check_state_matches(message.tensors, self.global_state, what=f"update from {sender!r}")
                except AdapterStateError as error:
                    raise MessageError(str(error)) from None
        if self.aggregate:
            senders = list(updates)
            weights = [counts[s] if self.aggregation == "examples" else 1.0 for s in senders]
            self.global_state = weighted_average([updates[s].tensors for s in senders], weights)
        return {s: {k: v for k, v in m.meta.items() if k != "num_examples"} for s, m in updates.items()}

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
