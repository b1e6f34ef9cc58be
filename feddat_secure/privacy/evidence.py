"""The privacy report's ledgers checked against the run's other evidence before a single ε is believed.

A party's ``privacy_ledger.json`` is a plain file: deleting rounds or raising σ in it lowers every ε computed
from it. Three independent records say what it held when the run spent its budget:

1. ``manifest.json``: the SHA-256 of every file of the finished run (``runner.write_manifest``), ledgers included;
2. the party's audit log: a signed ``privacy_spent`` entry (level, cumulative ε, δ, round) for every charge the
   party made (``site_app``, ``server_app``), hash-chained and covered by signed tree heads, verified against the
   run's roster (``audits.verify_path``, what ``feddat-secure audit verify`` runs);
3. for a site with a persistent dataset ledger, the summary of it the site wrote into its run ledger
   (``dataset_ledger``): it must equal the figures the site signed last into its audit log (``run_started`` and
   every ``privacy_spent`` carry the dataset ledger's size, head, cumulative ε before and with this run, budget
   and δ), and the dataset's cumulative ε cannot be below what this run spent.

:func:`check_ledgers` recomputes every ledger's ε after each charge and compares it with the signed entries; any
difference is a :class:`Mismatch` naming the party, the file, and what was expected against what was found.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .accounting import AccountingError, PrivacyAccountant
from .dataset_ledger import DatasetLedgerError, read_ledger
from .run_privacy import LEDGER_FILE

ROSTER_FILE = "roster.json"
RELATIVE_TOLERANCE = 1e-9  # the signed ε and the recomputed one are the same float; this only absorbs formatting


@dataclass(frozen=True)
class Mismatch:
    """One difference between a ledger file and the evidence (expected: what the evidence says)."""

    party: str
    file: str
    what: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.party}: {self.file}: {self.what}: expected {self.expected}, found {self.found}"


@dataclass
class EvidenceCheck:
    """What was checked, what could not be, and what did not match."""

    ledger_sha256: dict[str, str] = field(default_factory=dict)  # ledger file (relative to the run) -> SHA-256
    roster_sha256: str | None = None
    checks: list[str] = field(default_factory=list)  # what ran and passed or failed
    unchecked: list[str] = field(default_factory=list)  # what could not run, and why
    mismatches: list[Mismatch] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ledger_sha256": self.ledger_sha256, "roster_sha256": self.roster_sha256, "checks": self.checks,
                "unchecked": self.unchecked, "mismatches": [str(m) for m in self.mismatches]}


SIGNED_UNCHECKED = ("no party kept an audit log (audit.enabled = false): no ledger could be checked against signed "
                    "privacy_spent entries, so every ε below rests on unsigned files")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_ledgers(run_dir: Path, ledger_files: Sequence[str], *, manifest: Mapping[str, Any] | None,
                  audit_enabled: bool, allow_unsigned: bool = False) -> EvidenceCheck:
    """Check every party's ledger file (paths relative to ``run_dir``, ``parties/<party>/privacy_ledger.json``)
    against the manifest's digests, the parties' signed audit logs and the dataset-ledger summaries.

    Whether the audit logs are checked is never taken from the run's own (unsigned) configuration: whenever a
    party's log is in the folder, or the configuration says auditing was on, every log is verified and every
    ledger compared with its signed entries. A run folder with no audit log at all has nothing signed to check
    its ledgers against: that is a mismatch unless ``allow_unsigned`` (the report then says, in its headline,
    that its ε figures are unchecked)."""
    result = EvidenceCheck(ledger_sha256={name: sha256_file(run_dir / name) for name in ledger_files})
    roster_path = run_dir / ROSTER_FILE
    result.roster_sha256 = sha256_file(roster_path) if roster_path.is_file() else None
    contents = {name: json.loads((run_dir / name).read_text()) for name in ledger_files}
    _against_manifest(result, manifest)
    logs = None
    if audit_enabled or any((run_dir / "parties").glob("*/*.audit.jsonl")):
        logs = _against_audit_logs(result, run_dir, contents, finished=manifest is not None)
    elif allow_unsigned:
        result.unchecked.append(SIGNED_UNCHECKED)
    else:
        result.mismatches.append(Mismatch("run", "parties/", "signed evidence for the ledgers",
                                          "every party's signed audit log",
                                          "no audit log in the run folder (the run's configuration says "
                                          "audit.enabled = false; pass --allow-unsigned to report the ledgers "
                                          "unchecked)"))
    _against_dataset_ledgers(result, contents, logs)
    return result


def party_of(ledger_file: str) -> str:
    """``parties/<party>/privacy_ledger.json`` -> ``<party>``."""
    return Path(ledger_file).parent.name


def _against_manifest(result: EvidenceCheck, manifest: Mapping[str, Any] | None) -> None:
    if manifest is None:
        result.unchecked.append("manifest.json is not written yet (the run did not finish): the ledger files' "
                                "digests could not be compared with the run's record of them")
        return
    recorded = manifest.get("files", {})
    listed = {name for name in recorded if Path(name).match(f"parties/*/{LEDGER_FILE}")}
    for name in sorted(listed | set(result.ledger_sha256)):
        expected, found = recorded.get(name), result.ledger_sha256.get(name)
        if expected != found:
            result.mismatches.append(Mismatch(party_of(name), name, "SHA-256 against manifest.json",
                                              expected or "no such file in the manifest", found or "no such file"))
    if result.roster_sha256 is not None and recorded.get(ROSTER_FILE) not in (None, result.roster_sha256):
        result.mismatches.append(Mismatch("run", ROSTER_FILE, "SHA-256 against manifest.json", recorded[ROSTER_FILE],
                                          result.roster_sha256))
    result.checks.append("every ledger file's SHA-256 against manifest.json (written when the run finished)")


def _against_audit_logs(result: EvidenceCheck, run_dir: Path, contents: Mapping[str, Mapping[str, Any]], *,
                        finished: bool) -> dict[str, Any] | None:
    """Returns each party's verified audit log (None when the logs could not be read at all)."""
    from audits import verify_path
    from protocols.identity import load_roster

    roster_path = run_dir / ROSTER_FILE
    if not roster_path.is_file():
        result.mismatches.append(Mismatch("run", ROSTER_FILE, "the roster to verify the audit logs with",
                                          "the run's roster.json", "no such file"))
        return None
    roster = {entry.party_id: entry.public_key for entry in load_roster(roster_path).entries}
    parties_dir = run_dir / "parties"
    try:
        verification = verify_path(parties_dir, roster, require_closed=finished)
    except Exception as error:  # AuditError: a folder without any log although auditing was on
        result.mismatches.append(Mismatch("run", "parties/", "the parties' audit logs", "one signed log per party",
                                          str(error)))
        return None
    for problem in verification.problems:
        path = problem.path.relative_to(run_dir).as_posix() if problem.path.is_relative_to(run_dir) \
            else str(problem.path)
        result.mismatches.append(Mismatch(problem.path.parent.name, path, "audit log verification", "intact",
                                          str(problem).removeprefix(str(problem.path) + ": ")))
    logs = {log.party: log for log in verification.logs if log.party is not None}
    spent: dict[tuple[str, str], list[Any]] = {}
    for party, log in logs.items():
        for entry in log.entries:
            if entry.event == "privacy_spent":
                spent.setdefault((party, str(entry.meta.get("level"))), []).append(entry)
    checked: set[tuple[str, str]] = set()
    for name, content in contents.items():
        party = party_of(name)
        if party not in logs:
            result.mismatches.append(Mismatch(party, name, "the party's signed audit log",
                                              f"parties/{party}/{party}.audit.jsonl", "no such log"))
            continue
        for state in content.get("ledgers", []):
            level = state["level"]
            checked.add((party, level))
            _compare(result, party, name, PrivacyAccountant.from_state_dict(state), spent.get((party, level), []))
    for (party, level), entries in sorted(spent.items()):
        if (party, level) not in checked:
            result.mismatches.append(Mismatch(party, f"parties/{party}/{LEDGER_FILE}",
                                              f"{level}-level ledger", f"{len(entries)} charges (signed audit log)",
                                              "no such ledger"))
    result.checks.append("every audit log verified against the roster (hash chain, signatures, tree heads"
                         + (", closed" if finished else "") + ")")
    result.checks.append("every ledger's ε after each charge against its party's signed privacy_spent entries")
    return logs


