"""Message names and the checks several HE parties share.

One round, everything signed (``wire``)::

    server    -> key holder  "setup"     fields {clients, vector_length}
    key holder -> server, each client
                             "context"   fields {clients, vector_length, CKKS parameters, min_clients},
                                         blobs {context: public CKKS context, seal_key: X25519 public key}
    client    -> server      "input"     fields {chunks}, blobs {c000000...: ciphertexts, receipt}
                             receipt = the client's own signed "receipt" envelope for the key holder:
                                         fields {ciphertexts: SHA-256 of the ciphertexts, context: SHA-256
                                         of the public context, vector_length}, blobs {seed: sealed seed}
    server    -> key holder  "aggregate" fields {counted}, blobs {c000000...: summed ciphertexts,
                                         r-<client>: each counted client's receipt, as the client signed it}
    key holder -> server     "result"    fields {counted, total_weight}, arrays {sum: float64}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import MessageRejected
from ..identity import Roster
from ..wire import Envelope
from .config import HEOptions

NAME = "he"
# Server stages (the names ``dropouts`` use): clients answer in "input"; "decrypt" is the key holder's.
INPUT = "input"
DECRYPT = "decrypt"
STAGES = (INPUT, DECRYPT)
# Envelope stages.
SETUP, CONTEXT, RECEIPT, AGGREGATE, RESULT = "setup", "context", "receipt", "aggregate", "result"
RECEIPT_PREFIX = "r-"


def chunk_name(index: int) -> str:
    return f"c{index:06d}"


def chunk_blobs(envelope: Envelope, count: int, extra: set[str]) -> list[bytes]:
    """The ciphertext blobs ``c000000`` .. in order; refuses missing or unexpected blobs."""
    names = [chunk_name(index) for index in range(count)]
    if set(envelope.blobs) != set(names) | extra or envelope.arrays:
        raise MessageRejected(f"expected the blobs {count} ciphertexts and {sorted(extra)}, found "
                              f"{len(envelope.blobs)} blobs and {len(envelope.arrays)} arrays", envelope.sender)
    return [envelope.blobs[name] for name in names]


def seal_associated(round_id: int, client: str, context_digest: str) -> bytes:
    """What a sealed seed is bound to: this round, this client, this round's key."""
    return f"{NAME}|{round_id}|{client}|{context_digest}".encode()


def parameters(config: HEOptions) -> dict[str, Any]:
    return {"poly_modulus_degree": config.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(config.coeff_mod_bit_sizes),
            "global_scale_bits": config.global_scale_bits, "min_clients": config.min_clients}


def round_fields(envelope: Envelope, roster: Roster) -> tuple[tuple[str, ...], int]:
    """``clients`` and ``vector_length`` of a setup request, checked: enrolled, distinct clients; length >= 1."""
    clients, length = envelope.fields.get("clients"), envelope.fields.get("vector_length")
    if (not isinstance(clients, list) or not clients or not all(isinstance(c, str) for c in clients)
            or len(set(clients)) != len(clients)):
        raise MessageRejected("field 'clients' must be a non-empty list of distinct party ids", envelope.sender)
    strangers = [client for client in clients if client not in roster or roster.role(client) != "client"]
    if strangers:
        raise MessageRejected(f"not enrolled as clients: {strangers}", envelope.sender)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise MessageRejected("field 'vector_length' must be a positive integer", envelope.sender)
    return tuple(clients), length


def check_context_fields(envelope: Envelope, config: HEOptions, clients: Sequence[str] | None,
                         vector_length: int) -> tuple[str, ...]:
    """A context message's fields must name this round and exactly our parameters; returns its clients."""
    expected = {**parameters(config), "vector_length": vector_length}
    fields = dict(envelope.fields)
    listed = fields.pop("clients", None)
    if fields != expected:
        raise MessageRejected(f"the context's round parameters {fields} are not the expected {expected}",
                              envelope.sender)
    if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed) or len(set(listed)) != len(listed):
        raise MessageRejected("field 'clients' must be a list of distinct party ids", envelope.sender)
    if clients is not None and listed != list(clients):
        raise MessageRejected("the context lists other clients than this round's", envelope.sender)
    if set(envelope.blobs) != {"context", "seal_key"} or envelope.arrays:
        raise MessageRejected("a context message carries exactly the blobs 'context' and 'seal_key'", envelope.sender)
    return tuple(listed)
