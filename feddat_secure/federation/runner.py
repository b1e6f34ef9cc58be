"""A simulated run: every party built from its own folder, joined in memory, and the run folder around them.

Run folder ``<output_dir>/<name>/``: the run's own files at the top — ``config.toml`` (resolved),
``metrics.jsonl`` (one line per round), ``global_adapter/`` (PEFT format; FedSA-LoRA has no global adapter,
its B matrices stay with the sites: the folder then holds a shared head only), ``roster.json`` (the parties'
public keys; its SHA-256 is in every message), ``privacy_report.*`` with DP, and ``manifest.json`` (SHA-256
of the base model, data, config and every file written, and under ``audit`` the roster's digest and every
party's final signed tree head, which ``audit verify`` checks by default; written last: a run folder without
one did not finish). Each party's own files are in ``parties/<party>/`` (:mod:`.party_folder`): its identity, audit log,
privacy ledger, checkpoints and, for a site, its adapters and head. ``resume=True`` continues an interrupted
run with every party restored from its own checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from audits import PartyRecord, RunRecord, check_log, resolve_receipt_dir, write_receipt
from protocols import ConfigurationError
from protocols.enrolment import IDENTITY_FILE, enrol_parties
from protocols.identity import ROSTER_FILE, load_roster

from ..config import ConfigError, RunConfig, check_against_data, check_against_model, load_config, to_dict, to_toml
from ..data import Benchmark, build_benchmark
from ..data.report import data_report
from ..errors import FederationError
from ..model.adapters import LoraSettings, save_peft_adapter
from ..model.backbone import Foundation, load_foundation
from ..model.classifier import save_head
from ..privacy.budget import BudgetExceeded
from ..privacy.report import write_privacy_report
from ..privacy.run_privacy import load_run_ledgers
from ..training.local_model import split_head
from .centralized import run_centralized
from .parties import (
    RunPlan,
    build_protocol,
    encode_site,
    party_folder,
    plan_run,
    site_answers,
    site_privacy,
    start_refusal,
)
from .party_folder import PARTIES_DIR, PartyFolder, keep_rounds_until
from .server_app import LABELS, RoundLog, mean_accuracies
from .simulation import simulate_federation

PROVENANCE_FILE = "provenance.json"  # what the run started from: config, data and base model digests


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    stopped: str | None = None  # why the run ended before its last round (a privacy budget), if it did
    # When the sites withheld their metrics from the server (DP without privacy.share_site_metrics): one record
    # per round, as the sites kept them in their own folders (:func:`sites_round`); empty otherwise.
    site_history: list[dict] = field(default_factory=list)

    @property
    def final_mean(self) -> dict[str, float]:
        """The last round's mean accuracy per inference mode: as the server received it or, when the sites
        withheld their metrics, the mean of what they kept (a simulation's operator is every party)."""
        last = self.history[-1]
        if last["mean"] is not None:
            return last["mean"]
        return next(kept["mean"] for kept in self.site_history if kept["round"] == last["round"])


def run(config: RunConfig, *, overwrite: bool = False, resume: bool = False, progress: bool = True,
        echo: Callable[[str], None] = tqdm.write) -> RunResult:
    # Everything that needs the model or the data is checked here, before any folder exists (the configuration
    # alone was checked when it loaded): a refused run leaves nothing behind.
    foundation, benchmark = load_inputs(config)
    data_quality = data_report(benchmark, foundation.tokenizer, foundation.max_text_length)
    for warning in data_quality.warnings:
        echo(f"feddat-secure: warning: {warning}")
    per_round = config.participants_per_round(len(benchmark.clients))
    label_spaces = {c.client_id: site_answers(config, benchmark, c) for c in benchmark.clients}
    splits = {c.client_id: encode_site(foundation, label_spaces[c.client_id], c)
              for c in benchmark.clients}
    lora = LoraSettings.of(config.model)
    run_dir = Path(config.output_dir) / config.name
    centralized = config.federation.algorithm == "centralized"
    plan = None
    provenance = {"config_sha256": config.digest(), "data_sha256": benchmark.digest(),
                  "base_model_sha256": foundation.digest}
    if centralized:
        check_run_dir(run_dir, config, overwrite, resume, provenance)
    else:
        counts = {cid: len(train) for cid, (train, _) in splits.items()}
        try:
            plan = plan_run(config, foundation, lora, counts, len(benchmark.answers))
        except ValueError as error:  # distributed noise is calibrated on the update's length, known only to the plan
            client = config.privacy.client
            if client.placement != "distributed" or not client.target_epsilon:
                raise
            raise ConfigError(f"key 'privacy.client.target_epsilon' ({client.target_epsilon:g}) cannot be met: "
                              f"{error}") from None
        try:  # an impossible protocol setting is refused before any folder exists
            build_protocol(plan)
        except ConfigurationError as error:
            raise ConfigError(f"secure_aggregation ({config.secure_aggregation.protocol}): {error}") from None
        check_run_dir(run_dir, config, overwrite, resume, provenance)
        if not resume:  # every site's dataset budget, before --overwrite removes the previous run's folder
            refusals = [reason for cid in plan.site_ids if (reason := start_refusal(site_privacy(
                plan, cid, splits[cid][0], config.privacy.dataset_ledger_dir))) is not None]
            if refusals:
                raise BudgetExceeded(0, refusals, whole_run=True)
    if not resume:
        prepare_run_dir(run_dir, overwrite)
        (run_dir / "config.toml").write_text(to_toml(config))
        (run_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")
    protocol = "none (pooled data)" if centralized else LABELS[config.secure_aggregation.protocol]
    echo(f"feddat-secure: {config.federation.algorithm} on {benchmark.name} ({len(benchmark.clients)} clients, "
         f"{per_round} per round, {config.federation.rounds} rounds), model {config.model.path}, "
         f"aggregation: {protocol}")
    stopped, site_history = None, []
    if centralized:
        history, global_state = run_centralized(config, foundation, benchmark, splits, lora, run_dir, progress,
                                                lambda record: _log_round(run_dir, record, echo))
    else:
        try:
            if not resume:
                enrol_run(plan, run_dir)
            federation = simulate_federation(plan, run_dir, foundation, lora, splits, label_spaces, resume=resume)
            server = federation.server
            if resume:
                keep_rounds_until(run_dir / "metrics.jsonl", server.next_round)
                echo(f"feddat-secure: resuming {run_dir} after round {server.next_round}")
            with tqdm(total=config.federation.rounds - server.next_round, disable=not progress, unit="round",
                      leave=False) as bar:
                def write(record: dict) -> dict:
                    bar.update(1)
                    _log_round(run_dir, record, echo)
                    if record.get("site_metrics") == "withheld":  # the operator of a simulation is every party
                        echo(format_round_table(sites_round(run_dir, plan.site_ids, record["round"]),
                                                "read from the sites' folders; the server did not receive them"))
                    return record

                server.run(RoundLog(write=write, echo=echo))
        except BaseException:
            if not resume and not _resumable(run_dir):  # nothing to continue from: leave no half-made folder
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        history, stopped = server.history, server.stopped
        server.close()
        receipt = server.audit_receipt(config.name)
        if receipt is not None:  # kept outside the run folder: whoever holds the folder cannot rewrite it
            kept = write_receipt(receipt, resolve_receipt_dir(config.audit.receipt_dir))
            echo(f"feddat-secure: audit receipt (keep a copy outside the run folder): {kept}")
        if not plan.site_metrics_shared:
            site_history = [sites_round(run_dir, plan.site_ids, record["round"]) for record in history]
        global_state = server.global_state if plan.algorithm.sends_updates else None
    if global_state is not None:
        adapter, head = split_head(global_state) if plan is None else plan.global_adapter(global_state)
        if adapter is not None:  # None: no global model (FedSA-LoRA's B stays with each site)
            save_peft_adapter(adapter, lora, foundation.path, run_dir / "global_adapter")
        if head:
            save_head(head, benchmark.answers, run_dir / "global_adapter")
    audit = audit_record(run_dir, [party for party, _ in plan.parties()]) \
        if plan is not None and config.audit.enabled else None
    write_manifest(run_dir, config, foundation, benchmark, stopped, data_quality.to_dict(), audit)
    if load_run_ledgers(run_dir) is not None:
        report = write_privacy_report(run_dir, allow_unsigned=not config.audit.enabled)
        echo(f"feddat-secure: privacy budget report: {report[0]}")
    return RunResult(run_dir, history, stopped, site_history)


def load_inputs(config: RunConfig) -> tuple[Foundation, Benchmark]:
    """The base model and the benchmark of ``config``, checked against it (what only the model and the data can
    tell: LoRA targets, sizes, the number of sites, batch and privacy terms); ConfigError naming the key."""
    foundation = load_foundation(config.model.path, random_init=config.model.random_init, seed=config.seed)
    check_against_model(config, foundation.lora_adaptable(), foundation.hidden_size)
    benchmark = build_benchmark(config.data.benchmark, path=config.data.path, num_clients=config.data.num_clients,
                                train_per_client=config.data.train_per_client,
                                test_per_client=config.data.test_per_client, image_size=foundation.image_size,
                                seed=config.seed, validation_fraction=config.data.validation_fraction,
                                question_families=config.data.question_families)
    check_against_data(config, {c.client_id: len(c.train) for c in benchmark.clients})
    return foundation, benchmark


def enrol_run(plan: RunPlan, run_dir: Path) -> None:
    """Every party gets its identity in its own folder (or uses the configured keys folder's); each party folder
    gets a copy of the roster it pins, and the run folder one for whoever verifies its logs."""
    keys = plan.config.secure_aggregation.keys
    parties_dir = run_dir / PARTIES_DIR
    if keys:
        roster_file = Path(keys) / ROSTER_FILE
        try:
            roster = load_roster(roster_file)
            for party, role in plan.parties():
                if party not in roster or roster.role(party) != role:
                    raise ConfigurationError(f"the roster does not enrol {party!r} as a {role}")
        except ConfigurationError as error:
            raise ConfigError(f"key 'secure_aggregation.keys' ({keys!r}): {error}") from None
    else:
        roster = enrol_parties(parties_dir, plan.parties())
        roster_file = parties_dir / ROSTER_FILE
    for party, _ in plan.parties():
        (parties_dir / party).mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(roster_file, parties_dir / party / ROSTER_FILE)
    shutil.copyfile(roster_file, run_dir / ROSTER_FILE)
    if not keys:
        (parties_dir / ROSTER_FILE).unlink()
    del roster


def prepare_run_dir(run_dir: Path, overwrite: bool) -> Path:
    if run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def _resumable(run_dir: Path) -> bool:
    """Whether the server of the run in ``run_dir`` has checkpointed a round (a crash after that is resumed)."""
    return any((run_dir / PARTIES_DIR / "server" / "checkpoints").glob("round-*.safetensors"))


def check_run_dir(run_dir: Path, config: RunConfig, overwrite: bool, resume: bool,
                            provenance: dict[str, str]) -> None:
    """A new run needs a free folder (or --overwrite); only an interrupted run of exactly this configuration, data
    and base model continues, and a finished run is sealed. Checked before anything is written."""
    if not resume:
        if run_dir.exists() and not overwrite:
            raise ConfigError(f"run folder {str(run_dir)!r} already exists; choose another 'name', overwrite it, or "
                              "resume it if it was interrupted")
        return
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"cannot resume {str(run_dir)!r}: it holds no run (no config.toml)")
    if (run_dir / "manifest.json").exists():
        raise ConfigError(f"cannot resume {str(run_dir)!r}: the run finished (manifest.json is written); "
                          "start a new run instead")
    if config.federation.algorithm == "centralized":
        raise ConfigError("cannot resume a centralized run (it keeps no checkpoint); run it again")
    if not _resumable(run_dir):
        raise ConfigError(f"cannot resume {str(run_dir)!r}: its server has not checkpointed a round yet (it stopped "
                          "in or before round 1); run it again, overwriting it")
    recorded = load_config(run_dir / "config.toml")
    if recorded.digest() != config.digest():
        changed = _changed_keys(to_dict(recorded), to_dict(config))
        raise ConfigError(f"cannot resume {str(run_dir)!r} with a different configuration than the one it started "
                          f"with (its config.toml): {', '.join(changed)} changed")
    try:
        started = json.loads((run_dir / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        raise ConfigError(f"cannot resume {str(run_dir)!r}: its {PROVENANCE_FILE} is missing or unreadable") from None
    for key, what in (("data_sha256", "data"), ("base_model_sha256", "base model")):
        if started.get(key) != provenance[key]:
            raise ConfigError(f"cannot resume {str(run_dir)!r}: the {what} changed since the run started (SHA-256 "
                              f"{started.get(key)} then, {provenance[key]} now)")


def _changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two resolved configurations."""
    changed = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_keys(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"'{prefix}{key}' ({old!r} → {new!r})")
    return changed


def _log_round(run_dir: Path, record: dict, echo) -> dict:
    with open(run_dir / "metrics.jsonl", "a") as stream:
        stream.write(json.dumps(record, sort_keys=True) + "\n")
    echo(format_round_table(record))
    return record


def sites_round(run_dir: Path, site_ids: Sequence[str], round_number: int) -> dict:
    """Round ``round_number`` (1-based) as the sites kept it in their own ``parties/<site>/metrics.jsonl`` when
    they withheld it from the server: {"round", "clients" (accuracies), "mean", "train_loss", "clipped"}."""
    clients, losses, clipped = {}, {}, {}
    for site in site_ids:
        path = party_folder(run_dir, site).metrics
        lines = path.read_text().splitlines() if path.exists() else []
        for kept in (json.loads(line) for line in lines if line.strip()):
            if kept["round"] == round_number:
                clients[site] = kept["accuracy"]
                if "train_loss" in kept:
                    losses[site], clipped[site] = kept["train_loss"], kept["clipped"]
    return {"round": round_number, "clients": clients, "mean": mean_accuracies(clients), "train_loss": losses,
            "clipped": clipped}


def format_round_table(record: dict, source: str = "") -> str:
    """A round's accuracies per site and their mean; ``source`` names where they were read from."""
    if record["mean"] is None:
        return (f"round {record['round']:>3}  accuracies withheld by the sites (differential privacy; "
                "privacy.share_site_metrics is false)")
    modes = list(record["mean"])
    header = f"round {record['round']:>3}  " + "".join(f"{m:>8}" for m in modes) + (f"  ({source})" if source else "")
    rows = [header]
    for cid, values in record["clients"].items():
        rows.append(f"{cid:>11}" + "".join(f"{values[m]:8.3f}" for m in modes))
    rows.append(f"{'mean':>11}" + "".join(f"{record['mean'][m]:8.3f}" for m in modes))
    return "\n".join(rows)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def audit_record(run_dir: Path, parties: Sequence[str], *, dropouts_allowed: bool = False) -> dict:
    """The manifest's ``audit`` object (:class:`audits.RunRecord`): the digest of the run's roster and, for every
    party of the run, its log and the final signed tree head it closed it with, read once every party has
    closed its log and checked against the roster. A log cut or rewritten and re-sealed later, or removed,
    then no longer matches what the finished run recorded (issue 13, faults 1 and 2). A party whose log the
    run finished without closing (a deployment's site killed during the run) is recorded with the last tree
    head it signed, if any (``closed`` false), when ``dropouts_allowed``; otherwise (a simulation, where every party
    closes) an unclosed log, like a missing one or one that does not verify, stops the manifest."""
    roster = load_roster(run_dir / ROSTER_FILE)
    keys = {entry.party_id: entry.public_key for entry in roster.entries}
    records = {}
    for party in parties:
        path = PartyFolder(run_dir / PARTIES_DIR / party, party).audit_log
        log = check_log(path, keys, party=party) if path.is_file() else None
        if log is None or log.problem is not None or not (log.closed or dropouts_allowed):
            why = "is missing" if log is None else str(log.problem) if log.problem else "is not closed"
            raise FederationError(f"the run finished but the audit log of {party!r} {why}; no manifest is written")
        records[party] = PartyRecord(path.relative_to(run_dir).as_posix(),
                                     log.tree_heads[-1] if log.tree_heads else None, log.closed)
    return RunRecord(roster.digest, records).to_dict()


def write_manifest(run_dir: Path, config: RunConfig, foundation: Foundation, benchmark: Benchmark,
                    stopped: str | None, data_quality: dict, audit: dict | None) -> None:
    # Every file written, except the parties' private keys: the run's bookkeeping never reads a party's key.
    files = {p.relative_to(run_dir).as_posix(): _sha256(p) for p in sorted(run_dir.rglob("*"))
             if p.is_file() and p.name != IDENTITY_FILE}
    manifest = {
        "base_model": {"path": str(foundation.path), "sha256": foundation.digest},
        "data": {"benchmark": benchmark.name, "sha256": benchmark.digest(), "report": data_quality},
        "config": {"sha256": config.digest(), "resolved": to_dict(config)},
        "files": files,
        "finished": "stopped early: " + stopped if stopped else "all rounds",
        "audit": audit,  # None: a centralized run, or audit logs off
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
