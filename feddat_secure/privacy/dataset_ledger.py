"""One privacy budget per dataset, across runs: the data owner's persistent, signed, append-only ledger.

A run's own ledgers (``privacy_ledger.json`` in its run folder) start empty with every run, so ``--overwrite``,
a new run name or a deleted run folder would reset what a dataset has spent, and runs repeated on the same
data (hyperparameter tuning) would compose untracked. DP composes over every mechanism run on the same
records, whichever run ran it (sequential composition; Dwork & Roth 2014, Thm 3.16, and for the subsampled
Gaussian the RDP composition of Mironov 2017, Prop. 1). So each site also charges every round to a ledger
of its *dataset*, kept by the data owner outside any run folder and keyed by the dataset's digest.

The ledger is an audit log (:class:`audits.AuditLog`): JSON Lines, each entry hash-chained to the one before
and signed with the data owner's Ed25519 ledger key, with signed Merkle tree heads — so an edited, reordered,
deleted or cut entry is found by :func:`read_ledger` (and ``feddat-secure privacy ledger show``), which names
the first bad entry. Its entries:

- ``log_opened`` (``meta.run_id`` = the dataset's SHA-256);
- ``privacy_budget``: a level's budget ε, δ and accountant, fixed the first time the level is charged (the
  ε of the whole ledger is always stated at that δ: the events themselves carry no δ);
- ``privacy_charged``: one round's Gaussian mechanisms at one level, written and fsynced *before* the round
  trains (write-ahead), with the run (its first session id) and the round (numbered from 1, as in every audit
  log; :class:`Charge` holds the 0-based index the code uses).

Dropping whole entries from the end leaves a valid shorter log: that is found against the anchors a run
keeps (each site's signed audit log records the ledger's size and head after every charge, and
``privacy_ledger.json`` the same at the run's end), and a resumed run refuses a ledger that lost its charges.

**Overlapping datasets share their budget.** DP protects records, not datasets: a record's loss composes over
every mechanism run on *any* dataset that contains it. A ledger keyed by the digest of the whole record set
alone would give a dataset with one record added or removed (a subset, a k-fold split, added data) a fresh
budget. So each ledger also binds its record set: the sorted per-record digests (:class:`RecordSet`), in the
side file ``<sha>.records`` (32 bytes a record) beside it. The dataset's SHA-256, which the ledger's file name
and its signed ``log_opened`` and ``privacy_budget`` entries carry, *is* the SHA-256 of that file's bytes
(after a domain prefix), so the side file cannot be swapped or edited without the check failing; it is written
(fsynced) before its ledger is created. Every charge (and a run's start check) goes, under one lock of the
ledger folder, to the site's own ledger and to every other ledger in the folder whose record set shares a
record with the site's, each under its own budget; if any of them would pass its budget, none is charged.

Why that bounds every record's ε: take a record r and the oldest ledger L whose record set contains r. Every
charge of a mechanism run on r is written to the ledger of the dataset it ran on (which contains r, so it
existed no earlier than L), and every run on a dataset containing r after L's creation overlaps L and charges
L too. So L holds every charge that ever touched r, and enforcing L's budget at each charge bounds r's
cumulative ε by it (sequential composition, as above). Deleting a ledger (or its side file, which makes every
overlapping run refuse) remains the data owner's visible act on its own folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from audits import AuditError, AuditLog, check_log, key_id, owner_data_dir, replace_durably

from ..errors import FeddatError
from .accounting import ACCOUNTANTS, AccountingError, GaussianEvent, PrivacyAccountant, compute_epsilon
from .budget import BudgetExceeded
from .client_level import SKELLAM_RDP_ORDERS

LEDGER_DIR_ENV = "FEDDAT_SECURE_LEDGER_DIR"
LEDGER_SUFFIX = ".privacy-ledger.jsonl"
RECORDS_SUFFIX = ".records"  # a ledger's record set: its sorted per-record SHA-256 digests, 32 bytes each
LOCK_FILE = ".ledgers.lock"  # one lock per ledger folder: a charge may touch several ledgers in it
DATASET_DOMAIN = b"feddat-secure dataset v1\x00"  # prefixes the record digests in the dataset's SHA-256
DIGEST_SIZE = 32
KEY_FILE = "ledger_key.pem"  # the data owner's signing key (0600), one per ledger folder
PUBLIC_KEY_FILE = "ledger_key.pub.pem"  # to hand to an auditor
OWNER = "data-owner"  # the party id the ledger's entries are signed as
BUDGET_EVENT = "privacy_budget"
CHARGE_EVENT = "privacy_charged"
SITE_LEVELS = ("record", "client")


class DatasetLedgerError(FeddatError, ValueError):
    """A dataset ledger cannot be used: it does not verify, belongs to other data, or its key is missing."""


def default_ledger_dir() -> Path:
    """``$FEDDAT_SECURE_LEDGER_DIR``, else ``$XDG_DATA_HOME/feddat-secure/privacy-ledgers`` (XDG Base Directory
    spec: ``~/.local/share`` when unset) — the data owner's, outside every run folder."""
    return owner_data_dir(LEDGER_DIR_ENV, "privacy-ledgers")


