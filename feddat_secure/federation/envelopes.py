"""The runner's own messages (open, train, evaluate, tree heads, close) as signed protocol envelopes.

They use the one wire format of ``protocols.wire``: every message is signed by its sender, carries
the run's session id, the roster digest, the round, the stage, sender and recipient, and every
receiver checks all of them. A ``train`` or ``evaluate`` request also carries the SHA-256 of the
global model it holds (:func:`model_digest`), which the site recomputes before using the model.

Requests (server → site or key holder) and their replies::

    open        fields {config_sha256, next_round, resume, clients}          → opened  fields {nonce}
    confirm     fields {nonce: the party's own, echoed}                   → confirmed
    train       fields {model_sha256, send_update, clip_norm, noise_shares[, zero_input]}, arrays {global state}
                                                                           → update  fields {num_examples, losses,
                                                                                             epsilon, refused, clipped}
    evaluate    fields {model_sha256}, arrays {global state}              → metrics fields {metrics}
    tree_head   fields {tree_head}                                        → tree_head fields {tree_head}
    close       fields {reason}                                           → closed  fields {tree_head}

Every receiver refuses a message larger than its stage can legitimately be (:func:`max_message_bytes`) before
anything of it is parsed beyond the header: a ``train`` or ``evaluate`` request carries the model, whose size
every party knows from the run plan; everything else is small.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from protocols import Identity, MessageRejected, Roster
from protocols.wire import Envelope, decode, encode

PROTOCOL = "feddat"
OPEN, OPENED = "open", "opened"
CONFIRM, CONFIRMED = "confirm", "confirmed"
TRAIN, UPDATE = "train", "update"
EVALUATE, METRICS = "evaluate", "metrics"
TREE_HEAD = "tree_head"
CLOSE, CLOSED = "close", "closed"
REPLY_TO = {OPEN: OPENED, CONFIRM: CONFIRMED, TRAIN: UPDATE, EVALUATE: METRICS, TREE_HEAD: TREE_HEAD, CLOSE: CLOSED}
MODEL_DTYPE = np.dtype("<f4")
# Everything but the model: header, fields (losses, metrics, tree heads, the roster's client list), signature.
SMALL_MESSAGE_BYTES = 1 << 20
MODEL_STAGES = (TRAIN, EVALUATE)


def max_message_bytes(stage: str, model_values: int) -> int:
    """The largest runner message of ``stage`` (issue 10, item 9: per-stage limits instead of the wire format's
    2 GiB): a request that carries a model of ``model_values`` float32 values may be that much larger than a
    small message, every other message is small."""
    return SMALL_MESSAGE_BYTES + (MODEL_DTYPE.itemsize * model_values if stage in MODEL_STAGES else 0)


class Opening:
    """A party's side of the session handshake. An ``open`` (signed by the server) is answered with a fresh
    random nonce for that session; the party acts on nothing of a session until the server's signed ``confirm``
    of that session echoes the nonce. So a recorded ``open`` of another run, replayed, binds nobody: its server
    never signs this nonce. Offers of several sessions may wait side by side (an injected ``open`` cannot
    displace the real one); the first confirmed session is the party's, and no other can replace it."""

    MAX_OFFERS = 8

    def __init__(self) -> None:
        self.offers: dict[str, tuple[str, Any]] = {}  # session → (nonce, what the party will do on confirmation)
        self.confirmed = False

    def offer(self, session: str, pending: Any = None) -> str:
        if self.confirmed:
            raise MessageRejected("a run session is already confirmed at this party")
        nonce = secrets.token_hex(16)
        self.offers.pop(session, None)
        self.offers[session] = (nonce, pending)
        while len(self.offers) > self.MAX_OFFERS:  # bounded: the oldest waiting offer goes
            self.offers.pop(next(iter(self.offers)))
        return nonce

    def confirm(self, envelope: Envelope) -> Any:
        """Check the server's ``confirm``; returns what was pending for its session."""
        offer = self.offers.get(envelope.session)
        if self.confirmed or offer is None or envelope.fields.get("nonce") != offer[0]:
            raise MessageRejected("the confirmation does not echo this party's nonce for the session (a replayed or "
                                  "stale open?)", envelope.sender)
        self.confirmed = True
        self.offers.clear()
        return offer[1]

    def require(self, what: str) -> None:
        if not self.confirmed:
            raise MessageRejected(f"no confirmed run session at this party: {what} refused")


