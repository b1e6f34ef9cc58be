"""The party interface every protocol implements.

Parties are transport-agnostic state machines: they consume serialized messages and return the
messages to send (``Outgoing``). Who carries the bytes (the in-process driver in
``simulation.py``, or a real network) is not their concern, and neither is time: a stage closes
when the caller calls ``ServerSession.advance``.

Every party is bound to one session (the run's random id) and one roster: every message it signs
carries both, and it reads only messages that carry both (relayed and nested ones included), so
nothing crosses between runs, or between parties that enrolled their peers differently. Every party
exports its whole state as plain values (``state_dict()``) and is rebuilt from it (``state=``) at
any point, between two messages of a round too: a deployment may checkpoint a party after every
message, or handle each message in a fresh process. Building the registry of protocols by name is
``registry.py``'s job.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import ConfigurationError, MessageRejected, ProtocolError
from .identity import Identity, Roster
from .wire import (
    MAX_MESSAGE_BYTES,
    Envelope,
    check_session_id,
    decode,
    decode_checking_payload_later,
    decode_each,
    encode,
    encode_to_each,
)

STATE_FORMAT = "feddat-secure/protocol-state/1"


@dataclass(frozen=True)
class Outgoing:
    """A serialized message and the party id it is for."""

    recipient: str
    data: bytes


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """The round output: ``vector`` = Σ w_i·x_i over the ``counted`` clients, weights summing to ``total_weight``."""

    vector: np.ndarray
    counted: tuple[str, ...]
    total_weight: float


def options_record(options: Any) -> dict[str, Any]:
    """An options dataclass as plain values (tuples as lists): what a saved state records, so that a state is
    never restored under other options (a changed modulus would silently corrupt a restored round)."""
    return {item.name: _plain(getattr(options, item.name)) for item in dataclasses.fields(options)}


def _plain(value: Any) -> Any:
    return [_plain(item) for item in value] if isinstance(value, tuple | list) else value


class Party(ABC):
    """What every session shares: who it is, the session and roster it is bound to, how it signs and reads
    messages, and the frame of its exported state. Subclasses set ``protocol_name`` and write their own
    ``_export`` / ``_import``; a subclass constructor ends with ``self._load(state)``."""

    protocol_name: ClassVar[str]
    role: ClassVar[str]

    def __init__(self, identity: Identity, roster: Roster, session: str, options: Any) -> None:
        self.party_id = identity.party_id
        self.session = check_session_id(session)
        self.options = options
        self._identity, self._roster = identity, roster
        self._roster_digest = roster.digest

    def _envelope(self, round_id: int, stage: str, recipient: str, fields: Mapping[str, Any] | None = None,
                  arrays: Mapping[str, np.ndarray] | None = None, blobs: Mapping[str, bytes] | None = None) -> Envelope:
        """A message from this party, in this session, under this roster."""
        return Envelope(self.protocol_name, round_id, stage, self.party_id, recipient, fields or {}, arrays or {},
                        blobs or {}, self.session, self._roster_digest)

    def _sign(self, envelope: Envelope) -> bytes:
        return encode(envelope, self._identity)

    def _send(self, envelope: Envelope) -> Outgoing:
        return Outgoing(envelope.recipient, self._sign(envelope))

    def _send_to_each(self, envelope: Envelope, recipients: Sequence[str]) -> list[Outgoing]:
        """``[self._send(replace(envelope, recipient=r)) for r in recipients]``, the payload encoded once
        (``wire.encode_to_each``)."""
        return [Outgoing(recipient, data) for recipient, data in
                zip(recipients, encode_to_each(envelope, recipients, self._identity))]

    def _decode(self, data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
        """Verify a message (or a relayed or nested one) of this session under this roster; ``max_bytes`` is the
        largest message the current stage can legitimately carry (refused before anything is parsed)."""
        return decode(data, self._roster, session=self.session, max_bytes=max_bytes)

    def _decode_each(self, messages: Sequence[bytes], *, max_bytes: int = MAX_MESSAGE_BYTES
                     ) -> list[Envelope | MessageRejected]:
        """``_decode`` of every message, side by side on the worker threads; each item the envelope or the refusal
        (``wire.decode_each``)."""
        return decode_each(messages, self._roster, session=self.session, max_bytes=max_bytes)

    def _decode_checking_payload_later(self, data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES
                                       ) -> tuple[Envelope, Callable[[], None]]:
        """``_decode`` with the payload's check returned, not yet run (``wire.decode_checking_payload_later``)."""
        return decode_checking_payload_later(data, self._roster, session=self.session, max_bytes=max_bytes)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this party, as plain values: str, int, float, bool, None, lists, dicts with
        str keys and numpy arrays (short byte strings as hex, long ones as uint8 arrays). A snapshot: later
        messages do not change it.

        It holds the party's secrets of the current round (masking keys and seeds, Shamir shares, the key
        holder's CKKS secret key): store it like the identity key, where only this party can read it. Restore
        only the latest state: an older one forgets what the party has already answered, so a rolled-back masked
        client would answer a stage again (sign a second survivor set) and a rolled-back key holder decrypt twice.
        """
        return {"format": STATE_FORMAT, "protocol": self.protocol_name, "role": self.role, "party": self.party_id,
                "session": self.session, "roster": self._roster_digest, "options": options_record(self.options),
                "state": self._export()}

    def _load(self, state: Mapping[str, Any] | None) -> None:
        """Restore from ``state_dict()``'s output; refuses a state of another party, session, roster or options."""
        if state is None:
            return
        what = f"cannot restore the {self.protocol_name} {self.role} state of {self.party_id!r}"
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ConfigurationError(f"{what}: not a protocol state (format {STATE_FORMAT!r})")
        saved = (state.get("protocol"), state.get("role"))
        if saved != (self.protocol_name, self.role):
            raise ConfigurationError(f"{what}: it is the state of a {saved[0]} {saved[1]}")
        for key, mine, meaning in (("party", self.party_id, "party"), ("session", self.session, "session"),
                                   ("roster", self._roster_digest, "roster digest")):
            if state.get(key) != mine:
                raise ConfigurationError(f"{what}: it was saved with {meaning} {state.get(key)!r}, not {mine!r}")
        saved_options, current = state.get("options"), options_record(self.options)
        if saved_options != current:
            saved_options = saved_options if isinstance(saved_options, Mapping) else {}
            differ = sorted(set(current) ^ set(saved_options) | {name for name in current.keys() & saved_options.keys()
                                                                  if current[name] != saved_options[name]})
            raise ConfigurationError(f"{what}: it was saved under other protocol options ({', '.join(differ)} differ)")
        try:
            self._import(state["state"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, MessageRejected) as error:
            raise ConfigurationError(f"{what}: the state is malformed ({type(error).__name__}: {error})") from None

    @abstractmethod
    def _export(self) -> dict[str, Any]:
        """This party's own state (``state_dict`` adds who it belongs to)."""

    @abstractmethod
    def _import(self, state: Mapping[str, Any]) -> None:
        """Replace the fresh state with ``_export()``'s output."""


class ClientSession(Party):
    """One client's side of a protocol; lives across rounds."""

    role = "client"

    @abstractmethod
    def set_input(self, round_id: int, vector: np.ndarray, weight: float, *, round_context: str = "") -> int:
        """This round's input. Checked here (1-D, numeric, finite): a bad input raises ProtocolError on
        the client, before anything derived from it is masked, encrypted or sent.

        ``round_context`` (at most ``MAX_CONTEXT_CHARS`` printable ASCII characters; the federation passes the
        SHA-256 of the global model the site trained from) is what every honest client of the round must share:
        the protocol binds it into what the client signs, and a client refuses a round whose announced or
        co-signed context differs from its own, so a server cannot aggregate updates computed from different
        models. Returns how many entries of ``vector`` were clipped to the protocol's input range (0 where the
        protocol clips nothing), so that the caller can report it."""

    @abstractmethod
    def handle(self, data: bytes) -> list[Outgoing]:
        """Consume one message and return the answers. Bad, replayed or unexpected input raises
        MessageRejected and leaves the session as it was."""


class ServerSession(Party):
    """The server's side of a protocol; one per run, one round at a time."""

    role = "server"
    stages: tuple[str, ...]
    stage: str
    round_done: bool

    @abstractmethod
    def begin_round(self, round_id: int, clients: Sequence[str], vector_length: int, *,
                    round_context: str = "") -> list[Outgoing]:
        """Start a round with these clients (roster ids); returns the first stage's messages. ``round_context``:
        what the server announces as the round's shared context (``ClientSession.set_input``)."""

    @abstractmethod
    def receive(self, data: bytes) -> None:
        """One client message for the current stage. A bad one raises MessageRejected and changes
        nothing; its sender then counts as dropped for this stage."""

    def receive_each(self, messages: Iterable[bytes]) -> Iterator[MessageRejected | None]:
        """``receive`` of each of ``messages`` in order, lazily: the n-th item is None once the n-th message has been
        taken in, or the MessageRejected that ``receive`` would have raised for it. Any other error (RoundAborted)
        propagates at the message that raised it; the messages before it have been taken in, those after it not.
        Call nothing else on the session before the iterator is exhausted.

        For a transport that hands over a stage's replies together (Flower's grid, ``feddat_secure``'s links): a
        session may check the batch's signatures side by side on the worker threads before taking the messages in
        one by one (the masked server does, issue 16). Each outcome and the state after each message are exactly
        those of calling ``receive`` message by message."""
        for data in messages:
            try:
                self.receive(data)
            except MessageRejected as rejection:
                yield rejection
            else:
                yield None

    @abstractmethod
    def advance(self) -> list[Outgoing]:
        """Close the current stage (everyone live answered, or its deadline passed) and return the
        next stage's messages. Raises RoundAborted when the round can no longer succeed."""

    @abstractmethod
    def result(self) -> AggregateResult:
        """The aggregate, once ``round_done``."""


class KeyHolderSession(Party):
    """The party that holds a decryption key the server must not have (the HE protocol only)."""

    role = "keyholder"

    @abstractmethod
    def setup(self, recipients: Sequence[str]) -> list[Outgoing]:
        """Messages that give ``recipients`` what they need before any round (a signed public context)."""

    @abstractmethod
    def handle(self, data: bytes) -> list[Outgoing]:
        """Consume one message and return the answers (MessageRejected as for clients)."""


class Protocol(ABC):
    """A configured protocol: builds the parties of one session and knows its stage names and limits.

    ``options`` is the protocol's options dataclass (registered with it in ``registry.py``). Every party is
    bound to ``session`` (``wire.new_session_id()``, one per run) and is rebuilt from a saved
    ``state_dict()`` when ``state`` is given.
    """

    name: str
    stages: tuple[str, ...]
    options: Any
    needs_keyholder: bool = False
    insecure: bool = False
    min_clients: int = 1  # the fewest clients a round can aggregate

    @abstractmethod
    def client(self, identity: Identity, roster: Roster, server_id: str = "server", *, session: str,
               state: Mapping[str, Any] | None = None) -> ClientSession: ...

    @abstractmethod
    def server(self, identity: Identity, roster: Roster, *, session: str,
               state: Mapping[str, Any] | None = None) -> ServerSession: ...

    def keyholder(self, identity: Identity, roster: Roster, *, session: str,
                  state: Mapping[str, Any] | None = None) -> KeyHolderSession | None:
        return None

    def check(self, num_clients: int, vector_length: int) -> None:
        """Raise ConfigurationError if a round with these sizes cannot work (overflow, too few clients)."""
        if num_clients < 1:
            raise ConfigurationError(f"a round needs at least one client, not {num_clients}")
        if vector_length < 1:
            raise ConfigurationError(f"vectors must have at least one entry, not {vector_length}")

    def bytes_per_parameter(self) -> float:
        """Bytes each client uploads per vector entry (the dominant message), for reports."""
        raise NotImplementedError


def checked_input(vector: object, weight: object, *, copy: bool = True) -> tuple[np.ndarray, float]:
    """A client's input as float64 (a copy, unless ``copy`` is False: then ``vector`` itself where it already is
    float64, for a caller that only reads it) and its weight; refuses what no protocol can aggregate.

    Runs on the client before anything is derived from the input, so a NaN or inf never
    reaches a mask or a ciphertext.
    """
    array = np.asarray(vector)
    if array.ndim != 1 or array.size == 0:
        raise ProtocolError(f"an input must be a non-empty 1-D vector, not shape {array.shape}")
    if array.dtype.kind not in "iuf":
        raise ProtocolError(f"an input must be numeric, not {array.dtype}")
    array = array.astype(np.float64, copy=copy)
    if not np.isfinite(array).all():
        bad = np.flatnonzero(~np.isfinite(array))
        raise ProtocolError(f"the input holds {bad.size} NaN or infinite entries (first at index {bad[0]}); "
                            "refusing it before anything is sent")
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.integer | np.floating):
        raise ProtocolError(f"a weight must be a number, not {type(weight).__name__}")
    weight = float(weight)
    if not np.isfinite(weight) or weight <= 0:
        raise ProtocolError(f"a weight must be finite and positive, not {weight}")
    return array, weight


