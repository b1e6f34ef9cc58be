"""Message names, size limits and the checks several HE parties share.

One round, everything signed (``wire``); the server's stages are commit, input, draw, verify, decrypt::

    server     -> key holder  "setup"     fields {clients, vector_length, round_context}
    key holder -> server, each client
                              "context"   fields {clients, vector_length, round_context, parameters},
                                          blobs {context: public CKKS context, seal_key: X25519 public key}
    client     -> server      "commit"    blobs {receipt}: the client's own signed "receipt" for the key holder,
                                          fields {ciphertexts: SHA-256 of its ciphertexts, context: SHA-256 of
                                          the public context, vector_length, round_context}, blobs {seed: sealed}
    server     -> each committed client
                              "committed" fields {committed: [[client, SHA-256 of its receipt], ...] sorted}
    client     -> server      "input"     fields {chunks, committed: SHA-256 of that list},
                                          blobs {c000000...: its ciphertexts}
    server     -> key holder  "draw"      fields {counted: the clients whose inputs the server counted,
                                          committed: the list}
    key holder -> server      "committee" (the announcement, once per round) fields {counted, committed: SHA-256
                                          of the list, committee: the members it drew from counted, round_context}
    server     -> each committee member: the announcement and every counted "input", verbatim, then
                              "verify"    fields {counted}, blobs {r-<client>: every committed receipt}
    member     -> server      "attest"    (for the key holder) fields {counted, committed, sum: SHA-256 of the
                                          summed ciphertexts it computed itself, round_context}
    server     -> key holder  "aggregate" fields {counted, committed: the list}, blobs {c000000...: the sum,
                                          r-<client>: each counted receipt, a-<member>: each attestation}
    key holder -> server      "result"    fields {counted, total_weight}, arrays {sum: float64}

Commit before reveal: a client uploads its ciphertexts only after the server has shown it the list of every
committed receipt (its own among them) and signs that list's digest with them; the committee refuses an
aggregate whose inputs do not all carry the same list. A colluding site's ciphertexts are therefore fixed (by
their hash, in its receipt) before any honest ciphertext leaves its site, so it cannot submit a combination
of honest ciphertexts (p·c_victim − c_victim cancels the victim's canaries, not the committee's hash check).

Counted before drawn: the server fixes the counted clients (and the committed list) in the draw request before
the key holder draws the committee from them, so it cannot pick the members, and a client that dropped before
its input was counted can never be drawn (it could not abort the round). The key holder draws once per round:
the server cannot ask again until it gets colluders.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from ..base import checked_context
from ..errors import ConfigurationError, MessageRejected
from ..identity import Roster
from ..wire import Envelope
from .chunks import chunk_name
from .config import HEOptions

NAME = "he"
# Server stages (the names ``dropouts`` use).
COMMIT, INPUT, DRAW, VERIFY, DECRYPT = "commit", "input", "draw", "verify", "decrypt"
STAGES = (COMMIT, INPUT, DRAW, VERIFY, DECRYPT)
# Envelope stages that are not server stages.
SETUP, CONTEXT, RECEIPT, COMMITTED, COMMITTEE, ATTEST, AGGREGATE, RESULT = (
    "setup", "context", "receipt", "committed", "committee", "attest", "aggregate", "result")
RECEIPT_PREFIX = "r-"
ATTEST_PREFIX = "a-"
RECEIPT_FIELDS = frozenset({"ciphertexts", "context", "vector_length", "round_context"})

# Per-stage size limits (issue 10, item 9): a small message is headers, party ids, digests and receipts.
_SMALL_BYTES = 64 << 10
_PER_CLIENT_BYTES = 4 << 10


def small_limit(cohort: int) -> int:
    """The largest message without ciphertexts of a round with ``cohort`` clients (lists of ids, receipts)."""
    return _SMALL_BYTES + _PER_CLIENT_BYTES * max(cohort, 1)


def context_limit(config: HEOptions, cohort: int) -> int:
    """A context message: a public key of 2 polynomials over every prime, 8 bytes a coefficient, twice over."""
    key = 2 * config.poly_modulus_degree * len(config.coeff_mod_bit_sizes) * 8
    return 2 * key + small_limit(cohort)


def ciphertexts_limit(ciphertext_bytes: int, chunks: int, cohort: int) -> int:
    """An input or an aggregate: ``chunks`` ciphertexts of at most 1/8 more than a measured fresh one."""
    return chunks * (ciphertext_bytes + ciphertext_bytes // 8 + 256) + 2 * small_limit(cohort)


def chunk_blobs(envelope: Envelope, count: int, extra: set[str]) -> list[bytes]:
    """The ciphertext blobs ``c000000`` .. in order; refuses missing or unexpected blobs."""
    names = [chunk_name(index) for index in range(count)]
    if set(envelope.blobs) != set(names) | extra or envelope.arrays:
        raise MessageRejected(f"expected the blobs {count} ciphertexts and {sorted(extra)}, found "
                              f"{len(envelope.blobs)} blobs and {len(envelope.arrays)} arrays", envelope.sender)
    return [envelope.blobs[name] for name in names]


def seal_associated(session: str, round_id: int, client: str, context_digest: str) -> bytes:
    """What a sealed seed is bound to: this session (run), this round, this client, this round's key."""
    return f"{NAME}|{session}|{round_id}|{client}|{context_digest}".encode()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_digest(value: object) -> bool:
    """Whether ``value`` is what ``digest`` returns: 64 lowercase hex characters (a signed field claiming to be a
    digest may be any JSON value)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def committed_digest(committed: Sequence[Sequence[str]]) -> str:
    """SHA-256 of the committed list ([[client, receipt digest], ...]) as canonical JSON: what inputs carry."""
    return digest(json.dumps([list(entry) for entry in committed], separators=(",", ":")).encode())


def committed_list(value: object, cohort: Sequence[str], sender: str | None) -> list[list[str]]:
    """A ``committed`` field checked: [client, 64-hex digest] pairs of distinct cohort clients, sorted by client."""
    if (not isinstance(value, list) or not all(isinstance(entry, list) and len(entry) == 2
                                               and all(isinstance(item, str) for item in entry) for entry in value)):
        raise MessageRejected("field 'committed' must be a list of [client, receipt digest] pairs", sender)
    clients = [entry[0] for entry in value]
    if clients != sorted(set(clients)) or not set(clients) <= set(cohort):
        raise MessageRejected("the committed list must name distinct clients of this round, sorted", sender)
    if not all(is_digest(entry[1]) for entry in value):
        raise MessageRejected("a committed receipt digest is not a SHA-256 hex digest", sender)
    return [list(entry) for entry in value]


def counted_list(value: object, allowed: Sequence[str], required: int, sender: str | None) -> list[str]:
    """A ``counted`` field checked: sorted distinct ids from ``allowed``, at least ``required`` of them."""
    if not isinstance(value, list) or not all(isinstance(client, str) for client in value):
        raise MessageRejected("field 'counted' must be a list of client ids", sender)
    if value != sorted(set(value)):
        raise MessageRejected(f"the counted list must name distinct clients, sorted: {value}", sender)
    strangers = sorted(set(value) - set(allowed))
    if strangers:
        raise MessageRejected(f"the counted list names clients that did not commit in this round: {strangers}",
                              sender)
    if len(value) < required:
        raise MessageRejected(f"an aggregate of {len(value)} inputs is below the required {required} "
                              f"(max(min_clients, ⌈min_fraction · cohort⌉)); refusing it", sender)
    return list(value)


def check_receipt(receipt: Envelope, context_digest: str, vector_length: int, round_context: str) -> None:
    """A receipt (already decoded and matched to its client, round and key holder) is well formed and for this
    round's key, vector length and round context.

    Every field is type-checked first: the receipt is signed by a site, which may be malicious, and whoever
    accepts it forwards it to the committee, whose members use its ``ciphertexts`` digest as a set member and a
    comparison key (a JSON list there must be refused here, not crash them)."""
    fields = receipt.fields
    if set(fields) != RECEIPT_FIELDS:
        raise MessageRejected(f"a receipt carries exactly the fields {sorted(RECEIPT_FIELDS)}", receipt.sender)
    length = fields["vector_length"]
    if (not is_digest(fields["ciphertexts"]) or not is_digest(fields["context"])
            or isinstance(length, bool) or not isinstance(length, int) or not isinstance(fields["round_context"], str)):
        raise MessageRejected("a receipt's 'ciphertexts' and 'context' must be SHA-256 hex digests, its "
                              "'vector_length' an integer and its 'round_context' a string", receipt.sender)
    if (fields["context"] != context_digest
            or fields["vector_length"] != vector_length or set(receipt.blobs) != {"seed"} or receipt.arrays):
        raise MessageRejected("the receipt is not for this round's key and vector length", receipt.sender)
    if fields["round_context"] != round_context:
        raise MessageRejected(f"the receipt was made for round context {fields['round_context']!r}, not "
                              f"{round_context!r} (another model)", receipt.sender)


def parameters(config: HEOptions) -> dict[str, Any]:
    """What every party of a round must agree on, announced in the context message."""
    return {"poly_modulus_degree": config.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(config.coeff_mod_bit_sizes),
            "global_scale_bits": config.global_scale_bits, "min_clients": config.min_clients,
            "min_fraction": config.min_fraction, "committee_size": config.committee_size,
            "min_weight": config.min_weight, "max_weight": config.max_weight, "input_bound": config.input_bound}


def round_fields(envelope: Envelope, roster: Roster) -> tuple[tuple[str, ...], int, str]:
    """``clients``, ``vector_length`` and ``round_context`` of a setup request, checked."""
    clients, length = envelope.fields.get("clients"), envelope.fields.get("vector_length")
    context = envelope.fields.get("round_context")
    if set(envelope.fields) != {"clients", "vector_length", "round_context"} or envelope.arrays or envelope.blobs:
        raise MessageRejected("a setup request carries exactly the fields 'clients', 'vector_length' and "
                              "'round_context'", envelope.sender)
    if (not isinstance(clients, list) or not clients or not all(isinstance(c, str) for c in clients)
            or len(set(clients)) != len(clients)):
        raise MessageRejected("field 'clients' must be a non-empty list of distinct party ids", envelope.sender)
    strangers = [client for client in clients if client not in roster or roster.role(client) != "client"]
    if strangers:
        raise MessageRejected(f"not enrolled as clients: {strangers}", envelope.sender)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise MessageRejected("field 'vector_length' must be a positive integer", envelope.sender)
    try:
        context = checked_context(context)
    except ConfigurationError as error:
        raise MessageRejected(f"field 'round_context': {error}", envelope.sender) from None
    return tuple(clients), length, context


def check_context_fields(envelope: Envelope, config: HEOptions, clients: Sequence[str] | None,
                         vector_length: int, round_context: str) -> tuple[str, ...]:
    """A context message must name this round, exactly our parameters and round context; returns the clients."""
    expected = {**parameters(config), "vector_length": vector_length, "round_context": round_context}
    fields = dict(envelope.fields)
    listed = fields.pop("clients", None)
    if fields != expected:
        raise MessageRejected(f"the context's round parameters {fields} are not the expected {expected}",
                              envelope.sender)
    if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed) or len(set(listed)) != len(listed):
        raise MessageRejected("field 'clients' must be a list of distinct party ids", envelope.sender)
    if clients is not None and listed != list(clients):
        raise MessageRejected("the context lists other clients than this round's", envelope.sender)
    if len(listed) < config.min_clients:
        raise MessageRejected(f"a cohort of {len(listed)} clients can never reach min_clients = "
                              f"{config.min_clients}", envelope.sender)
    if set(envelope.blobs) != {"context", "seal_key"} or envelope.arrays:
        raise MessageRejected("a context message carries exactly the blobs 'context' and 'seal_key'", envelope.sender)
    return tuple(listed)


def committee_size(config: HEOptions, counted: int) -> int:
    """How many members the key holder draws from ``counted`` clients."""
    return min(config.committee_size, counted)


def check_announcement(envelope: Envelope, config: HEOptions, counted: Sequence[str], committed: str,
                       round_context: str) -> tuple[str, ...]:
    """A committee announcement (already checked to be the key holder's, for this round) must be for exactly
    these counted clients, this committed-list digest and round context, and name ``committee_size`` distinct
    counted clients, sorted; returns the committee."""
    fields = dict(envelope.fields)
    committee = fields.pop("committee", None)
    expected = {"counted": list(counted), "committed": committed, "round_context": round_context}
    if fields != expected or envelope.blobs or envelope.arrays:
        raise MessageRejected("the committee announcement is not for these counted clients, this committed list "
                              "and this round context", envelope.sender)
    size = committee_size(config, len(counted))
    if (not isinstance(committee, list) or len(committee) != size or committee != sorted(set(committee))
            or not all(isinstance(c, str) and c in counted for c in committee)):
        raise MessageRejected(f"field 'committee' must list {size} distinct counted clients, sorted", envelope.sender)
    return tuple(committee)
