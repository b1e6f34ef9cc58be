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
  trains (write-ahead), with the run (its first session id) and the round.

Dropping whole entries from the end leaves a valid shorter log: that is found against the anchors a run
keeps (each site's signed audit log records the ledger's size and head after every charge, and
``privacy_ledger.json`` the same at the run's end), and a resumed run refuses a ledger that lost its charges.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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

from audits import AuditError, AuditLog, check_log, key_id

from ..errors import FeddatError
from .accounting import ACCOUNTANTS, AccountingError, GaussianEvent, PrivacyAccountant, compute_epsilon
from .budget import BudgetExceeded
from .client_level import SKELLAM_RDP_ORDERS

LEDGER_DIR_ENV = "FEDDAT_SECURE_LEDGER_DIR"
LEDGER_SUFFIX = ".privacy-ledger.jsonl"
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
    configured = os.environ.get(LEDGER_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "feddat-secure" / "privacy-ledgers"


def resolve_ledger_dir(configured: str | Path | None) -> Path:
    """The ledger folder: ``configured`` when given (config key or ``--dataset-ledger-dir``), else the default."""
    return Path(configured).expanduser() if configured else default_ledger_dir()


def dataset_digest(split: Any) -> str:
    """SHA-256 of a site's training records as encoded (every tensor of an ``EncodedSplit``, record by record).

    The same records give the same digest whatever their order (the per-record digests are sorted before
    hashing), so shuffling the data does not open a fresh budget; any changed, added or removed record gives
    another. Records are hashed as encoded, so a change of encoding (image size, tokenizer, max length) makes
    another dataset."""
    fields = (split.pixel_values, split.input_ids, split.attention_mask, split.labels)
    records = []
    for index in range(len(split)):
        digest = hashlib.sha256()
        for tensor in fields:
            value = tensor[index].contiguous()
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.numpy().tobytes())
        records.append(digest.digest())
    total = hashlib.sha256(b"feddat-secure dataset v1\x00")
    for record in sorted(records):
        total.update(record)
    return total.hexdigest()


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
    """One ``privacy_charged`` entry: what one attempt at one round of one run spent at one level."""

    seq: int
    time: str
    run: str
    round: int
    level: str
    events: tuple[GaussianEvent, ...]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "run": self.run, "round": self.round, "level": self.level,
                "events": [e.to_json() for e in self.events]}


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

    def run_charges(self, run: str, level: str) -> list[tuple[int, tuple[GaussianEvent, ...]]]:
        return [(c.round, c.events) for c in self.charges if c.run == run and c.level == level]

    def runs(self) -> list[str]:
        return list(dict.fromkeys(c.run for c in self.charges))

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
                                   "epsilon": compute_epsilon(events, budget.delta, "rdp")}
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
                charges.append(Charge(entry.seq, entry.time, str(meta["run"]), int(entry.round), meta["level"],
                                      tuple(_event_of(text) for text in meta["events"])))
            elif entry.event not in ("log_opened", "tree_head", "log_recovered"):
                raise ValueError(f"event {entry.event!r} does not belong in a dataset ledger")
        except (KeyError, ValueError, TypeError) as error:
            raise DatasetLedgerError(f"{where}: not a valid dataset ledger entry ({error})") from None
    return LedgerContents(path, dataset, ledger_key_id, budgets, tuple(charges), len(entries), entries[-1].hash)


class DatasetLedger:
    """The ledger of one dataset in a ledger folder. Each use opens, verifies and releases the file under an
    exclusive lock, so runs in other processes (or other sites with the same data) charge it in turn."""

    def __init__(self, folder: Path | str, dataset_sha256: str) -> None:
        self.folder = Path(folder)
        self.dataset_sha256 = dataset_sha256
        self.path = self.folder / f"{dataset_sha256}{LEDGER_SUFFIX}"

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
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> LedgerContents | None:
        """The verified contents, or None while nothing was ever charged to this dataset."""
        with self._locked():
            if not self.path.exists():
                return None
            return read_ledger(self.path, self.key().public_key())

    def charge(self, run: str, round_index: int, charges: Mapping[str, Sequence[GaussianEvent]],
               proposed: Mapping[str, LevelBudget]) -> LedgerContents:
        """Append one ``privacy_charged`` entry per level (fsynced before this returns), after the level's
        ``privacy_budget`` entry when the level is new (``proposed``). Under the lock, the ledger is verified
        first (a torn last line is set aside and recorded, as :meth:`AuditLog.open` does) and the budget
        checked again; :class:`BudgetExceeded` when a level would pass it (nothing is written then)."""
        with self._locked():
            key = self.key()
            try:
                log = (AuditLog.open(self.path, OWNER, key) if self.path.exists()
                       else AuditLog.create(self.path, OWNER, key, run_id=self.dataset_sha256))
            except AuditError as error:
                raise DatasetLedgerError(f"dataset ledger {self.path}: {error}") from None
            try:
                contents = read_ledger(self.path, key.public_key())
                reasons = [reason for level, events in charges.items()
                           if (reason := contents.accountant(level, proposed=proposed[level])
                               .would_exceed(events, round_index)) is not None]
                if reasons:
                    raise BudgetExceeded(round_index, reasons)
                for level, events in charges.items():
                    if level not in contents.budgets:
                        log.record(BUDGET_EVENT, meta=proposed[level].meta(self.dataset_sha256))
                    log.record(CHARGE_EVENT, round=round_index,
                               meta={"level": level, "run": run, "events": [_event_text(e) for e in events]})
            finally:
                log.release()
            return read_ledger(self.path, key.public_key())


def _rdp_orders(budget: LevelBudget) -> tuple[int, ...] | None:
    """The RDP orders a level's ε is computed at. The client level may hold distributed (Skellam) rounds, whose
    RDP bound holds at integer orders only (Agarwal et al. 2021, Thm 3.5; client_level.SKELLAM_RDP_ORDERS), and
    an event does not say which mechanism it bounds: under RDP the client level is computed at those orders, which
    for a Gaussian round only makes ε larger (fewer orders to minimize the conversion over)."""
    return SKELLAM_RDP_ORDERS if budget.level == "client" and budget.accountant == "rdp" else None


def projected_refusal(contents: LedgerContents | None, plans: Mapping[str, Sequence[GaussianEvent]],
                      proposed: Mapping[str, LevelBudget], rounds: int) -> str | None:
    """Why a fresh run of ``rounds`` rounds, each spending ``plans`` (per level), would overdraw the dataset's
    budget (every run's charges so far plus the whole plan), or None when it fits."""
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
            reasons.append(f"the {level}-level budget of this site's dataset is ε = {budget.epsilon:g} "
                           f"({budget.accountant}, δ = {budget.delta:g}); it has spent {before:.3f} and this run's "
                           f"{rounds} planned rounds would raise it to {after:.3f}")
    return "; ".join(reasons) or None
