"""Issue 12, red-team findings on the merged work.

A (understated ε against the server). Under ``placement = "distributed"``, whose claim is protection against the
server, only the server kept the client-level ledger and counted rounds: a server that called its own
``Server._round`` beyond the configured rounds got every site to train and add a Skellam share to every sum. Now
every site refuses a round beyond the configuration it agreed to, and under distributed noise holds its own
client-level ledger (charged write-ahead, to its dataset ledger too) with its own budget gate. The attacker here is
the server, driven through the runner's own parties and signed train requests.

B (forged report evidence). A site's ``dataset_ledger`` summary in its ``privacy_ledger.json`` was checked only for
``epsilon >= run ε`` when the dataset ledger is not readable (the reviewer's usual case). Now the site signs the
dataset figures into its audit log and the report compares the summary with the last signed ones. The auditor is
played with the package's own CLI on copies of one small run, each with one summary field edited and the
manifest's digest recomputed (what a forger would do).

Every ε a test states is recomputed with Google's dp_accounting.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import simulated_federation, small_config
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from feddat_secure.cli import main
from feddat_secure.federation.runner import run
from feddat_secure.privacy import GaussianEvent, compute_epsilon
from feddat_secure.privacy.budget import BudgetExceeded
from feddat_secure.privacy.client_level import SKELLAM_RDP_ORDERS
from feddat_secure.privacy.dataset_ledger import read_ledger
from feddat_secure.privacy.report import JSON_FILE, MARKDOWN_FILE
from feddat_secure.privacy.run_privacy import LEDGER_FILE, SitePrivacy, privacy_settings

pytestmark = pytest.mark.slow

SITES = ("client0", "client1", "client2")
NOISE = 1.0
DELTA = 1e-5  # the configuration's default client-level δ (checked below against the ledgers)


def distributed_config(tmp_path: Path, *, rounds: int, budget: float | str):
    return small_config(tmp_path, federation={"rounds": rounds, "aggregation": "uniform"},
                        data={"num_clients": 3, "train_per_client": 16, "test_per_client": 4},
                        training={"local_steps": 1, "batch_size": 8}, secure_aggregation={"protocol": "masked"},
                        privacy={"client": {"placement": "distributed", "clip_norm": 0.05, "noise_multiplier": NOISE,
                                            "budget_epsilon": budget}})


def google_epsilon(events: list[dict]) -> float:
    """ε of a distributed ledger's events by dp_accounting: Gaussian RDP at the Skellam bound's integer orders."""
    accountant = RdpAccountant(orders=list(SKELLAM_RDP_ORDERS))
    for event in events:
        assert event["sample_rate"] == 1.0  # no amplification is claimed against the server
        accountant.compose(dp_event.GaussianDpEvent(event["noise_multiplier"]), event["steps"])
    return accountant.get_epsilon(DELTA)


def audit_entries(site) -> list[dict]:
    return [json.loads(line) for line in site.audit.log.path.read_text().splitlines()]


# ------------------------------------------------------------------ A: the server asks for more than was agreed

def budget_between_two_and_three_rounds() -> float:
    """A client-level budget that 2 distributed rounds fit and 3 pass (the Skellam events are within 1e-5 of σ)."""
    two, three = (compute_epsilon([GaussianEvent(NOISE, 1.0, rounds)], DELTA, "rdp", rdp_orders=SKELLAM_RDP_ORDERS)
                  for rounds in (2, 3))
    return round((two + three) / 2, 3)


def test_a_server_driving_rounds_past_the_plan_gets_signed_refusals(foundation, tmp_path):
    """The red team's attack on a 1-round run: the server drives its own ``_round`` for rounds 1..4. Round 1 runs,
    charged before training to every site's own client-level ledger (signed privacy_spent) and to its dataset
    ledger; rounds 2..4 are refused by every site with one signed reason, and nothing more is trained, charged or
    added to any sum."""
    federation = simulated_federation(distributed_config(tmp_path, rounds=1, budget=50.0), foundation)
    server = federation.server
    records = [server._round(r, list(SITES), []) for r in range(4)]

    assert records[0]["trained"] == records[0]["aggregation"]["counted"] == list(SITES)
    assert records[1:] == [None] * 3  # every site refused: nothing aggregated, nothing charged
    assert all(f"{site}: round 4 is beyond the 1 rounds of the configuration this site agreed to" in server.stopped
               for site in SITES)
    for name, site in federation.sites.items():
        ledger = site.privacy.client_accountant
        assert ledger is not None and ledger.spent_rounds == [0], name
        events = [e.to_json() for e in ledger.events]
        assert ledger.epsilon() == pytest.approx(google_epsilon(events), rel=1e-3)
        refusals = [e["meta"]["reason"] for e in audit_entries(site) if e["event"] == "budget_exceeded"]
        assert refusals == [f"round {r} is beyond the 1 rounds of the configuration this site agreed to"
                            for r in range(2, 5)]
        signed = [e for e in audit_entries(site) if e["event"] == "privacy_spent"]
        assert [(e["round"], e["meta"]["level"]) for e in signed] == [(1, "client")]  # audit logs count from 1
        assert signed[-1]["meta"]["epsilon"] == ledger.epsilon()
        summary = json.loads((site.folder.path / LEDGER_FILE).read_text())["dataset_ledger"]
        dataset = read_ledger(summary["path"])  # the client-level charges reached the data owner's ledger
        assert [(c.round, c.level) for c in dataset.charges] == [(0, "client")]
        assert summary["level"] == "client" and summary["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9)
    (federation_ledger,) = server.privacy.accountants  # the server's ledger stands beside the sites'
    assert federation_ledger.spent_rounds == [0]


def test_each_site_refuses_a_distributed_round_past_its_own_budget(foundation, tmp_path):
    """The site's own gate, whatever the server says: a run whose planned rounds would pass the client-level budget
    is refused by the sites before it opens (their dataset ledgers), and a site's run ledger refuses the round that
    would pass it."""
    budget = budget_between_two_and_three_rounds()
    with pytest.raises(BudgetExceeded, match=r"client0 refuses this run: the client-level budget of this site's "
                                             r"dataset is ε = [\d.]+ \(rdp, δ = 1e-05\); it has spent 0\.000 and "
                                             r"this run's 3 planned rounds would raise it to"):
        simulated_federation(distributed_config(tmp_path, rounds=3, budget=budget), foundation)
    config = distributed_config(tmp_path, rounds=3, budget=budget)
    client = privacy_settings(config, dict.fromkeys(SITES, 16), update_dimension=1000).client
    site = SitePrivacy("client0", None, client)  # no dataset ledger: the run ledger's own gate
    assert site.client_accountant is not None and site.client_accountant.budget_epsilon == budget
    charged = 0
    while site.refusal(charged) is None:
        site.charge_ahead(charged)
        charged += 1
    assert charged == 2 and "over the budget" in site.refusal(2)
    events = [e.to_json() for e in site.client_accountant.events]
    assert site.client_accountant.epsilon() == pytest.approx(google_epsilon(events), rel=1e-3)
    assert google_epsilon(events) <= budget < google_epsilon(events + events[:1])


# ------------------------------------------------------------------ B: a forged dataset-ledger summary

@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """The runner's own distributed run: 3 sites, 1 round, each site with its own client-level ledger."""
    config = distributed_config(tmp_path_factory.mktemp("redteam"), rounds=1, budget=50.0)
    return run(config, progress=False, echo=lambda _: None).run_dir