MAX_CONTEXT_CHARS = 128


def checked_context(value: object) -> str:
    """A round context (``ClientSession.set_input``): a string of at most ``MAX_CONTEXT_CHARS`` printable ASCII
    characters; anything else raises ConfigurationError."""
    if not isinstance(value, str) or len(value) > MAX_CONTEXT_CHARS or not (value.isascii() and
                                                                          value.isprintable()):
        raise ConfigurationError(f"a round context must be a string of at most {MAX_CONTEXT_CHARS} printable ASCII "
                                 f"characters, not {value!r}")
    return value


def checked_round(roster: Roster, round_id: object, clients: Sequence[str], vector_length: object) -> tuple[str, ...]:
    """Validate a server's ``begin_round`` arguments; returns the clients as a tuple."""
    if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
        raise ConfigurationError(f"round ids are integers >= 0, not {round_id!r}")
    if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
        raise ConfigurationError(f"vector_length must be a positive integer, not {vector_length!r}")
    clients = tuple(clients)
    if not clients:
        raise ConfigurationError("a round needs at least one client")
    if len(set(clients)) != len(clients):
        raise ConfigurationError("a round lists some client twice")
    strangers = [client for client in clients if client not in roster or roster.role(client) != "client"]
    if strangers:
        raise ConfigurationError(f"not enrolled as clients on the roster: {', '.join(map(repr, strangers))}")
    return clients


def export_inputs(inputs: Mapping[int, tuple[np.ndarray, float]]) -> list[dict[str, Any]]:
    """A client's waiting inputs ({round: (vector, weight)}) as plain values, for ``state_dict``."""
    return [{"round": round_id, "vector": vector.copy(), "weight": weight} for round_id, (vector, weight) in
            inputs.items()]


def import_inputs(saved: Sequence[Mapping[str, Any]]) -> dict[int, tuple[np.ndarray, float]]:
    """The inverse of ``export_inputs``."""
    return {int(item["round"]): (np.array(item["vector"], dtype=np.float64), float(item["weight"])) for item in saved}


def bytes_array(data: bytes) -> np.ndarray:
    """Long bytes (ciphertexts, CKKS contexts) as a uint8 array for ``state_dict``: checkpoints store arrays as
    tensors, while a hex string would double the size and land in the checkpoint's JSON header."""
    return np.frombuffer(data, dtype=np.uint8).copy()


def array_bytes(value: np.ndarray) -> bytes:
    """The inverse of ``bytes_array``."""
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
        raise TypeError("saved bytes must be a 1-D uint8 array")
    return value.tobytes()