def resolve_ledger_dir(configured: str | Path | None) -> Path:
    """The ledger folder: ``configured`` when given (config key or ``--dataset-ledger-dir``), else the default."""
    return Path(configured).expanduser() if configured else default_ledger_dir()


@dataclass(frozen=True)
class RecordSet:
    """A dataset as the sorted SHA-256 digests of its records (a record repeated in the data appears as often).
    Its :attr:`sha256` is the dataset's digest, and :meth:`to_bytes` the content of its ledger's side file."""

    digests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if any(len(d) != DIGEST_SIZE for d in self.digests) or list(self.digests) != sorted(self.digests):
            raise ValueError("a record set is the sorted 32-byte digests of its records")

    @classmethod
    def of(cls, digests: Iterable[bytes]) -> RecordSet:
        return cls(tuple(sorted(digests)))

    @classmethod
    def from_bytes(cls, data: bytes) -> RecordSet:
        return cls(tuple(data[i:i + DIGEST_SIZE] for i in range(0, len(data), DIGEST_SIZE)))

    def to_bytes(self) -> bytes:
        return b"".join(self.digests)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(DATASET_DOMAIN + self.to_bytes()).hexdigest()

    @cached_property
    def _distinct(self) -> frozenset[bytes]:
        return frozenset(self.digests)

    def shared(self, other: RecordSet) -> int:
        """How many distinct records this set and ``other`` have in common."""
        return len(self._distinct & other._distinct)


def record_set(split: Any) -> RecordSet:
    """A site's training records as encoded (every tensor of an ``EncodedSplit``, record by record), as the
    sorted SHA-256 digest of each record.

    The same records give the same set whatever their order, so shuffling the data does not open a fresh
    budget; any changed, added or removed record gives another dataset digest, but the records it keeps still
    match their digests in every other ledger's record set (that is how overlapping datasets are found).
    Records are hashed as encoded, so a change of encoding (image size, tokenizer, max length) makes other
    records."""
    fields = (split.pixel_values, split.input_ids, split.attention_mask, split.labels)
    records = []
    for index in range(len(split)):
        digest = hashlib.sha256()
        for tensor in fields:
            value = tensor[index].contiguous()
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.numpy().tobytes())
        records.append(digest.digest())
    return RecordSet.of(records)


def records_path(ledger: Path) -> Path:
    """The side file of a dataset ledger that holds its record set."""
    return ledger.with_name(ledger.name.removesuffix(LEDGER_SUFFIX) + RECORDS_SUFFIX)


def read_records(ledger: Path) -> RecordSet:
    """The record set of a dataset ledger, from its side file, which must hash to the dataset digest the ledger
    is named after (and its signed entries carry): a replaced, edited or missing side file is refused."""
    dataset, path = ledger.name.removesuffix(LEDGER_SUFFIX), records_path(ledger)
    if not path.is_file():
        raise DatasetLedgerError(f"{ledger}: its record set {path.name} is missing, so no run can tell which "
                                 "records this ledger's budget covers; restore it from the ledger folder's backup")
    data = path.read_bytes()
    actual = hashlib.sha256(DATASET_DOMAIN + data).hexdigest()
    if actual != dataset or len(data) % DIGEST_SIZE:
        raise DatasetLedgerError(f"{path}: not the record set of dataset {dataset} (it hashes to {actual}); it was "
                                 "replaced or changed")
    return RecordSet.from_bytes(data)


