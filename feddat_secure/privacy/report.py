"""The privacy budget report of a run: ``privacy_report.{html,md,json}`` in the run folder.

Reads what the run left behind — every party's ``parties/<party>/privacy_ledger.json``
(:func:`~feddat_secure.privacy.run_privacy.load_run_ledgers`), ``manifest.json`` (digests of config,
base model, data and every file) or, for an unfinished run, ``config.toml``, and the parties' signed audit
logs. Before any ε is shown, every ledger file is checked against that evidence
(:mod:`~feddat_secure.privacy.evidence`); a ledger that does not match is refused (:class:`EvidenceMismatch`).
Every ε is then recomputed from the recorded events under every accountant that applies, with group and
replace-one ε from dp_accounting (:mod:`~feddat_secure.privacy.protection`). The JSON shape is documented in
docs/privacy.md; the HTML is one self-contained file (the plot is an embedded PNG).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from audits import receipt_path, resolve_receipt_dir

from ..errors import FeddatError
from .accounting import AccountingError, GaussianEvent, PrivacyAccountant, compute_epsilon
from .evidence import SIGNED_UNCHECKED, EvidenceCheck, check_ledgers, party_of
from .protection import GROUP_SIZES, group_epsilon, replace_one_epsilon
from .run_privacy import load_run_ledgers

REPORT_FORMAT = "feddat-secure-privacy-report/2"
# the software whose versions a reviewer needs (distribution names; absent ones are reported as not installed)
SOFTWARE = ("feddat-secure", "torch", "opacus", "dp-accounting", "transformers", "peft", "tenseal", "cryptography",
            "flwr")
HTML_FILE, MARKDOWN_FILE, JSON_FILE = "privacy_report.html", "privacy_report.md", "privacy_report.json"


class ReportError(FeddatError, ValueError):
    """The folder is not a run folder this report can describe."""


class EvidenceMismatch(ReportError):
    """A ledger file does not match the run's signed evidence: no ε from it may be reported."""

    def __init__(self, check: EvidenceCheck) -> None:
        self.check = check
        super().__init__("the privacy ledgers do not match the run's evidence; no report was written:\n"
                         + "\n".join(f"  {m}" for m in check.mismatches))


# ---------------------------------------------------------------- gathering

