"""Inclusion and consistency proofs a third party can check with the roster alone, without the log.

An :class:`InclusionProof` carries one entry (its exact line), a signed tree head of the log that
wrote it and the RFC 9162 audit path between them. A :class:`ConsistencyProof` carries two signed
tree heads of one party and the RFC 9162 proof that the smaller tree is a prefix of the larger one.
Both serialise to JSON (``to_json`` / ``from_json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import merkle
from .entries import AuditError, SchemaError, SignedTreeHead, parse_entry
from .verify import Roster, check_log

INCLUSION_FORMAT = "feddat-secure-audit-inclusion-proof/1"
CONSISTENCY_FORMAT = "feddat-secure-audit-consistency-proof/1"


class ProofError(AuditError):
    """A proof does not prove what it claims, or is malformed."""


@dataclass(frozen=True)
class InclusionProof:
    index: int
    entry: bytes  # the entry's exact line, without newline
    tree_head: SignedTreeHead
    path: tuple[bytes, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"format": INCLUSION_FORMAT, "index": self.index, "entry": self.entry.decode(),
                "tree_head": self.tree_head.to_dict(), "path": [p.hex() for p in self.path]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, value: Any) -> InclusionProof:
        _expect(value, INCLUSION_FORMAT, {"format", "index", "entry", "tree_head", "path"})
        if not isinstance(value["entry"], str):
            raise ProofError("inclusion proof: entry must be the entry's JSON line as a string")
        return cls(_index(value["index"], "index"), value["entry"].encode(),
                   _tree_head(value["tree_head"]), _path(value["path"]))

    @classmethod
    def from_json(cls, text: str | bytes) -> InclusionProof:
        return cls.from_dict(_load(text))


@dataclass(frozen=True)
class ConsistencyProof:
    old: SignedTreeHead
    new: SignedTreeHead
    path: tuple[bytes, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"format": CONSISTENCY_FORMAT, "old": self.old.to_dict(), "new": self.new.to_dict(),
                "path": [p.hex() for p in self.path]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, value: Any) -> ConsistencyProof:
        _expect(value, CONSISTENCY_FORMAT, {"format", "old", "new", "path"})
        return cls(_tree_head(value["old"]), _tree_head(value["new"]), _path(value["path"]))

    @classmethod
    def from_json(cls, text: str | bytes) -> ConsistencyProof:
        return cls.from_dict(_load(text))


def _load(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProofError("a proof must be JSON") from None


def _expect(value: Any, fmt: str, keys: set[str]) -> None:
    if not isinstance(value, Mapping) or value.get("format") != fmt or set(value) != keys:
        raise ProofError(f"not a {fmt} object with exactly the keys {sorted(keys)}")


def _index(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProofError(f"{what} must be a non-negative integer")
    return value


def _tree_head(value: Any) -> SignedTreeHead:
    try:
        return SignedTreeHead.from_dict(value)
    except SchemaError as error:
        raise ProofError(str(error)) from None


def _path(value: Any) -> tuple[bytes, ...]:
    if not isinstance(value, list) or len(value) > 64:
        raise ProofError("a proof path is a list of at most 64 hashes")
    try:
        hashes = tuple(bytes.fromhex(p) for p in value)
    except (TypeError, ValueError):
        raise ProofError("a proof path holds hex SHA-256 hashes") from None
    if any(len(h) != merkle.HASH_SIZE for h in hashes):
        raise ProofError("a proof path holds 32-byte hashes")
    return hashes


def _covering_tree_head(heads: list[SignedTreeHead], tree_size: int | None, needed: int, path: Path,
                        what: str) -> SignedTreeHead:
    if tree_size is not None:
        for sth in heads:
            if sth.tree_size == tree_size:
                if tree_size < needed:
                    raise ValueError(f"the tree head of size {tree_size} does not cover {what}")
                return sth
        sizes = ", ".join(str(s.tree_size) for s in heads) or "none"
        raise ValueError(f"{path} holds no signed tree head of size {tree_size} (sizes: {sizes})")
    if not heads or heads[-1].tree_size < needed:
        latest = heads[-1].tree_size if heads else 0
        raise ValueError(f"{what} is not covered by a signed tree head of {path} yet (the latest covers {latest} "
                         "entries)")
    return heads[-1]


def _read(log_path: Path | str):
    report = check_log(Path(log_path), None)
    if report.problem is not None:
        raise AuditError(f"cannot prove from a log that does not verify: {report.problem}")
    return report


def inclusion_proof(log_path: Path | str, index: int, tree_size: int | None = None) -> InclusionProof:
    """Prove entry ``index`` of a log against its latest signed tree head, or against its tree head of
    ``tree_size`` entries. The log is checked (structure, chain, roots) first; signatures are for the
    checker, who holds the roster. Raises :class:`ValueError` for an index or size the log cannot prove
    (no such entry, not covered by a tree head yet) and :class:`AuditError` for a log that does not check."""
    report = _read(log_path)
    if not 0 <= index < len(report.entries):
        raise ValueError(f"{log_path} has no entry {index} (it holds {len(report.entries)})")
    sth = _covering_tree_head(report.tree_heads, tree_size, index + 1, Path(log_path), f"entry {index}")
    path = merkle.inclusion_path(report.leaves, index, sth.tree_size)
    return InclusionProof(index, report.entries[index].line, sth, tuple(path))


def check_inclusion_proof(proof: InclusionProof | Mapping | str | bytes, roster: Roster) -> bool:
    """True if the tree head is signed by its party's roster key, the entry is that party's, well-formed and
    signed, and the path proves it at ``index`` in the signed tree; raises :class:`ProofError` otherwise."""
    if not isinstance(proof, InclusionProof):
        proof = InclusionProof.from_dict(proof) if isinstance(proof, Mapping) else InclusionProof.from_json(proof)
    sth = proof.tree_head
    key = roster.get(sth.party)
    if key is None:
        raise ProofError(f"party {sth.party!r} is not on the roster")
    try:
        sth.verify(key)
    except AuditError as error:
        raise ProofError(str(error)) from None
    try:
        entry = parse_entry(proof.entry)
    except SchemaError as error:  # the proof file itself parsed: what is wrong is the entry it carries
        raise ProofError(f"the proof's entry (its 'entry' field) is not a valid log entry: {error}") from None
    if entry.party != sth.party:
        raise ProofError(f"the entry is of {entry.party!r} but the tree head is of {sth.party!r}")
    if entry.seq != proof.index:
        raise ProofError(f"the entry has seq {entry.seq}, not the proof's index {proof.index}")
    if not entry.signature_valid(key):
        raise ProofError(f"the entry's signature does not verify against the roster key of {sth.party!r}")
    if not merkle.verify_inclusion(entry.leaf, proof.index, sth.tree_size, proof.path, sth.root):
        raise ProofError(f"the path does not prove entry {proof.index} in the signed tree of {sth.party!r} of size "
                         f"{sth.tree_size}")
    return True


def consistency_proof(log_path: Path | str, old_size: int, new_size: int | None = None) -> ConsistencyProof:
    """Prove that the log's signed tree head of ``old_size`` entries is a prefix of its tree head of
    ``new_size`` entries (default: its latest)."""
    report = _read(log_path)
    old = _covering_tree_head(report.tree_heads, old_size, 0, Path(log_path), "the old tree")
    new = _covering_tree_head(report.tree_heads, new_size, old_size, Path(log_path), f"{old_size} entries")
    path = merkle.consistency_path(report.leaves, old.tree_size, new.tree_size)
    return ConsistencyProof(old, new, tuple(path))


def check_consistency_proof(proof: ConsistencyProof | Mapping | str | bytes, roster: Roster) -> bool:
    """True if both tree heads are signed by the same party's roster key and the path proves the older tree a
    prefix of the newer; raises :class:`ProofError` otherwise. What a party runs on a peer's new tree head."""
    if not isinstance(proof, ConsistencyProof):
        proof = (ConsistencyProof.from_dict(proof) if isinstance(proof, Mapping)
                 else ConsistencyProof.from_json(proof))
    if proof.old.party != proof.new.party:
        raise ProofError("the two tree heads are of different parties")
    key = roster.get(proof.old.party)
    if key is None:
        raise ProofError(f"party {proof.old.party!r} is not on the roster")
    try:
        proof.old.verify(key)
        proof.new.verify(key)
    except AuditError as error:
        raise ProofError(str(error)) from None
    if not merkle.verify_consistency(proof.old.tree_size, proof.old.root, proof.new.tree_size, proof.new.root,
                                     proof.path):
        raise ProofError(f"the path does not prove the tree of {proof.old.party!r} of size {proof.old.tree_size} a "
                         f"prefix of its tree of size {proof.new.tree_size}")
    return True