@dataclass(frozen=True)
class LevelBudget:
    """A level's budget in a dataset ledger: ε (``inf``: none), the δ every ε is stated at, the accountant."""

    level: str
    epsilon: float
    delta: float
    accountant: str

    def __post_init__(self) -> None:
        if self.level not in SITE_LEVELS:
            raise ValueError(f"unknown level {self.level!r}")
        if not (self.epsilon > 0) or not 0 < self.delta < 1 or self.accountant not in ACCOUNTANTS:
            raise ValueError(f"invalid dataset budget {self}")

    def meta(self, dataset_sha256: str) -> dict[str, Any]:
        return {"dataset_sha256": dataset_sha256, "level": self.level,
                "budget_epsilon": "unbounded" if math.isinf(self.epsilon) else self.epsilon,
                "delta": self.delta, "accountant": self.accountant}


@dataclass(frozen=True)
class Charge:
    """One ``privacy_charged`` entry: what one attempt at one round of one run spent at one level. ``round`` is the
    0-based index the accountants use; the ledger's entry and :meth:`to_json` number it from 1."""

    seq: int
    time: str
    run: str
    round: int
    level: str
    events: tuple[GaussianEvent, ...]
    trained_on: str  # the SHA-256 of the dataset the run trained on: this ledger's, or one sharing records with it

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "run": self.run, "round": self.round + 1, "level": self.level,
                "events": [e.to_json() for e in self.events], "trained_on": self.trained_on}


def _event_text(event: GaussianEvent) -> str:
    """An event as a short string (the audit log keeps lists of short strings, never lists of numbers);
    ``repr`` of a float round-trips exactly."""
    return f"{event.noise_multiplier!r} {event.sample_rate!r} {event.steps}"


def _event_of(text: str) -> GaussianEvent:
    sigma, rate, steps = text.split(" ")
    return GaussianEvent(float(sigma), float(rate), int(steps))


@dataclass(frozen=True)
class LedgerContents:
    """A verified dataset ledger: its budgets, its charges, its size and the hash of its last entry."""

    path: Path
    dataset_sha256: str
    key_id: str
    budgets: Mapping[str, LevelBudget]
    charges: tuple[Charge, ...]
    entries: int
    head_sha256: str

    def accountant(self, level: str, *, proposed: LevelBudget | None = None,
                   exclude_run: str | None = None) -> PrivacyAccountant:
        """The level's ledger as a :class:`PrivacyAccountant` over every charge (of every run but
        ``exclude_run``), at the ledger's budget (``proposed`` when the level was never charged)."""
        budget = self.budgets.get(level, proposed)
        if budget is None:
            raise DatasetLedgerError(f"{self.path}: no {level}-level budget in this dataset ledger")
        accountant = PrivacyAccountant(level=level, client=f"dataset {self.dataset_sha256[:12]}",
                                       accountant=budget.accountant, delta=budget.delta,
                                       budget_epsilon=0.0 if math.isinf(budget.epsilon) else budget.epsilon,
                                       per_round=(), rdp_orders=_rdp_orders(budget))
        accountant.rounds = [(c.round, c.events) for c in self.charges if c.level == level and c.run != exclude_run]
        return accountant

    def run_charges(self, run: str, level: str, trained_on: str | None = None
                    ) -> list[tuple[int, tuple[GaussianEvent, ...]]]:
        """Run ``run``'s charges at ``level`` as (round, events); with ``trained_on``, only those of the site that
        trained on that dataset: two sites of one run whose data share records both charge this ledger."""
        return [(c.round, c.events) for c in self.charges if c.run == run and c.level == level
                and (trained_on is None or c.trained_on == trained_on)]

    def runs(self) -> list[str]:
        return list(dict.fromkeys(c.run for c in self.charges))

    def trained_on(self, run: str) -> list[str]:
        """The datasets run ``run`` trained on (this ledger's own, or others that share records with it)."""
        return list(dict.fromkeys(c.trained_on for c in self.charges if c.run == run))

    def summary(self) -> dict[str, Any]:
        """What ``privacy ledger show`` prints: per level ε under every accountant, δ, budget, remaining, and each
        run's share (ε of its charges alone)."""
        levels = {}
        for level, budget in self.budgets.items():
            ledger = self.accountant(level)
            epsilons = {name: _epsilon_or_none(ledger, name) for name in ACCOUNTANTS}
            governing = ledger.epsilon()
            shares = {}
            for run in self.runs():
                events = [e for _, events in self.run_charges(run, level) for e in events]
                if events:
                    shares[run] = {"charges": len(self.run_charges(run, level)),
                                   "epsilon": compute_epsilon(events, budget.delta, "rdp"),
                                   "trained_on": self.trained_on(run)}
            levels[level] = {"delta": budget.delta, "accountant": budget.accountant,
                             "budget_epsilon": None if math.isinf(budget.epsilon) else budget.epsilon,
                             "epsilon": epsilons, "remaining_epsilon":
                             None if math.isinf(budget.epsilon) else max(0.0, budget.epsilon - governing),
                             "charges": sum(1 for c in self.charges if c.level == level), "runs": shares}
        return {"path": str(self.path), "dataset_sha256": self.dataset_sha256, "key_id": self.key_id,
                "entries": self.entries, "head_sha256": self.head_sha256, "levels": levels}

    def to_json(self) -> dict[str, Any]:
        """Every verified entry an auditor needs to recompute ε (``privacy ledger export``)."""
        return {**self.summary(), "budgets": {level: b.meta(self.dataset_sha256) for level, b in self.budgets.items()},
                "charges": [c.to_json() for c in self.charges]}


