"""What every client of a round signs it saw, and the ring order no party can bias.

The view (Bonawitz et al., CCS 2017, §4: consistency checks against a malicious server; issue 10 item 2)
is the SHA-256 of the session, the round, the cohort digest (SHA-256 of the sorted cohort), the round
terms the client derived from ITS OWN options for that cohort size, and the round context (the global
model's digest). A client refuses a round whose announced terms or context differ from its own, signs
the view digest in its commitment, its key advertisement and its consistency signature, and refuses
any relayed neighbour message that carries another view: a server cannot show one client a smaller
cohort or weaker (k, t) than the others without that client noticing.

The ring (on which the Harary graph is laid) comes from commit–reveal (Blum's coin flipping): every
cohort member first commits to 32 fresh OS bytes, H(label ‖ nonce ‖ view); only after it has seen
every member's signed commitment does it reveal its nonce with its keys. The ring seed is
SHA-256(label, session, round, view, every member's nonce in sorted-id order), and the ring orders the
cohort by SHA-256(seed ‖ client id). As long as one client is honest its nonce is uniform and unknown
to the others when they commit, so the seed (hence who neighbours whom) is uniform in each run of the
round. Withholding one reveal would let a server pick between two rings, so every client refuses to go
on unless every cohort member's reveal is there.

What this does NOT stop: the server relays the reveals, so it learns the ring before any client does,
and it can abort there (claim a dropout; nothing secret has been sent yet, only public keys) and re-run
the round under a new round id with fresh nonces, until a ring suits it (e.g. colluders all around one
victim). Each run's ring is uniform, so after r runs the chance that any of them is one of the bad rings
the graph parameters bound (2^-40, ``graph.SECURITY_BITS``) is at most r · 2^-40 by the union bound.
Nothing in the protocol caps r (a site sees an aborted run only as a round that never finished), so the
guarantee is r · 2^-40 for the r runs of a round that a site agrees to join.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

from .stages import NAME

NONCE_BYTES = 32
_LABEL = f"feddat-secure/{NAME}/v2/".encode()


def _digest(*parts: object) -> str:
    return hashlib.sha256(_LABEL + json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def cohort_digest(cohort: Iterable[str]) -> str:
    """SHA-256 over the sorted cohort: who the round is for."""
    return _digest("cohort", sorted(cohort))


def view_digest(session: str, round_id: int, cohort: Iterable[str], terms: Mapping[str, object],
                round_context: str) -> str:
    """The view a client signs: session, round, cohort digest, its own round terms and the round context."""
    return _digest("view", session, round_id, cohort_digest(cohort), dict(terms), round_context)


def nonce_commitment(view: str, nonce: bytes) -> str:
    """H(nonce ‖ view): binds the ring nonce before anyone reveals theirs."""
    return hashlib.sha256(_LABEL + b"nonce/" + nonce + view.encode()).hexdigest()


def ring_seed(session: str, round_id: int, view: str, nonces: Mapping[str, bytes]) -> str:
    """The ring seed from every cohort member's revealed nonce, taken in sorted-id order."""
    return _digest("ring", session, round_id, view, [nonces[client].hex() for client in sorted(nonces)])


def ring_order(seed: str, cohort: Iterable[str]) -> tuple[str, ...]:
    """The cohort sorted by SHA-256(seed ‖ client id): a permutation as random as the seed."""
    return tuple(sorted(cohort, key=lambda client: hashlib.sha256(f"{seed}/{client}".encode()).digest()))


def self_mask_commitment(session: str, view: str, round_id: int, client: str, seed: bytes) -> str:
    """A hash of a client's self-mask seed, sent to the server so it can tell a bad share of it from a good one."""
    return hashlib.sha256(_LABEL + json.dumps(["self-mask", session, view, round_id, client]).encode()
                          + seed).hexdigest()