def _compare(result: EvidenceCheck, party: str, name: str, accountant: PrivacyAccountant,
             entries: Sequence[Any]) -> None:
    level = f"{accountant.level}-level ledger"
    charges = [round_index for round_index, _ in accountant.rounds]
    if len(charges) != len(entries):
        result.mismatches.append(Mismatch(party, name, f"{level}: number of charges",
                                          f"{len(entries)} (signed audit log)", str(len(charges))))
        return
    try:
        history = accountant.epsilon_history()
    except AccountingError as error:
        result.mismatches.append(Mismatch(party, name, f"{level}: ε", "a computable ε", str(error)))
        return
    for (round_index, epsilon), entry in zip(history, entries, strict=True):
        signed_round, signed_epsilon = entry.round, entry.meta.get("epsilon")
        signed_delta = entry.meta.get("delta")
        where = f"{level}: charge for round {signed_round}"  # the audit log numbers rounds from 1
        if signed_round != round_index + 1:
            result.mismatches.append(Mismatch(party, name, f"{level}: round of a charge",
                                              f"round {signed_round} (signed audit log)", f"round {round_index + 1}"))
        elif not _same(signed_delta, accountant.delta):
            result.mismatches.append(Mismatch(party, name, f"{where}: δ", f"{signed_delta} (signed audit log)",
                                              f"{accountant.delta}"))
        elif not _same(signed_epsilon, epsilon):
            result.mismatches.append(Mismatch(party, name, f"{where}: ε after the charge",
                                              f"{signed_epsilon} (signed audit log)", f"{epsilon} (recomputed)"))