def _epsilon_or_none(ledger: PrivacyAccountant, accountant: str) -> float | None:
    try:
        return ledger.epsilon(accountant)
    except AccountingError:
        return None  # outside PRV's numerical range


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The public key of a ledger folder's key file, or of a PEM public key (an auditor's copy)."""
    data = Path(path).read_bytes()
    try:
        key = load_pem_private_key(data, password=None).public_key() if b"PRIVATE" in data \
            else load_pem_public_key(data)
    except ValueError as error:
        raise DatasetLedgerError(f"{path} is not a PEM Ed25519 key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise DatasetLedgerError(f"{path} is not an Ed25519 key")
    return key


def read_ledger(path: Path | str, public_key: Ed25519PublicKey | None = None) -> LedgerContents:
    """Verify a dataset ledger (chain, signatures, tree heads; with the key of its folder by default) and parse it.
    Raises :class:`DatasetLedgerError` naming the first bad entry."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLedgerError(f"no dataset ledger at {path}")
    if public_key is None:
        key_file = path.parent / KEY_FILE
        if not key_file.is_file():
            raise DatasetLedgerError(f"{path}: no ledger key {KEY_FILE} beside it (pass the data owner's public key)")
        public_key = load_public_key(key_file)
    report = check_log(path, {OWNER: public_key}, party=OWNER)
    if report.problem is not None:
        raise DatasetLedgerError(f"dataset ledger does not verify: {report.problem}")
    return _parse(path, report.entries, key_id(public_key))


def _parse(path: Path, entries: Sequence[Any], ledger_key_id: str) -> LedgerContents:
    opened = entries[0]
    dataset = opened.meta.get("run_id")
    expected = path.name.removesuffix(LEDGER_SUFFIX)
    if dataset != expected:
        raise DatasetLedgerError(f"{path}: line 1 (seq 0): the ledger is of dataset {dataset!r}, its file name says "
                                 f"{expected!r}")
    budgets: dict[str, LevelBudget] = {}
    charges: list[Charge] = []
    for entry in entries:
        where = f"{path}: line {entry.seq + 1} (seq {entry.seq})"
        meta = entry.meta
        try:
            if entry.event == BUDGET_EVENT:
                if meta["dataset_sha256"] != dataset or meta["level"] in budgets:
                    raise ValueError("a second budget, or another dataset's")
                epsilon = math.inf if meta["budget_epsilon"] == "unbounded" else float(meta["budget_epsilon"])
                budgets[meta["level"]] = LevelBudget(meta["level"], epsilon, float(meta["delta"]),
                                                     meta["accountant"])
            elif entry.event == CHARGE_EVENT:
                if meta["level"] not in budgets:
                    raise ValueError(f"a {meta['level']}-level charge before that level's budget")
                if not isinstance(entry.round, int) or entry.round < 1:
                    raise ValueError("a charge names its round, numbered from 1")
                charges.append(Charge(entry.seq, entry.time, str(meta["run"]), entry.round - 1, meta["level"],
                                      tuple(_event_of(text) for text in meta["events"]), str(meta["trained_on"])))
            elif entry.event not in ("log_opened", "tree_head", "log_recovered"):
                raise ValueError(f"event {entry.event!r} does not belong in a dataset ledger")
        except (KeyError, ValueError, TypeError) as error:
            raise DatasetLedgerError(f"{where}: not a valid dataset ledger entry ({error})") from None
    return LedgerContents(path, dataset, ledger_key_id, budgets, tuple(charges), len(entries), entries[-1].hash)