def build_report(run_dir: Path, *, allow_unsigned: bool = False) -> dict[str, Any]:
    """The report as plain data (what privacy_report.json holds); :class:`EvidenceMismatch` when a ledger file
    does not match the run's evidence, or when the run kept no signed audit log to check it against (unless
    ``allow_unsigned``: the headline then says that its ε figures are unchecked)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{str(run_dir)!r} is not a folder")
    run, resolved = _run_identity(run_dir)
    ledger = load_run_ledgers(run_dir)
    files = ledger["files"] if ledger else []
    manifest = json.loads((run_dir / "manifest.json").read_text()) if run["finished"] else None
    privacy = resolved.get("privacy", {})
    configured = privacy.get("record", {}).get("enabled") or privacy.get("client", {}).get("placement", "off") != "off"
    evidence = check_ledgers(run_dir, files, manifest=manifest, allow_unsigned=allow_unsigned,
                             audit_enabled=bool(resolved.get("audit", {}).get("enabled", True))) \
        if files or configured else EvidenceCheck(unchecked=["no differential privacy was configured: no ledger"])
    if evidence.mismatches:
        raise EvidenceMismatch(evidence)
    run["ledger_files"] = [{"file": name, "party": party_of(name), "sha256": evidence.ledger_sha256[name]}
                           for name in files]
    run["roster_sha256"] = _roster_digest(run_dir) if evidence.roster_sha256 is not None else None
    run["privacy_ledger"] = ledger is not None
    contents = {name: json.loads((run_dir / name).read_text()) for name in files}
    accountants = [PrivacyAccountant.from_state_dict(s) for s in ledger["ledgers"]] if ledger else []
    levels = ledger["levels"] if ledger else {"record": {}, "client": None}
    entries = [entry for a in accountants for entry in _ledger_entries(a)]
    return {
        "format": REPORT_FORMAT,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "software": _software(),
        "run": run,
        "evidence": evidence.to_json(),
        "levels": {"record": {"enabled": bool(levels["record"]), "sites": levels["record"]},
                   "client": {"enabled": levels["client"] is not None, "settings": levels["client"]}},
        "summary": _summary(entries),
        "ledgers": entries,
        "other_neighbours": [_other_neighbours(a) for a in accountants if a.rdp_orders is None],
        "dataset_ledgers": [{"party": party_of(name), **content["dataset_ledger"]}
                            for name, content in contents.items() if content.get("dataset_ledger")],
        "unprotected_releases": [{"party": party_of(name), "releases": list(content["unprotected_releases"])}
                                 for name, content in contents.items() if content.get("unprotected_releases")],
        "adaptive_clipping": ledger.get("adaptive_clipping") if ledger else None,
        "assumptions": _assumptions(levels, resolved),
    }


def _software() -> dict[str, str | None]:
    """Installed versions (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _other_neighbours(accountant: PrivacyAccountant) -> dict[str, Any]:
    """ε of one ledger for groups of records and for the replace-one relation (PLD; protection.py)."""
    events = accountant.events
    groups = {str(k): _finite(group_epsilon(events, accountant.delta, k)) for k in GROUP_SIZES} \
        if accountant.level == "record" else {}
    return {"level": accountant.level, "client": accountant.client, "delta": accountant.delta, "accountant": "pld",
            "replace_one_epsilon": _finite(replace_one_epsilon(events, accountant.delta)), "group_epsilon": groups}


def _ledger_entries(accountant: PrivacyAccountant) -> list[dict[str, Any]]:
    events = [{"round": r + 1, **e.to_json()} for r, round_events in accountant.rounds for e in round_events]
    entries = []
    for name in accountant.applicable_accountants:
        entry: dict[str, Any] = {
            "level": accountant.level, "client": accountant.client, "accountant": name,
            "delta": accountant.delta, "epsilon": None, "budget_epsilon": accountant.budget_epsilon or None,
            "remaining_epsilon": None, "governs_budget": name == accountant.accountant,
            "rounds_spent": len(accountant.rounds), "steps": sum(e.steps for e in accountant.events),
            "events": events, "epsilon_per_round": [],
        }
        if accountant.rdp_orders is not None:
            entry["rdp_orders"] = list(accountant.rdp_orders)
            entry["note"] = ("Skellam noise, bounded in RDP by the listed Gaussian events at these integer orders; "
                             "recompute with an RDP accountant at these orders only")
        try:
            entry["epsilon_per_round"] = [{"round": r + 1, "epsilon": _finite(eps)}
                                          for r, eps in accountant.epsilon_history(name)]
            entry["epsilon"] = _finite(accountant.epsilon(name))
        except AccountingError as error:
            entry["note"] = str(error)
        if entry["epsilon"] is not None and accountant.budget_epsilon > 0:
            entry["remaining_epsilon"] = max(0.0, accountant.budget_epsilon - entry["epsilon"])
        if accountant.level == "client" and accountant.client is None and accountant.rdp_orders is None \
                and any(e.sample_rate < 1 for e in accountant.events):
            known = [GaussianEvent(e.noise_multiplier, 1.0, e.steps) for e in accountant.events]
            try:
                entry["epsilon_if_participation_known"] = _finite(compute_epsilon(known, accountant.delta, name))
            except AccountingError:
                entry["epsilon_if_participation_known"] = None
        entries.append(entry)
    return entries


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no infinity; null means "no bound"


def _summary(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for level in ("record", "client"):
        mine = [e for e in entries if e["level"] == level]
        if not mine:
            summary[level] = None
            continue
        per_accountant = {}
        for name in sorted({e["accountant"] for e in mine}):
            values = [e for e in mine if e["accountant"] == name]
            worst = max(values, key=lambda e: -1 if e["epsilon"] is None else e["epsilon"])
            per_accountant[name] = {"epsilon": worst["epsilon"], "client": worst["client"]}
            if "epsilon_if_participation_known" in worst:
                per_accountant[name]["epsilon_if_participation_known"] = worst["epsilon_if_participation_known"]
        governing = [e for e in mine if e["governs_budget"]]
        summary[level] = {"delta": mine[0]["delta"], "epsilon": per_accountant,
                          "budget_epsilon": governing[0]["budget_epsilon"],
                          "budget_accountant": governing[0]["accountant"],
                          "rounds_spent": max(e["rounds_spent"] for e in mine)}
    return summary


def _roster_digest(run_dir: Path) -> str:
    """The run roster's own digest (``Roster.digest``, what ``roster build`` prints, every party pins and the
    manifest records), not the file's SHA-256: the one value a reviewer compares everywhere (issue 13)."""
    from protocols.identity import ROSTER_FILE, load_roster

    return load_roster(run_dir / ROSTER_FILE).digest


def _run_identity(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's identity for the report, its resolved configuration as plain data)."""
    identity: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "name": run_dir.name, "finished": False,
                                "config_sha256": None, "base_model_sha256": None, "data_sha256": None,
                                "global_adapter_sha256": None}
    manifest_path = run_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        identity["finished"] = True
        identity["config_sha256"] = manifest.get("config", {}).get("sha256")
        identity["base_model_sha256"] = manifest.get("base_model", {}).get("sha256")
        identity["data_sha256"] = manifest.get("data", {}).get("sha256")
        identity["global_adapter_sha256"] = manifest.get("files", {}).get(
            "global_adapter/adapter_model.safetensors")
        resolved = manifest.get("config", {}).get("resolved", {})
    elif (run_dir / "config.toml").is_file():
        from ..config import load_config, to_dict

        config = load_config(run_dir / "config.toml")
        identity["config_sha256"] = config.digest()
        resolved = to_dict(config)
    else:
        raise ReportError(f"{str(run_dir)!r} holds neither manifest.json nor config.toml: not a run folder")
    identity["name"] = resolved.get("name", identity["name"])
    identity["algorithm"] = resolved.get("federation", {}).get("algorithm")
    identity["audit_tree_heads"] = _audit_tree_heads(run_dir / "parties")
    identity["audit_receipt"] = _audit_receipt(run_dir / "parties", identity["name"],
                                               resolved.get("audit", {}).get("receipt_dir"))
    identity["started"], identity["ended"] = _run_times(run_dir / "parties")
    return identity, resolved


def _run_times(folder: Path) -> tuple[str | None, str | None]:
    """(first, last) entry time over the parties' audit logs (UTC, as signed); (None, None) without logs."""
    times = []
    for path in _audit_logs(folder):
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        for line in (lines[:1] + lines[-1:]):
            try:
                times.append(json.loads(line)["time"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return (min(times), max(times)) if times else (None, None)


def _audit_logs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.audit.jsonl")) if folder.is_dir() else []


def _entries(path: Path) -> Iterator[dict[str, Any]]:
    """The entries of an audit log as written (unreadable lines skipped: verifying is ``audit verify``'s job)."""
    with open(path, encoding="utf-8", errors="replace") as stream:
        for line in stream:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                yield entry


def _audit_tree_heads(folder: Path) -> list[dict[str, Any]]:
    """The last signed tree head of every audit log (docs/audit.md), as written; not verified here
    (``feddat-secure audit verify`` does that)."""
    heads = []
    for path in _audit_logs(folder):
        last = None
        for entry in _entries(path):
            if entry.get("event") == "tree_head" and isinstance(entry.get("sth"), dict):
                last = entry
        if last is not None:
            sth = last["sth"]
            heads.append({"log": path.relative_to(folder.parent).as_posix(), "party": sth.get("party"),
                          "tree_size": sth.get("tree_size"), "root": sth.get("root"), "time": sth.get("time"),
                          "signature": sth.get("sig"), "final": bool((last.get("meta") or {}).get("final"))})
    return heads


def _audit_receipt(folder: Path, name: str, receipt_dir: str | None) -> dict[str, str] | None:
    """The run's audit receipt (docs/audit.md "The audit receipt"), found in the receipts folder by the run's
    name and the session its logs last started: its path and the SHA-256 of its bytes, which a reviewer compares
    with their own copy. Not checked here (``feddat-secure audit verify RUN --receipt FILE`` does that); None
    when there is none."""
    sessions = [entry["meta"]["session"] for path in _audit_logs(folder) for entry in _entries(path)
                if entry.get("event") == "run_started" and isinstance((entry.get("meta") or {}).get("session"), str)]
    for session in reversed(sessions):
        path = receipt_path(resolve_receipt_dir(receipt_dir), name, session)
        if path.is_file():
            return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return None


def _assumptions(levels: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """What is protected and what is not, in plain sentences a reviewer can sign off on (issue 12, item 9)."""
    record, client = levels["record"], levels["client"]
    notes = []
    if not record and not client:
        return ["No differential privacy was configured for this run: nothing below bounds what its outputs "
                "reveal about the training data (ε = ∞)."]
    if record:
        settings = next(iter(record.values()))
        notes += [
            "Protected unit (record level): one training record, i.e. one (image, question, answer) triple of a "
            "site. Whether it was used cannot be told, up to ε and δ, from anything the site's training produced: "
            "the shared adapter sent to the server every round, hence every global model, and also the site's own "
            "client adapter and answer head.",
            "A person or an image with several records is protected only as a group: the group ε for 2, 5 and 10 "
            "records (section 'Other neighbours') is far larger than the single-record ε. It is exact for the "
            "Poisson-subsampled Gaussian (a mixture of Gaussians: j ~ Binomial(k, q) of the group's k records are "
            "in a batch; Ganesh 2024, arXiv:2401.10294), computed with dp_accounting's PLD accountant.",
            "Neighbouring datasets differ by adding or removing one record. Each site's dataset size is released "
            "exactly (it sets the sampling rate and is the aggregation weight the server sees), so the ε for one "
            "record replaced by another is given too ('replace-one'; dp_accounting's PLD accountant, dominating "
            "pair of Zhu, Dong, Wang 2022).",
            "Every parameter trained on a site's data is trained by DP-SGD: batches are drawn by Poisson sampling, "
            "each record's gradient is clipped to the clipping norm, and Gaussian noise is added. ViLT's backbone, "
            "embeddings included, stays frozen.",
            "Composition across sites: sites hold disjoint records, so a record is protected by its own site's "
            "ledger; the federation's record-level ε is the largest site ε. A person with records at several sites "
            "is protected by the composition of those sites' ledgers (ε adds up at worst).",
            "Composition across runs: each run on the same data spends again. A site's persistent dataset ledger "
            "(table 'Across runs', when present) holds the dataset's cumulative ε over every run; without it, this "
            "report covers this run only.",
            "Evaluation accuracies are computed on held-out test records: test records are not protected.",
        ]
        if settings.get("mechanisms_per_batch", 1) > 1:
            notes.append("FedDAT takes two DP-SGD steps on every batch (the shared adapter with the head, then the "
                         "client adapter, each with its own noise). Two Gaussian steps on the same sample, of noise "
                         "multipliers σ_1 and σ_2, amount to one Gaussian mechanism with noise multiplier "
                         "(σ_1⁻² + σ_2⁻²)^-½ (σ/√2 when both are σ), which is what is accounted.")
    if client:
        placement = client["placement"]
        notes += [
            "Protected unit (client level): a whole site, i.e. whether its data took part at all (all its records "
            "at once). Neighbouring runs differ in one site's whole contribution being replaced by nothing: its "
            "clipped update (and, under adaptive clipping, its clip-count bit) is absent from the sum. The number of "
            "sites is public; the replace-one ε (one site's data replaced by another's) is given too.",
            "Participation is visible to the server: it knows which sites were asked and which answered.",
        ]
        if client.get("adaptive_clipping"):
            notes.append("Adaptive clipping: a site contributes b − ½ to the clip count (b = 1 when its update norm "
                         "was at most the clip norm), so removing the site changes the count by at most ½; the "
                         "count's noise is part of the round's one accounted Gaussian event (Andrew et al. 2021).")
        if placement == "central":
            notes.append("Central noise: the server adds the noise. The guarantee holds against everyone who sees "
                         "the global models, not against the server, which sees the sum before noise (and each "
                         "update, without secure aggregation).")
            if client["sample_rate"] < 1:
                notes.append("The amplified ε counts the amplification of sampling sites by Poisson sampling; it "
                             "holds only while who took part stays hidden from those who see the models. The "
                             "server, and every site of a round's secure-aggregation cohort, know the participants: "
                             "against them the 'participation known' ε in the headline applies.")
        elif placement == "local":
            notes.append("Local noise: every site adds the full noise to its own update, so the guarantee holds "
                         "against the server too, for each site separately and without any sampling amplification.")
        else:
            notes.append("Distributed noise: every site adds a share of Skellam noise to its quantized update inside "
                         "masked secure aggregation. The server only learns the sum, which carries the noise of every "
                         "share that reached it. Every site refuses to be unmasked among fewer survivors than the "
                         "planned shares (participants − tolerated dropouts), so ε is computed from the planned "
                         "shares, with the conditional rounding's norm bound in the sensitivity, and without "
                         "sampling amplification (the server knows who took part). The guarantee holds while at "
                         "most the tolerated dropouts drop out or collude with the server: a colluding site can "
                         "hand the server its own share, removing it as a dropout would.")
    notes.append("Not protected (metadata every party can see or infer): each site's number of training records "
                 "(the aggregation weight and the sampling rate), who took part in which round, and the timing and "
                 "size of every message.")
    if resolved.get("privacy", {}).get("share_site_metrics"):
        notes.append("Released without protection by choice (privacy.share_site_metrics = true): the sites' training "
                     "losses and accuracies reach the server as computed (table 'Unprotected releases').")
    reproducible = any(s.get("reproducible") for s in record.values()) or bool(client and client.get("reproducible"))
    if reproducible:
        notes.append("WARNING: this run drew its DP sampling and noise from the run's seed (a test setting). Anyone "
                     "who knows the seed can recompute the noise: the ε above does not hold against them.")
    else:
        notes.append("Sampling and noise were drawn from generators seeded by the operating system's entropy "
                     "(not a cryptographically secure generator; floating-point Gaussian sampling has known "
                     "theoretical weaknesses).")
    return notes


# ---------------------------------------------------------------- rendering

def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if 1e-3 <= abs(value) < 1e6 or value == 0 else f"{value:.3g}"
    return str(value)


def _eps(value: float | None) -> str:
    return "∞ (no bound)" if value is None else f"{value:.3f}"


def _headline(report: dict[str, Any]) -> list[str]:
    """One sentence per level with the figures a reviewer signs off on."""
    summary, lines = report["summary"], []
    if SIGNED_UNCHECKED in report["evidence"]["unchecked"]:
        lines.append("NOT CHECKED against signed evidence: the run kept no audit log, so every ε below rests on "
                     "unsigned ledger files (reported with --allow-unsigned).")
    for level, unit in (("record", "one training record"), ("client", "one whole site")):
        s = summary.get(level)
        if s is None:
            lines.append(f"{level.capitalize()} level: no differential privacy, ε = ∞ for {unit}.")
            continue
        accountant = s["budget_accountant"]
        value = s["epsilon"][accountant]
        budget = f", budget {_fmt(s['budget_epsilon'])}" if s["budget_epsilon"] else ", no budget"
        where = f" (largest, at {value['client']})" if level == "record" and value["client"] else ""
        line = (f"{level.capitalize()} level: ε = {_eps(value['epsilon'])}{where} at δ = {_fmt(s['delta'], 8)} "
                f"({accountant}{budget}) for {unit}")
        if "epsilon_if_participation_known" in value:
            known = value["epsilon_if_participation_known"]
            line += (f" while who took part stays hidden; ε = {_eps(known)} against anyone who knows the "
                     "participants (the server and each round's cohort)")
        others = [o for o in report["other_neighbours"] if o["level"] == level]
        if others:
            worst = max(others, key=lambda o: math.inf if o["replace_one_epsilon"] is None
                        else o["replace_one_epsilon"])
            line += f"; replace-one ε = {_eps(worst['replace_one_epsilon'])}"
            if level == "record":
                groups = ", ".join(f"{k} records: {_eps(_worst_group(others, k))}" for k in map(str, GROUP_SIZES))
                line += f"; groups of {groups}"
        lines.append(line + ".")
    for level in ("record", "client"):
        ledgers = [d for d in report["dataset_ledgers"] if d.get("level", "record") == level]
        if ledgers:
            worst = max(ledgers, key=lambda d: d.get("epsilon") or 0.0)
            budget = f" of its budget {_fmt(worst['budget_epsilon'])}" if worst.get("budget_epsilon") else ""
            lines.append(f"Across runs ({level} level, each site's dataset ledger): the most spent dataset is at "
                         f"ε = {_eps(worst.get('epsilon'))}{budget} ({worst['party']}; "
                         f"{_eps(worst.get('epsilon_before_run'))} before this run).")
    return lines


def _worst_group(others: list[dict[str, Any]], size: str) -> float | None:
    values = [o["group_epsilon"].get(size) for o in others]
    return None if any(v is None for v in values) else max(values, default=0.0)


def _blocks(report: dict[str, Any]) -> list[tuple]:
    run, levels, summary = report["run"], report["levels"], report["summary"]
    blocks: list[tuple] = [("h1", f"Privacy budget report — {run['name']}")]
    blocks.append(("p", "What the run spent of its differential-privacy budgets, per level, recomputed from the "
                        "recorded noise mechanisms after checking each ledger against the run's signed evidence. ε "
                        "bounds how much any output can reveal about what is protected (smaller is better); δ is the "
                        "small probability with which the bound may fail."))
    blocks.append(("p", f"Generated {report['generated']} by feddat-secure "
                        f"{report['software'].get('feddat-secure') or '(version unknown)'}."))
    blocks.append(("h2", "Headline"))
    blocks.append(("ul", _headline(report)))
    blocks.append(("h2", "Run"))
    rows = [["run folder", run["run_dir"]], ["finished (manifest written)", "yes" if run["finished"] else "no"],
            ["started (first audit entry, UTC)", _fmt(run["started"])],
            ["ended (last audit entry, UTC)", _fmt(run["ended"])],
            ["algorithm", _fmt(run.get("algorithm"))], ["config SHA-256", _fmt(run["config_sha256"])],
            ["base model SHA-256", _fmt(run["base_model_sha256"])], ["data SHA-256", _fmt(run["data_sha256"])],
            ["global adapter SHA-256", _fmt(run["global_adapter_sha256"])],
            ["roster SHA-256 (what every party pinned; audit verify --roster-sha256)", _fmt(run["roster_sha256"])],
            ["audit receipt SHA-256 (compare with the copy you keep; audit verify --receipt)",
             _fmt(run["audit_receipt"]["sha256"] if run["audit_receipt"] else None)]]
    blocks.append(("pairs", rows))
    blocks.append(("h3", "Software"))
    blocks.append(("pairs", [[name, version or "not installed"] for name, version in report["software"].items()]))
    blocks.append(("h2", "Evidence: the ledgers against the run's signed records"))
    evidence = report["evidence"]
    blocks.append(("ul", [f"Checked: {c}." for c in evidence["checks"]]
                   + [f"Not checked: {c}." for c in evidence["unchecked"]]))
    if run["ledger_files"]:
        blocks.append(("table", ["ledger file", "party", "SHA-256"],
                       [[f["file"], f["party"], f["sha256"]] for f in run["ledger_files"]]))
    if run["audit_tree_heads"]:
        blocks.append(("p", "Final signed tree heads of the run's audit logs (verify them with the audit tools):"))
        blocks.append(("table", ["log", "party", "tree size", "root", "time", "final"],
                       [[h["log"], h["party"], h["tree_size"], h["root"], h["time"], "yes" if h["final"] else "no"]
                        for h in run["audit_tree_heads"]]))
    else:
        blocks.append(("p", "No audit log was found in the run folder."))
    blocks.append(("h2", "Summary"))
    rows = []
    for level in ("record", "client"):
        s = summary.get(level)
        if s is None:
            rows.append([level, "— (no DP at this level)", "∞", "—", "∞", "none", "—"])
            continue
        for name, value in s["epsilon"].items():
            governs = name == s["budget_accountant"]
            budget = s["budget_epsilon"]
            left = None if budget is None or value["epsilon"] is None else max(0.0, budget - value["epsilon"])
            where = f" (largest: {value['client']})" if level == "record" and value["client"] else ""
            known = _eps(value["epsilon_if_participation_known"]) if "epsilon_if_participation_known" in value \
                else ("same (no site sampling claimed)" if level == "client" else "— (record level)")
            rows.append([level, name + (" (decides the budget)" if governs else ""), _eps(value["epsilon"]) + where,
                         _fmt(s["delta"], 8), known,
                         "none" if not budget else _fmt(budget), _fmt(left)])
    blocks.append(("table", ["level", "accountant", "ε spent", "δ", "ε if participation is known", "budget ε",
                             "ε left"], rows))
    blocks.append(("img", "ε spent after each round (every ledger, each under the accountant that decides its "
                          "budget; dashed: its budget)"))
    blocks += _level_blocks(report, levels)
    blocks += _across_runs_blocks(report)
    blocks.append(("h2", "What is protected, and what is not"))
    blocks.append(("ul", report["assumptions"]))
    blocks.append(("h2", "Recomputing ε"))
    blocks.append(("p", "privacy_report.json lists, for every ledger, the Gaussian mechanisms that were composed "
                        "(noise multiplier σ, sampling rate q, steps T per round). Feeding them to another accountant "
                        "(e.g. Google's dp-accounting: PoissonSampledDpEvent(q, GaussianDpEvent(σ)) self-composed T "
                        "times) recomputes ε independently; the group ε is MixtureOfGaussiansDpEvent(σ, [0..k], "
                        "Binomial(k, q)) under the PLD accountant, the replace-one ε the same Poisson events under "
                        "PLDAccountant(NeighboringRelation.REPLACE_ONE)."))
    return blocks


def _across_runs_blocks(report: dict[str, Any]) -> list[tuple]:
    blocks: list[tuple] = []
    others = report["other_neighbours"]
    if others:
        blocks.append(("h2", "Other neighbours: groups of records, replace-one"))
        headers = ["ledger", "δ", "replace-one ε"] + [f"group of {k} records ε" for k in GROUP_SIZES]
        rows = [[f"{o['level']}: {_ledger_name(o)}", _fmt(o["delta"], 8), _eps(o["replace_one_epsilon"])]
                + [_eps(o["group_epsilon"][str(k)]) if o["group_epsilon"] else "— (not a record ledger)"
                   for k in GROUP_SIZES] for o in others]
        blocks.append(("table", headers, rows))
        blocks.append(("p", "Computed with dp_accounting's PLD accountant (pessimistic, privacy-loss grid 0.01); its "
                            "RDP accountant supports neither the mixture of Gaussians nor replace-one under Poisson "
                            "sampling."))
    if report["dataset_ledgers"]:
        blocks.append(("h2", "Across runs: each site's dataset ledger"))
        blocks.append(("table", ["site", "dataset SHA-256", "entries", "δ", "ε before this run", "ε now (all runs)",
                                 "dataset budget ε", "ledger", "head SHA-256"],
                       [[d["party"], _fmt(d.get("dataset_sha256")), _fmt(d.get("entries")), _fmt(d.get("delta"), 8),
                         _eps(d.get("epsilon_before_run")), _eps(d.get("epsilon")), _fmt(d.get("budget_epsilon")),
                         _fmt(d.get("path")), _fmt(d.get("head_sha256"))] for d in report["dataset_ledgers"]]))
    if report["unprotected_releases"]:
        blocks.append(("h2", "Unprotected releases (opted in)"))
        blocks.append(("table", ["site", "released without DP"],
                       [[u["party"], ", ".join(map(str, u["releases"]))] for u in report["unprotected_releases"]]))
    return blocks


def _level_blocks(report: dict[str, Any], levels: dict[str, Any]) -> list[tuple]:
    blocks: list[tuple] = []
    entries = report["ledgers"]
    if levels["record"]["enabled"]:
        sites = levels["record"]["sites"]
        first = next(iter(sites.values()))
        same_sigma = len({site["noise_multiplier"] for site in sites.values()}) == 1
        steps = first.get("step_noise_multipliers") or [first["noise_multiplier"]]  # reports written before it

        def sigma(key: str) -> str:
            return _fmt(first[key], 4) if same_sigma else "per site (calibrated to each site's q), see below"

        blocks.append(("h2", "Record level: DP-SGD inside each site"))
        blocks.append(("table", ["setting", "value"], [
            ["mechanism", first["mechanism"]],
            ["noise multiplier σ per DP-SGD step", sigma("noise_multiplier")] if len(set(steps)) == 1 else
            ["noise multipliers of a batch's DP-SGD steps (FedDAT: A_s with the head, A_c)",
             ", ".join(_fmt(value, 4) for value in steps) if same_sigma else sigma("noise_multiplier")],
            ["DP-SGD mechanisms per batch k (2 under FedDAT: two optimizers, one Poisson batch)",
             first["mechanisms_per_batch"]],
            ["accounted noise multiplier per batch ((Σ σ_i⁻²)^-½; σ/√k when equal)",
             sigma("accounted_noise_multiplier")],
            ["clipping norm C (per record, per step)", _fmt(first["max_grad_norm"])],
            ["batches per round", first["local_steps"]], ["δ", _fmt(first["delta"], 8)],
            ["target ε (σ calibrated to it)", _fmt(first["target_epsilon"]) if first["target_epsilon"] else "none"],
            ["budget ε per site", _fmt(first["budget_epsilon"]) if first["budget_epsilon"] else "none"]]))
        rows = []
        for cid, site in sites.items():
            mine = {e["accountant"]: e for e in entries if e["level"] == "record" and e["client"] == cid}
            rdp, prv = mine.get("rdp", {}), mine.get("prv", {})
            rows.append([cid, site["dataset_size"], _fmt(site["sample_rate"], 4), _fmt(site["noise_multiplier"], 4),
                         rdp.get("rounds_spent", 0), rdp.get("steps", 0), _eps(rdp.get("epsilon")),
                         _eps(prv.get("epsilon")) if prv else "—", _fmt(rdp.get("remaining_epsilon"))])
        blocks.append(("h3", "Per site"))
        blocks.append(("table", ["site", "records N", "sampling rate q", "σ", "rounds", "batches", "ε (RDP)",
                                 "ε (PRV)", "ε left"], rows))
        blocks += _per_round_table([e for e in entries if e["level"] == "record"], "Record-level ε after each round")
    if levels["client"]["enabled"]:
        c = levels["client"]["settings"]
        blocks.append(("h2", f"Client level: DP-FedAvg, {c['placement']} noise"))
        rows = [["mechanism", c["mechanism"]], ["noise multiplier σ", _fmt(c["noise_multiplier"], 4)],
                ["clipping norm C of a site's update", _fmt(c["clip_norm"], 4)],
                ["site sampling rate q (expected participants / sites)",
                 f"{_fmt(c['sample_rate'], 4)} ({_fmt(c['expected_participants'], 2)} / {c['num_clients']})"],
                ["planned rounds", c["rounds"]], ["δ", _fmt(c["delta"], 8)],
                ["target ε (σ calibrated to it)", _fmt(c["target_epsilon"]) if c["target_epsilon"] else "none"],
                ["budget ε", _fmt(c["budget_epsilon"]) if c["budget_epsilon"] else "none"]]
        if c.get("rounding_l2_sensitivity"):
            rows += [["rounding term r of the sensitivity (L2 bound of the protocol's rounding before the server's "
                      "noise)", _fmt(c["rounding_l2_sensitivity"], 6)],
                     ["L2 sensitivity C + r (the noise std is σ·(C + r))", _fmt(c["effective_l2_sensitivity"], 6)]]
        if c["placement"] == "distributed":
            rows += [["quantization step", _fmt(c["quantization_step"], 8)],
                     ["L2 sensitivity in grid steps (how far one site's quantized update can move the integer "
                      "sum, counted in quantization steps: the conditionally rounded update's norm bound plus the zero "
                      "update's half step per value; the Skellam noise is sized against it)",
                      _fmt(c["quantized_l2_sensitivity"], 1)],
                     ["tolerated dropouts per round", c["tolerated_dropouts"]]]
        if c.get("adaptive_clipping"):
            rows += [["adaptive clipping: target quantile", _fmt(c["target_quantile"])],
                     ["adaptive clipping: noise std of the count", _fmt(c["count_noise_std"])],
                     ["noise multiplier left for the update", _fmt(c["update_noise_multiplier"], 4)]]
            history = (report.get("adaptive_clipping") or {})
            if history:
                rows.append(["clip norm now (after adaptation)", _fmt(history.get("clip_norm"), 4)])
        blocks.append(("table", ["setting", "value"], rows))
        mine = [e for e in entries if e["level"] == "client"]
        rows = [[_ledger_name(e), e["accountant"], e["rounds_spent"], _eps(e["epsilon"]),
                 _eps(e["epsilon_if_participation_known"]) if "epsilon_if_participation_known" in e
                 else "same (q = 1)",
                 _fmt(e["remaining_epsilon"])] for e in mine]
        blocks.append(("table", ["ledger", "accountant", "rounds", "ε", "ε if participation is known", "ε left"], rows))
        blocks += _per_round_table(mine, "Client-level ε after each round")
    return blocks


def _ledger_name(entry: dict[str, Any]) -> str:
    """Who holds a ledger: under distributed noise the federation's client-level ledger (the server's) and each
    site's own stand side by side, and a reviewer must tell them apart."""
    if entry["client"] is None:
        return "federation (the server's ledger)"
    return f"{entry['client']} (the site's own ledger)" if entry["level"] == "client" else entry["client"]


def _per_round_table(entries: list[dict[str, Any]], title: str) -> list[tuple]:
    governing = [e for e in entries if e["governs_budget"]]
    rounds = sorted({p["round"] for e in governing for p in e["epsilon_per_round"]})
    if not rounds:
        return [("p", f"{title}: no round has spent anything yet.")]
    headers = ["round"] + [_ledger_name(e) for e in governing]
    rows = []
    for r in rounds:
        row = [r]
        for e in governing:
            values = {p["round"]: p["epsilon"] for p in e["epsilon_per_round"]}
            previous = [v for k, v in values.items() if k < r]
            spent = values.get(r)
            before = previous[-1] if previous else 0.0
            if r not in values:
                row.append("— (did not take part)")
            elif spent is None or before is None:
                row.append("∞")
            else:
                row.append(f"{spent:.3f} (+{spent - before:.3f})")
        rows.append(row)
    accountant = governing[0]["accountant"]
    return [("h3", f"{title} ({accountant}; in brackets: what the round spent)"), ("table", headers, rows)]


def render_markdown(report: dict[str, Any]) -> str:
    lines = []
    for block in _blocks(report):
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "img":
            lines += [f"*{block[1]}: see the plot in {HTML_FILE}.*", ""]
        elif kind == "pairs":
            lines += [f"- **{key}**: {value}" for key, value in block[1]] + [""]
        else:
            headers, rows = block[1], block[2]
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "---|" * len(headers))
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
            lines.append("")
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#1a1a1a;line-height:1.45}table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;
padding:.3em .6em;text-align:left;vertical-align:top;font-size:.92em}th{background:#f2f2f2}td{word-break:break-all}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}img{max-width:100%;border:1px solid #ddd}
li{margin:.3em 0}figcaption{color:#555;font-size:.9em}"""


def render_html(report: dict[str, Any], png: bytes) -> str:
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>Privacy budget report — {html.escape(str(report['run']['name']))}</title>",
             f"<style>{STYLE}</style></head><body>"]
    for block in _blocks(report):
        kind = block[0]
        if kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode(png).decode()
            parts.append(f"<figure><img alt=\"{html.escape(block[1])}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{html.escape(block[1])}</figcaption></figure>")
        elif kind == "pairs":  # a key-value table: no header row
            body = "".join(f"<tr><th scope=\"row\">{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                           for k, v in block[1])
            parts.append(f"<table class=\"pairs\"><tbody>{body}</tbody></table>")
        else:
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                           for row in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- the plot (Pillow; no matplotlib)

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def plot_epsilon(report: dict[str, Any], *, width: int = 900, height: int = 460) -> bytes:
    """A PNG line chart of ε after each round, one line per ledger under its budget accountant."""
    series = []
    for entry in report["ledgers"]:
        if entry["governs_budget"] and entry["epsilon_per_round"]:
            points = [(p["round"], p["epsilon"]) for p in entry["epsilon_per_round"] if p["epsilon"] is not None]
            # a site's own client-level ledger apart from the federation's (distributed noise keeps both)
            kind = "site's own" if entry["level"] == "client" and entry["client"] else entry["level"]
            label = f"{kind}: {entry['client'] or 'federation'}"
            series.append((label, points, entry["level"] == "client", entry["budget_epsilon"]))
    series = _merge_identical(series)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    left, right, top, bottom = 70, width - 220, 30, height - 55
    all_points = [p for _, points, _, _ in series for p in points]
    budgets = [b for *_, b in series if b]
    max_round = max([p[0] for p in all_points], default=1)
    max_eps = max([p[1] for p in all_points] + budgets + [1e-9])
    y_top = _nice_ceiling(max_eps * 1.05)

    def xy(r: float, e: float) -> tuple[float, float]:
        x = left + (r - 0.5 if max_round == 1 else r - 1) / max(max_round - 1, 1) * (right - left)
        return x, bottom - e / y_top * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline="#444")
    for i in range(6):
        value = y_top * i / 5
        _, y = xy(1, value)
        draw.line([left, y, right, y], fill="#e6e6e6")
        draw.text((left - 8, y), f"{value:.3g}", fill="#222", font=small, anchor="rm")
    step = max(1, math.ceil(max_round / 12))
    for r in range(1, max_round + 1, step):
        x, _ = xy(r, 0)
        draw.line([x, bottom, x, bottom + 5], fill="#444")
        draw.text((x, bottom + 8), str(r), fill="#222", font=small, anchor="mt")
    draw.text(((left + right) / 2, height - 20), "round", fill="#222", font=font, anchor="mm")
    draw.text((12, top - 22), "epsilon spent (cumulative)", fill="#222", font=font)  # the font has no Greek
    if not series:
        draw.text(((left + right) / 2, (top + bottom) / 2), "no privacy spending recorded", fill="#888", font=font,
                  anchor="mm")
    legend: list[tuple[str, str, int, bool]] = []  # (text, colour, width, dashed)
    for index, (label, points, thick, budget) in enumerate(series):
        colour = "#000000" if thick else PALETTE[index % len(PALETTE)]
        coords = [xy(r, e) for r, e in points]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=4 if thick else 2)
        for x, y in coords:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend.append((label, colour, 4 if thick else 2, False))
        if budget:
            _, y = xy(1, budget)
            _dashed(draw, left, right, y, colour)
            legend.append((f"budget {budget:g} ({label.split(':')[0]})", colour, 1, True))
    for index, (text, colour, width, dashed) in enumerate(legend):
        legend_y = top + 6 + 20 * index
        if legend_y > bottom - 14:
            draw.text((right + 15, legend_y), f"... {len(legend) - index} more", fill="#555", font=small)
            break
        if dashed:
            _dashed(draw, right + 15, right + 40, legend_y + 7, colour)
        else:
            draw.line([right + 15, legend_y + 7, right + 40, legend_y + 7], fill=colour, width=width)
        draw.text((right + 46, legend_y), text[:26], fill="#222", font=small)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _dashed(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, colour: str) -> None:
    for x in range(int(x0), int(x1), 12):
        draw.line([x, y, min(x + 6, x1), y], fill=colour, width=2)


def _merge_identical(series: list[tuple]) -> list[tuple]:
    """Ledgers with the same ε after every round (sites of equal size and settings) would draw on top
    of each other: one line for them, labelled with how many there are."""
    groups: dict[tuple, list[str]] = {}
    for label, points, thick, budget in series:
        groups.setdefault((label.split(":")[0], tuple(points), thick, budget), []).append(label)
    merged = []
    for (level, points, thick, budget), labels in groups.items():
        label = labels[0] if len(labels) == 1 else f"{level}: {len(labels)} sites (same)"
        merged.append((label, list(points), thick, budget))
    return merged


def _nice_ceiling(value: float) -> float:
    magnitude = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * magnitude >= value:
            return factor * magnitude
    return 10 * magnitude


# ---------------------------------------------------------------- writing

def write_privacy_report(run_dir: Path | str, *, allow_unsigned: bool = False) -> list[Path]:
    """Write privacy_report.html, .md and .json into ``run_dir``; returns their paths (see :func:`build_report`
    for ``allow_unsigned``)."""
    run_dir = Path(run_dir)
    report = build_report(run_dir, allow_unsigned=allow_unsigned)
    paths = [run_dir / HTML_FILE, run_dir / MARKDOWN_FILE, run_dir / JSON_FILE]
    paths[0].write_text(render_html(report, plot_epsilon(report)), encoding="utf-8")
    paths[1].write_text(render_markdown(report), encoding="utf-8")
    paths[2].write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    return paths