def _same(signed: Any, value: float) -> bool:
    if not isinstance(signed, int | float) or isinstance(signed, bool):
        return False
    if math.isinf(value) or math.isinf(signed):
        return signed == value
    return math.isclose(signed, value, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-12)


# the summary's fields and the audit meta key the site signs each under (SitePrivacy.dataset_anchor)
ANCHOR_FIELDS = {"dataset_sha256": "dataset_sha256", "level": "dataset_level", "delta": "dataset_delta",
                 "entries": "dataset_ledger_entries", "head_sha256": "dataset_ledger_head",
                 "budget_epsilon": "dataset_budget_epsilon", "epsilon_before_run": "dataset_epsilon_before_run",
                 "epsilon": "dataset_epsilon"}


def _against_dataset_ledgers(result: EvidenceCheck, contents: Mapping[str, Mapping[str, Any]],
                             logs: Mapping[str, Any] | None) -> None:
    """A site's dataset ledger holds this run's charges and every earlier run's. Its summary in the run ledger
    must equal the figures the site last signed into its audit log (a summary edited where the dataset ledger
    is not readable, the reviewer's usual case, shows there), and show a cumulative ε of at least this run's ε
    at the ledger's level (composition never costs less); and where the dataset ledger itself is readable here
    (the data owner's machine), it must verify under its key, still hold the entries the summary saw (same head
    at that size: nothing cut or rewritten since), and hold one run whose charges are exactly the run ledger's
    (nothing the run spent is missing from the dataset's budget)."""
    summaries = opened = 0
    for name, content in contents.items():
        summary = content.get("dataset_ledger")
        if not summary:
            continue
        summaries += 1
        party = party_of(name)
        if logs is not None:
            _against_anchor(result, party, name, summary, logs.get(party))
        level = summary.get("level")
        ledgers = [PrivacyAccountant.from_state_dict(s) for s in content.get("ledgers", []) if s["level"] == level]
        run_epsilon = max((a.epsilon() for a in ledgers), default=0.0)
        epsilon = summary.get("epsilon")
        if not isinstance(epsilon, int | float) or isinstance(epsilon, bool) or epsilon < run_epsilon * (1 - 1e-6):
            result.mismatches.append(Mismatch(party, name, "dataset ledger: cumulative ε",
                                              f"at least this run's {level}-level ε {run_epsilon}", str(epsilon)))
        path = Path(str(summary.get("path", "")))
        if not path.is_file():
            continue
        opened += 1
        try:
            ledger = read_ledger(path)
        except DatasetLedgerError as error:
            result.mismatches.append(Mismatch(party, name, "dataset ledger", "a ledger that verifies", str(error)))
            continue
        entries, head = summary.get("entries"), summary.get("head_sha256")
        if not isinstance(entries, int) or ledger.entries < entries or (ledger.entries == entries
                                                                        and ledger.head_sha256 != head):
            result.mismatches.append(Mismatch(party, name, f"dataset ledger {path.name}: entries and head",
                                              f"{entries} entries with head {head} (or more entries)",
                                              f"{ledger.entries} entries with head {ledger.head_sha256}"))
        for accountant in (PrivacyAccountant.from_state_dict(s) for s in content.get("ledgers", [])):
            if not accountant.rounds or accountant.level not in ledger.budgets:
                continue
            # this site's own charges: another site of the run whose data shares records charges this ledger too
            runs = [ledger.run_charges(run, accountant.level, summary.get("dataset_sha256")) for run in ledger.runs()]
            if accountant.rounds not in runs:
                result.mismatches.append(Mismatch(party, name, f"dataset ledger {path.name}: this run's "
                                                  f"{accountant.level}-level charges",
                                                  f"one run charged rounds {accountant.spent_rounds}",
                                                  f"runs charged {[[r for r, _ in run] for run in runs]}"))
    if summaries:
        result.checks.append("each site's dataset-ledger cumulative ε against its run ledger (at least the run's ε)")
        if logs is not None:
            result.checks.append("each site's dataset-ledger summary (entries, head, ε before and with this run, "
                                 "budget, δ) against the figures it signed last in its audit log")
        else:
            result.unchecked.append("the sites' dataset-ledger summaries could not be compared with the figures "
                                    "they sign into their audit logs (no audit logs)")
    if opened:
        result.checks.append("each readable dataset ledger: signatures and chain, the entries the run saw, and "
                             "this run's charges in it")
    elif summaries:
        result.unchecked.append("the sites' dataset ledgers are not readable here (they stay with each data "
                                "owner): their signatures and this run's charges in them were not checked "
                                "(feddat-secure privacy ledger show PATH on the owner's machine)")
    if not summaries:
        result.unchecked.append("no site recorded a persistent dataset ledger: ε across runs on the same data is "
                                "not shown")


def _against_anchor(result: EvidenceCheck, party: str, name: str, summary: Mapping[str, Any], log: Any) -> None:
    """The summary against the last dataset-ledger figures ``party`` signed (``run_started`` or ``privacy_spent``
    meta): every field must be the signed one (ε and δ as floats, to formatting)."""
    anchors = [entry for entry in (log.entries if log is not None else [])
               if entry.event in ("run_started", "privacy_spent") and "dataset_ledger_entries" in entry.meta]
    if not anchors:
        result.mismatches.append(Mismatch(party, name, "dataset ledger summary",
                                          "the dataset-ledger figures the site signed in its audit log",
                                          "no signed figures"))
        return
    signed = anchors[-1].meta
    for key, meta_key in ANCHOR_FIELDS.items():
        expected, found = signed.get(meta_key), summary.get(key)
        numeric = isinstance(expected, float) and isinstance(found, int | float) and not isinstance(found, bool)
        if not (_same(found, expected) if numeric else (found == expected and type(found) is type(expected))):
            result.mismatches.append(Mismatch(party, name, f"dataset ledger summary: {key}",
                                              f"{expected} (signed audit log, seq {anchors[-1].seq})", str(found)))