class DatasetLedger:
    """The ledger of one dataset (its :class:`RecordSet`) in a ledger folder, and the other ledgers there whose
    record sets share records with it. Each use opens, verifies and releases the files under the folder's
    exclusive lock, so runs in other processes (or other sites with the same or overlapping data) charge them
    in turn, and a ledger created by one of them is seen by the next charge of the others."""

    def __init__(self, folder: Path | str, records: RecordSet) -> None:
        self.folder = Path(folder)
        self.records = records
        self.dataset_sha256 = records.sha256
        self.path = self.folder / f"{self.dataset_sha256}{LEDGER_SUFFIX}"
        self._index: dict[str, int] = {}  # each other ledger of the folder seen so far → records shared with this

    def key(self) -> Ed25519PrivateKey:
        """The data owner's ledger key, created (0600, with its public half beside it) on first use."""
        path = self.folder / KEY_FILE
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            with contextlib.suppress(FileExistsError):  # another process created it first: use that one
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
                    out.flush()
                    os.fsync(out.fileno())
                (self.folder / PUBLIC_KEY_FILE).write_bytes(
                    key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
        if path.stat().st_mode & 0o077:
            raise DatasetLedgerError(f"{path} can be read by others (mode {path.stat().st_mode & 0o777:o}); "
                                     "chmod 600 it")
        key = load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise DatasetLedgerError(f"{path} is not an Ed25519 private key")
        return key

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.folder / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _shared_ledgers(self) -> dict[Path, int]:
        """(under the lock) Every other ledger of the folder whose record set shares records with this dataset's,
        with how many. Each side file is read (and checked against its ledger's name) once per instance; a
        ledger seen sharing records that has since gone is refused, never charged around."""
        for path in sorted(self.folder.glob("*" + LEDGER_SUFFIX)):
            dataset = path.name.removesuffix(LEDGER_SUFFIX)
            if dataset != self.dataset_sha256 and dataset not in self._index:
                self._index[dataset] = read_records(path).shared(self.records)
        shared = {self.folder / f"{dataset}{LEDGER_SUFFIX}": count for dataset, count in self._index.items() if count}
        for path, count in shared.items():
            if not path.is_file():
                raise DatasetLedgerError(f"{path}: the ledger of a dataset that shares {count} records with this "
                                         "site's is gone since this run first saw it; restore it from backup")
        return shared

    def _write_records(self) -> None:
        """(under the lock) This dataset's record set beside its ledger, durably, before the ledger exists; an
        existing side file must be this dataset's."""
        path = records_path(self.path)
        if path.exists():
            read_records(self.path)
            return
        replace_durably(path, self.records.to_bytes())

    def read(self) -> LedgerContents | None:
        """The verified contents, or None while nothing was ever charged to this dataset."""
        return self.read_with_shared()[0]

    def read_with_shared(self) -> tuple[LedgerContents | None, list[tuple[LedgerContents, int]]]:
        """This dataset's verified ledger (None while never charged), and each other ledger sharing records with
        it (verified) with the number of records shared."""
        with self._locked():
            public_key = self.key().public_key()
            shared = [(read_ledger(path, public_key), count) for path, count in self._shared_ledgers().items()]
            return (read_ledger(self.path, public_key) if self.path.exists() else None), shared

    def charge(self, run: str, round_index: int, charges: Mapping[str, Sequence[GaussianEvent]],
               proposed: Mapping[str, LevelBudget]) -> LedgerContents:
        """Append one ``privacy_charged`` entry per level (fsynced before this returns) to this dataset's ledger
        and to every ledger sharing records with it, after the level's ``privacy_budget`` entry where the level
        is new there (``proposed``). Under the folder's lock, each ledger is verified first (a torn last line is
        set aside and recorded, as :meth:`AuditLog.open` does) and each budget checked again;
        :class:`BudgetExceeded` when a level of any of them would pass its budget (nothing is written then).
        Returns this dataset's ledger as charged."""
        with self._locked():
            key = self.key()
            shared = self._shared_ledgers()
            logs: dict[Path, AuditLog] = {}
            try:
                try:
                    for path in (self.path, *shared):
                        if path.exists():
                            logs[path] = AuditLog.open(path, OWNER, key)
                except AuditError as error:
                    raise DatasetLedgerError(f"dataset ledger: {error}") from None
                contents = {path: read_ledger(path, key.public_key()) for path in logs}
                contents.setdefault(self.path, LedgerContents(self.path, self.dataset_sha256, key_id(key.public_key()),
                                                              {}, (), 0, ""))  # never charged yet: nothing spent
                reasons = [f"{_whose(path, shared)}: {reason}" if path in shared else reason
                           for path, ledger in contents.items() for level, events in charges.items()
                           if (reason := ledger.accountant(level, proposed=proposed[level])
                               .would_exceed(events, round_index)) is not None]
                if reasons:
                    raise BudgetExceeded(round_index, reasons)
                self._write_records()  # a ledger never exists without its record set
                if self.path not in logs:
                    logs[self.path] = AuditLog.create(self.path, OWNER, key, run_id=self.dataset_sha256)
                for path, log in logs.items():
                    for level, events in charges.items():
                        if level not in contents[path].budgets:
                            log.record(BUDGET_EVENT, meta=proposed[level].meta(contents[path].dataset_sha256))
                        log.record(CHARGE_EVENT, round=round_index + 1,
                                   meta={"level": level, "run": run, "events": [_event_text(e) for e in events],
                                         "trained_on": self.dataset_sha256})
            finally:
                for log in logs.values():
                    log.release()
            return read_ledger(self.path, key.public_key())


def sharing_records(ledger: Path, records: RecordSet) -> dict[Path, int]:
    """Every other ledger in ``ledger``'s folder whose record set shares records with ``records``, with how many
    (each side file checked against its ledger's name); what ``privacy ledger show`` lists."""
    shared = {}
    for path in sorted(ledger.parent.glob("*" + LEDGER_SUFFIX)):
        if path.name != ledger.name and (count := read_records(path).shared(records)):
            shared[path] = count
    return shared


def _whose(path: Path, shared: Mapping[Path, int]) -> str:
    return (f"the ledger of dataset {path.name.removesuffix(LEDGER_SUFFIX)[:12]}, which shares {shared[path]} "
            "records with this site's")


def _rdp_orders(budget: LevelBudget) -> tuple[int, ...] | None:
    """The RDP orders a level's ε is computed at. The client level may hold distributed (Skellam) rounds, whose
    RDP bound holds at integer orders only (Agarwal et al. 2021, Thm 3.5; client_level.SKELLAM_RDP_ORDERS), and
    an event does not say which mechanism it bounds: under RDP the client level is computed at those orders, which
    for a Gaussian round only makes ε larger (fewer orders to minimize the conversion over)."""
    return SKELLAM_RDP_ORDERS if budget.level == "client" and budget.accountant == "rdp" else None


def projected_refusal(contents: LedgerContents | None, plans: Mapping[str, Sequence[GaussianEvent]],
                      proposed: Mapping[str, LevelBudget], rounds: int, *, shared: int | None = None) -> str | None:
    """Why a fresh run of ``rounds`` rounds, each spending ``plans`` (per level), would overdraw the budget of
    a dataset ledger (every run's charges so far plus the whole plan), or None when it fits. ``shared``: the
    ledger is another dataset's, which shares that many records with this site's."""
    whose = "this site's dataset" if shared is None or contents is None else \
        f"dataset {contents.dataset_sha256[:12]}, which shares {shared} records with this site's,"
    reasons = []
    for level, events in plans.items():
        budget = contents.budgets.get(level, proposed[level]) if contents else proposed[level]
        if math.isinf(budget.epsilon):
            continue
        spent = contents.accountant(level, proposed=budget).events if contents else []
        planned = [GaussianEvent(e.noise_multiplier, e.sample_rate, e.steps * rounds) for e in events]
        ledger = PrivacyAccountant(level=level, client=None, accountant=budget.accountant, delta=budget.delta,
                                   budget_epsilon=budget.epsilon, per_round=(), rdp_orders=_rdp_orders(budget))
        before, after = ledger.epsilon(extra=spent), ledger.epsilon(extra=[*spent, *planned])
        if after > budget.epsilon:
            reasons.append(f"the {level}-level budget of {whose} is ε = {budget.epsilon:g} "
                           f"({budget.accountant}, δ = {budget.delta:g}); it has spent {before:.3f} and this run's "
                           f"{rounds} planned rounds would raise it to {after:.3f}")
    return "; ".join(reasons) or None