def model_digest(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of a model state: every tensor's name, shape and little-endian float32 bytes, in
    sorted name order. Two states have the same digest exactly when they hold the same values."""
    digest = hashlib.sha256()
    for name in sorted(state):
        array = np.ascontiguousarray(state[name], dtype=MODEL_DTYPE)
        digest.update(f"{name}:{list(array.shape)};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def state_arrays(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A model state as the float32 arrays a message carries."""
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in state.items()}


def checked_model(envelope: Envelope) -> dict[str, np.ndarray]:
    """The model a ``train``/``evaluate`` request carries, after checking it against the digest the server
    signed with it; a mismatch (or a non-finite value) is refused before any of it is used."""
    claimed = envelope.fields.get("model_sha256")
    if not isinstance(claimed, str):
        raise MessageRejected(f"a {envelope.stage!r} request must carry the model's SHA-256", envelope.sender)
    state = {name: np.asarray(array, dtype=np.float32) for name, array in envelope.arrays.items()}
    for name, array in state.items():
        if not np.all(np.isfinite(array)):
            raise MessageRejected(f"model tensor {name!r} holds NaN or inf", envelope.sender)
    actual = model_digest(state)
    if actual != claimed:
        raise MessageRejected(f"the model does not match its signed digest: expected {claimed}, calculated "
                              f"{actual}", envelope.sender)
    return state


class Stamp:
    """Signs a party's runner messages under its run session and roster, and checks the ones it receives."""

    def __init__(self, identity: Identity, roster: Roster, *, model_values: int = 0) -> None:
        self.identity = identity
        self.roster = roster
        self.model_values = model_values  # the global model's length, for the size limit of requests carrying it
        self.session: str | None = None

    def envelope(self, stage: str, round_index: int, recipient: str, fields: Mapping[str, Any] | None = None,
                 arrays: Mapping[str, np.ndarray] | None = None, *, session: str | None = None) -> bytes:
        """Sign a message of this party's session (or of ``session``: the answer to an ``open``)."""
        session = session or self.session
        if session is None:
            raise RuntimeError("no session is open")
        return encode(Envelope(PROTOCOL, round_index, stage, self.identity.party_id, recipient, dict(fields or {}),
                               dict(arrays or {}), {}, session=session, roster=self.roster.digest),
                      self.identity)

    def request(self, data: bytes, header: Envelope, opening: Opening) -> Envelope:
        """A request of the server to this party: during the handshake (``open``/``confirm`` before a session
        is confirmed) of any session, otherwise of the confirmed one only; nothing but the handshake is taken
        before a session is confirmed."""
        handshake = header.stage in (OPEN, CONFIRM) and not opening.confirmed
        if not handshake and self.session is None:
            raise MessageRejected("no run session is open at this party yet", header.sender)
        envelope = self.open(data, session=None if handshake else self.session,
                             max_bytes=max_message_bytes(header.stage, self.model_values))
        if envelope.sender != self.roster.server_id:
            raise MessageRejected("only the server sends requests to this party", envelope.sender)
        if envelope.stage not in (OPEN, CONFIRM):
            opening.require(f"a {envelope.stage!r} request")
        return envelope

    def open(self, data: bytes, *, session: str | None, max_bytes: int = SMALL_MESSAGE_BYTES) -> Envelope:
        """Decode a runner message addressed to this party in ``session`` (None: accept any, for a first
        contact) and refuse one of another protocol; one longer than ``max_bytes`` (by default a small message's
        limit: a caller expecting a model passes :func:`max_message_bytes`) is refused before it is parsed."""
        envelope = decode(data, self.roster, session=session, max_bytes=max_bytes)
        if envelope.protocol != PROTOCOL:
            raise MessageRejected(f"expected a {PROTOCOL!r} message, got {envelope.protocol!r}", envelope.sender)
        if envelope.recipient != self.identity.party_id:
            raise MessageRejected(f"message addressed to {envelope.recipient!r}, not {self.identity.party_id!r}",
                                  envelope.sender)
        return envelope