def reviewers_copy(run_dir: Path, folder: Path) -> Path:
    """The run as a reviewer gets it: without the sites' dataset ledgers (they stay with each data owner)."""
    shutil.copytree(run_dir, folder)
    for name in ("privacy_report.html", MARKDOWN_FILE, JSON_FILE):
        (folder / name).unlink()
    for site in SITES:
        path = folder / "parties" / site / LEDGER_FILE
        ledger = json.loads(path.read_text())
        ledger["dataset_ledger"]["path"] = str(folder / "not-here" / Path(ledger["dataset_ledger"]["path"]).name)
        rewrite(folder, site, ledger)
    return folder


def rewrite(folder: Path, site: str, ledger: dict) -> None:
    """Write a site's run ledger and recompute its digest in manifest.json, as a forger would."""
    path = folder / "parties" / site / LEDGER_FILE
    path.write_text(json.dumps(ledger))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][f"parties/{site}/{LEDGER_FILE}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_report_shows_each_sites_own_ledger_beside_the_federations(distributed_run):
    report = json.loads((distributed_run / JSON_FILE).read_text())
    client = {e["client"]: e for e in report["ledgers"] if e["level"] == "client"}
    assert set(client) == {None, *SITES}
    for entry in client.values():  # the server's ledger and each site's own: every ε recomputes
        assert entry["delta"] == DELTA and entry["rounds_spent"] == 1
        assert entry["epsilon"] == pytest.approx(google_epsilon(entry["events"]), rel=1e-3)
    page = (distributed_run / "privacy_report.html").read_text()
    assert "federation (the server&#x27;s ledger)" in page
    assert all(f"{site} (the site&#x27;s own ledger)" in page for site in SITES)
    assert not report["evidence"]["mismatches"]
    assert any("against the figures it signed last in its audit log" in c for c in report["evidence"]["checks"])
    assert {d["party"]: d["level"] for d in report["dataset_ledgers"]} == dict.fromkeys(SITES, "client")


FORGERIES = {  # field: what a forger would write
    "entries": lambda v: v - 2,  # hide the last charge
    "head_sha256": lambda v: hashlib.sha256(b"an earlier head").hexdigest(),
    "epsilon": lambda v: v / 2,
    "epsilon_before_run": lambda v: v + 1.0,
    "budget_epsilon": lambda v: v * 2,
    "delta": lambda v: v * 10,
    "level": lambda v: "record",
    "dataset_sha256": lambda v: hashlib.sha256(b"other records").hexdigest(),
}


def test_every_forged_dataset_summary_field_is_refused_naming_site_and_field(distributed_run, tmp_path, capsys):
    copy = reviewers_copy(distributed_run, tmp_path / "run")
    assert main(["privacy-report", str(copy)]) == 0  # the unedited summaries match what the sites signed
    assert "dataset ledgers are not readable here" in capsys.readouterr().out + (copy / MARKDOWN_FILE).read_text()
    original = json.loads((copy / "parties" / "client1" / LEDGER_FILE).read_text())
    for field, forge in FORGERIES.items():
        ledger = json.loads(json.dumps(original))
        ledger["dataset_ledger"][field] = forge(ledger["dataset_ledger"][field])
        rewrite(copy, "client1", ledger)
        assert main(["privacy-report", str(copy)]) == 1, field
        error = capsys.readouterr().err
        assert f"client1: parties/client1/{LEDGER_FILE}: dataset ledger summary: {field}: expected " in error, field
        assert "(signed audit log, seq " in error
    rewrite(copy, "client1", original)
    assert main(["privacy-report", str(copy)]) == 0
