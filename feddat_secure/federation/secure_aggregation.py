"""The chosen secure-aggregation protocol's parties, run in-process for each round.

The server's side of the runner gets only what the protocol lets it learn: protocol messages
and, at the end of a round, Σ w_i·u_i over the counted sites. Every protocol message is counted
and recorded in both parties' audit logs before the recipient acts on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from protocols import ConfigurationError, Identity, ProtocolError, Roster, RoundAborted, make_protocol
from protocols.base import AggregateResult, ClientSession
from protocols.identity import KEYHOLDER_ID, SERVER_ID
from protocols.simulation import drive_round, setup_keyholder

from ..config import ConfigError, SecureAggregationConfig
from .audit_trail import AuditTrail

SETUP_ROUND = 0  # the key holder's one-off setup is logged as part of the first round

LABELS = {
    "plain": "plain (INSECURE reference: the server sees every site's update)",
    "masked": "masked (SecAgg+: the server sees only the sum)",
    "he": "he (CKKS: the server adds ciphertexts; a separate key holder decrypts only the sum)",
}


@dataclass(frozen=True)
class RoundOutcome:
    """A finished aggregation: the result, or why the round was aborted (then nothing is applied)."""

    result: AggregateResult | None
    aborted: str | None = None
    rejections: tuple[str, ...] = ()


def protocol_options(config: SecureAggregationConfig, *, seed: int, max_weight: int, noise_bound: int = 0) -> dict:
    if config.protocol == "masked":
        m = config.masked
        return dict(clip_range=m.clip_range, quantization_bits=m.quantization_bits, modulus_bits=m.modulus_bits,
                    neighbours=m.neighbours, threshold=m.threshold, graph=m.graph, max_weight=max_weight,
                    noise_bound=noise_bound, seed=seed)
    if config.protocol == "he":
        h = config.he
        return dict(poly_modulus_degree=h.poly_modulus_degree, coeff_mod_bit_sizes=list(h.coeff_mod_bit_sizes),
                    global_scale_bits=h.global_scale_bits, min_clients=h.min_clients, seed=seed)
    return dict(seed=seed)


class SecureAggregation:
    def __init__(self, config: SecureAggregationConfig, identities: Mapping[str, Identity], roster: Roster,
                 client_ids: Sequence[str], *, per_round: int, vector_length: int, seed: int, max_weight: int,
                 audit: AuditTrail, count_bytes: Callable[[str, bytes], None], noise_bound: int = 0) -> None:
        self.name = config.protocol
        try:
            self.protocol = make_protocol(config.protocol, **protocol_options(
                config, seed=seed, max_weight=max_weight, noise_bound=noise_bound))
            self.protocol.check(per_round, vector_length)
        except ConfigurationError as error:
            raise ConfigError(f"secure_aggregation ({config.protocol}): {error}") from None
        self.vector_length = vector_length
        self.audit = audit
        self.count_bytes = count_bytes
        self.server = self.protocol.server(identities[SERVER_ID], roster)
        self.clients = {cid: self.protocol.client(identities[cid], roster, SERVER_ID) for cid in client_ids}
        self.keyholder = (self.protocol.keyholder(identities[KEYHOLDER_ID], roster)
                          if self.protocol.needs_keyholder else None)
        self._round = SETUP_ROUND
        self._in_setup = False
        self._last: tuple[str, str, bytes] | None = None
        self._rejections: list[str] = []

    @property
    def min_participants(self) -> int:
        """Fewer sites than this in a round and the round is not aggregated: the protocol's own minimum,
        and at least 2 for a secure protocol (the sum over one site is that site's update)."""
        return self.protocol.min_clients if self.protocol.insecure else max(2, self.protocol.min_clients)

    @property
    def parties(self) -> tuple[str, ...]:
        """Who takes part besides the clients: the server, and the key holder where there is one."""
        return (SERVER_ID, KEYHOLDER_ID) if self.keyholder is not None else (SERVER_ID,)

    def setup(self) -> None:
        """Once per run: the key holder hands out its signed public context."""
        if self.keyholder is not None:
            self._round, self._in_setup = SETUP_ROUND, True
            try:
                setup_keyholder(self.keyholder, self.clients, deliver=self._deliver, on_rejection=self._rejected)
            finally:
                self._in_setup = False
            self._raise_if_rejected("key holder setup")

    def client_session(self, client_id: str) -> ClientSession:
        return self.clients[client_id]

    def aggregate(self, round_index: int, participants: Sequence[str]) -> RoundOutcome:
        """Run the protocol between the server and ``participants`` (who already hold their input)."""
        self._round, self._rejections = round_index, []
        try:
            result = drive_round(self.server, {cid: self.clients[cid] for cid in participants}, self.keyholder,
                                 round_index, self.vector_length, deliver=self._deliver, on_rejection=self._rejected)
        except RoundAborted as abort:
            return RoundOutcome(None, f"aborted at stage {abort.stage!r}: {abort.reason}", tuple(self._rejections))
        if result.vector.shape != (self.vector_length,) or not np.all(np.isfinite(result.vector)):
            raise ProtocolError(f"round {round_index}: the aggregate is not a finite vector of {self.vector_length}")
        return RoundOutcome(result, None, tuple(self._rejections))

    def _stage(self) -> str:
        return f"{self.name}:setup" if self._in_setup else f"{self.name}:{self.server.stage}"

    def _deliver(self, sender: str, recipient: str, data: bytes) -> None:
        self._last = (sender, recipient, data)
        self.count_bytes(recipient, data)
        self.audit.exchange(sender, recipient, data, round=self._round, stage=self._stage())

    def _rejected(self, sender: str | None, reason: str) -> None:
        """drive_round reports a rejection right after the delivery that caused it."""
        last_sender, recipient, data = self._last
        self._rejections.append(f"{recipient} rejected a message from {last_sender}: {reason}")
        self.audit.rejected(recipient, last_sender, data, reason, round=self._round, stage=self._stage())

    def _raise_if_rejected(self, what: str) -> None:
        if self._rejections:
            raise ProtocolError(f"{what} failed: {'; '.join(self._rejections)}")
