"""A party's own folder in a deployment, and how each party builds its role from it.

Every party of a deployment (server, each site, the HE key holder) has a folder on its own disk::

    identity.pem         its Ed25519 private key (0600; made there by ``feddat-secure keys create``)
    enrolment.json       its public enrolment
    roster.json          the roster every party pins (its SHA-256 is in every signed message)
    config.toml          the run configuration the federation agreed on (its SHA-256 is checked at the opening)
    federation.json      the federation's public facts every party needs to derive the same run plan: each
                         site's number of training records (aggregation weights, privacy accounting) and the
                         answer vocabulary (the head's size when heads travel)
    data/                a site's own data, for the ``folder`` benchmark (a folder root holding ``answers.txt``
                         and the site's own sub-folder); generated benchmarks are rebuilt from the configuration
    <party>.audit.jsonl, privacy_ledger.json, checkpoints/, outputs: written by the party during the run

:func:`load_plan` derives the run plan exactly as the in-process simulation does (``parties.plan_run``), so
the same configuration gives the same parties whichever wiring joins them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from protocols import ConfigurationError
from protocols.enrolment import load_party_identity
from protocols.identity import ROSTER_FILE, check_party_id, load_roster, parse_strict_json, read_text_file

from ..config import RunConfig, load_config, to_toml
from ..errors import FeddatError

CONFIG_FILE = "config.toml"
FEDERATION_FILE = "federation.json"
FEDERATION_FORMAT = "feddat-secure-federation/1"
DATA_DIR = "data"


class DeploymentError(FeddatError):
    """A deployment that cannot start or go on: a party folder, agreement, process or network problem."""


@dataclass(frozen=True)
class Agreement:
    """What every party of a deployment holds identically: the configuration and the federation's facts."""

    config: RunConfig
    sites: dict[str, int]  # site id → training records
    answers: tuple[str, ...]  # the benchmark's answer vocabulary

    def digest(self) -> str:
        """SHA-256 (hex) of the configuration's digest and the federation's facts: what every party checks at
        the session's opening (in place of the configuration's digest alone), so parties that hold different
        facts (record counts, vocabulary) never start a run together."""
        facts = json.dumps({"config_sha256": self.config.digest(), "sites": self.sites,
                            "answers": list(self.answers)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(facts.encode()).hexdigest()

    def save(self, folder: Path) -> None:
        """Write ``config.toml`` and ``federation.json`` into ``folder`` (a party's own)."""
        (folder / CONFIG_FILE).write_text(to_toml(self.config))
        facts = {"format": FEDERATION_FORMAT, "sites": self.sites, "answers": list(self.answers)}
        (folder / FEDERATION_FILE).write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")


def load_agreement(folder: Path) -> Agreement:
    """The agreement in a party's folder; DeploymentError naming the file and the problem."""
    folder = Path(folder)
    try:
        config = load_config(folder / CONFIG_FILE)
    except FeddatError as error:
        message = str(error)
        raise DeploymentError(message if str(folder / CONFIG_FILE) in message else
                              f"{folder / CONFIG_FILE}: {message}") from None
    path = folder / FEDERATION_FILE
    try:
        facts = parse_strict_json(read_text_file(path, str(path)), str(path))
    except ConfigurationError as error:
        raise DeploymentError(str(error)) from None
    if not isinstance(facts, dict) or facts.get("format") != FEDERATION_FORMAT or set(facts) != {
            "format", "sites", "answers"}:
        raise DeploymentError(f"{path}: not a {FEDERATION_FORMAT} file (keys format, sites, answers)")
    sites, answers = facts["sites"], facts["answers"]
    if not isinstance(sites, dict) or not sites or not all(
            isinstance(count, int) and not isinstance(count, bool) and count > 0 for count in sites.values()):
        raise DeploymentError(f"{path}: 'sites' must map each site id to its positive number of training records")
    try:
        for site in sites:
            check_party_id(site)
    except ConfigurationError as error:
        raise DeploymentError(f"{path}: {error}") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DeploymentError(f"{path}: 'answers' must be a non-empty list of strings")
    return Agreement(config, dict(sites), tuple(answers))


def party_of(folder: Path) -> tuple[str, str]:
    """(party id, role) of the identity in ``folder``, as the roster it pins enrols it."""
    try:
        identity = load_party_identity(folder)
        roster = load_roster(folder / ROSTER_FILE)
        roster.check_identity(identity)
        return identity.party_id, roster.role(identity.party_id)
    except ConfigurationError as error:
        raise DeploymentError(f"{folder}: {error}") from None


def private_folder(folder: Path) -> Path:
    """``folder``, checked to exist and be readable by its owner only (it holds an identity key)."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise DeploymentError(f"party folder {str(folder)!r} does not exist")
    if os.stat(folder).st_mode & 0o077:
        raise DeploymentError(f"party folder {str(folder)!r} is open to other users (mode "
                              f"{oct(os.stat(folder).st_mode & 0o777)}); it holds a private key: chmod 700 it")
    return folder


def check_unused(folder: Path, party_id: str) -> None:
    """A party folder serves one run: its audit log is evidence and is never continued by another run."""
    from audits import log_path

    log = log_path(folder, party_id)
    if log.exists():
        raise DeploymentError(f"{folder} holds the audit log of an earlier run ({log.name}); keep that run's files "
                              "and give this run a fresh folder with the same identity, roster and agreement")


@dataclass
class PlannedParty:
    """A party's view of the run: the agreement, the model and the run plan derived from them."""

    agreement: Agreement
    foundation: object  # model.backbone.Foundation
    lora: object  # model.adapters.LoraSettings
    plan: object  # federation.parties.RunPlan


def load_plan(folder: Path) -> PlannedParty:
    """Load the base model and derive the run plan from the agreement in ``folder`` (imports torch)."""
    from ..config import ConfigError, check_against_model
    from ..model.adapters import LoraSettings
    from ..model.backbone import load_foundation

    agreement = load_agreement(folder)
    config = agreement.config
    foundation = load_foundation(config.model.path, random_init=config.model.random_init, seed=config.seed)
    try:
        check_against_model(config, foundation.lora_adaptable(), foundation.hidden_size)
    except ConfigError as error:
        raise DeploymentError(f"{folder / CONFIG_FILE}: {error}") from None
    lora = LoraSettings.of(config.model)
    return PlannedParty(agreement, foundation, lora, deployable_plan(config, foundation, lora, agreement.sites,
                                                                     len(agreement.answers)))


def deployable_plan(config: RunConfig, foundation, lora, counts: dict[str, int], num_answers: int):
    """The run plan every party derives (``parties.plan_run``), refused in one line when it cannot be deployed:
    an algorithm whose updates do not travel, or a protocol setting the largest round cannot meet."""
    from ..federation.parties import build_protocol, plan_run

    plan = plan_run(config, foundation, lora, dict(counts), num_answers)
    if not plan.uses_protocol:
        raise DeploymentError(f"a deployment runs an algorithm whose updates travel; {config.federation.algorithm!r} "
                              "sends none (run it with 'feddat-secure run')")
    try:
        build_protocol(plan)
    except ConfigurationError as error:
        raise DeploymentError(f"secure_aggregation ({config.secure_aggregation.protocol}): {error}") from None
    return plan


def site_data(folder: Path, planned: PlannedParty, site_id: str):
    """This site's own (train, test) splits and answers, checked against the agreement's record count.

    The ``folder`` benchmark reads the site's own data from ``<folder>/data`` (``answers.txt`` and the
    site's sub-folder); a generated benchmark is rebuilt from the agreed configuration and the site keeps
    only its own part."""
    from ..data import build_benchmark
    from ..federation.parties import encode_site, site_answers

    config = planned.agreement.config
    data = config.data
    path = str(folder / DATA_DIR) if data.benchmark == "folder" else data.path
    benchmark = build_benchmark(data.benchmark, path=path, num_clients=data.num_clients,
                                train_per_client=data.train_per_client, test_per_client=data.test_per_client,
                                image_size=planned.foundation.image_size, seed=config.seed,
                                validation_fraction=data.validation_fraction,
                                question_families=data.question_families)
    client = next((c for c in benchmark.clients if c.client_id == site_id), None)
    if client is None:
        raise DeploymentError(f"{site_id}: no data of this site in the {data.benchmark!r} benchmark "
                              f"({'its folder ' + path if data.benchmark == 'folder' else 'as configured'})")
    agreed = planned.agreement.sites.get(site_id)
    if agreed != len(client.train):
        raise DeploymentError(f"{site_id}: the federation agreed on {agreed} training records for this site; its "
                              f"data holds {len(client.train)}")
    if tuple(benchmark.answers) != planned.agreement.answers:
        raise DeploymentError(f"{site_id}: this site's answer vocabulary differs from the one the federation agreed "
                              f"on ({len(benchmark.answers)} answers here, {len(planned.agreement.answers)} agreed)")
    answers = site_answers(config, benchmark, client)
    return encode_site(planned.foundation, answers, client), answers
