"""The privacy report of a real run: every ε it prints recomputes with dp_accounting, and a ledger that does not
match the run's signed evidence (manifest digest, the parties' signed privacy_spent entries) is refused, exit 1,
naming the party and the file. The auditor is played with the package's own CLI on a copy of one small run."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from scipy import stats

from feddat_secure.cli import main
from feddat_secure.federation.runner import run
from feddat_secure.privacy.evidence import SIGNED_UNCHECKED, check_ledgers
from feddat_secure.privacy.report import JSON_FILE, MARKDOWN_FILE, build_report
from feddat_secure.privacy.run_privacy import LEDGER_FILE, load_run_ledgers
from tests.conftest import small_config

QUIET = {"progress": False, "echo": lambda _: None}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Record-level DP-SGD and central client-level DP with 2 of 3 sites per round (q < 1): 2 rounds."""
    privacy = {"record": {"enabled": True, "noise_multiplier": 1.5, "budget_epsilon": 50},
               "client": {"placement": "central", "clip_norm": 0.05, "noise_multiplier": 1.0, "budget_epsilon": 50}}
    config = small_config(tmp_path_factory.mktemp("report"), privacy=privacy,
                          federation={"aggregation": "uniform", "clients_per_round": 2, "rounds": 2})
    return run(config, **QUIET).run_dir


@pytest.fixture()
def copy_of_run(finished_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    for name in ("privacy_report.html", MARKDOWN_FILE, JSON_FILE):
        (folder / name).unlink()
    return folder


def _pld(events, delta, relation=NeighboringRelation.ADD_OR_REMOVE_ONE, *, group=None, interval=1e-2):
    accountant = PLDAccountant(relation, value_discretization_interval=interval)
    for e in events:
        if group is None:
            event = dp_event.PoissonSampledDpEvent(e["sample_rate"], dp_event.GaussianDpEvent(e["noise_multiplier"]))
        else:
            probabilities = [stats.binom.pmf(j, group, e["sample_rate"]) for j in range(group + 1)]
            event = dp_event.MixtureOfGaussiansDpEvent(e["noise_multiplier"], list(range(group + 1)), probabilities)
        accountant.compose(event, e["steps"])
    return accountant.get_epsilon(delta)


def _rdp(events, delta, *, q_one=False):
    accountant = RdpAccountant()
    for e in events:
        gaussian = dp_event.GaussianDpEvent(e["noise_multiplier"])
        accountant.compose(gaussian if q_one else dp_event.PoissonSampledDpEvent(e["sample_rate"], gaussian),
                           e["steps"])
    return accountant.get_epsilon(delta)


def test_every_epsilon_of_a_real_runs_report_recomputes_with_dp_accounting(finished_run):
    report = json.loads((finished_run / JSON_FILE).read_text())
    by_ledger = {(e["level"], e["client"], e["accountant"]): e for e in report["ledgers"]}
    central = by_ledger[("client", None, "rdp")]
    assert central["events"][0]["sample_rate"] == pytest.approx(2 / 3)  # amplification by site sampling claimed
    for (level, client, name), entry in by_ledger.items():
        events, delta = entry["events"], entry["delta"]
        independent = _rdp(events, delta) if name == "rdp" else _pld(events, delta, interval=1e-3)
        assert entry["epsilon"] == pytest.approx(independent, rel=0.01), (level, client, name)
        if level == "client":  # participation known: the same events without amplification, both accountants
            known = _rdp(events, delta, q_one=True) if name == "rdp" else _pld(
                [{**e, "sample_rate": 1.0} for e in events], delta, interval=1e-3)
            assert entry["epsilon_if_participation_known"] == pytest.approx(known, rel=0.01)
            assert entry["epsilon_if_participation_known"] > entry["epsilon"]
    for other in report["other_neighbours"]:
        events = by_ledger[(other["level"], other["client"], "rdp")]["events"]
        replace = _pld(events, other["delta"], NeighboringRelation.REPLACE_ONE)
        assert other["replace_one_epsilon"] == pytest.approx(replace, rel=0.01)
        if events:  # a site the Poisson draw never picked has spent nothing
            assert other["replace_one_epsilon"] > by_ledger[(other["level"], other["client"], "prv")]["epsilon"]
    worst = max((o for o in report["other_neighbours"] if o["level"] == "record"),
                key=lambda o: o["group_epsilon"]["2"])
    events = by_ledger[("record", worst["client"], "rdp")]["events"]
    single = by_ledger[("record", worst["client"], "prv")]["epsilon"]
    # a group of one is the plain subsampled Gaussian: the mixture construction agrees with PLD's own event
    assert _pld(events, worst["delta"], group=1) == pytest.approx(_pld(events, worst["delta"]), rel=0.01)
    for size in ("2", "5", "10"):
        recomputed = _pld(events, worst["delta"], group=int(size), interval=0.005 * int(size))
        assert worst["group_epsilon"][size] == pytest.approx(recomputed, rel=0.01)
        assert worst["group_epsilon"][size] >= recomputed  # a coarser grid only rounds ε up, never below a finer one
    assert single < worst["group_epsilon"]["2"] < worst["group_epsilon"]["5"] < worst["group_epsilon"]["10"]
    headline = (finished_run / MARKDOWN_FILE).read_text().split("## Headline")[1].split("## Run")[0]
    central_known = f"{central['epsilon_if_participation_known']:.3f}"
    assert central_known in headline and f"{worst['group_epsilon']['10']:.3f}" in headline


def _busiest_site(run_dir) -> tuple[str, int]:
    """(the site that trained in most rounds, how many): participation is a Poisson draw."""
    ledgers = load_run_ledgers(run_dir)["ledgers"]
    site = max((s for s in ledgers if s["level"] == "record"), key=lambda s: len(s["rounds"]))
    return site["client"], len(site["rounds"])


def test_deleting_rounds_and_raising_sigma_in_a_ledger_is_refused_naming_the_party(copy_of_run, capsys):
    site, charges = _busiest_site(copy_of_run)
    path = copy_of_run / "parties" / site / LEDGER_FILE
    ledger = json.loads(path.read_text())
    for state in ledger["ledgers"]:
        state["rounds"] = state["rounds"][:1]
        for event in state["rounds"][0]["events"]:
            event["noise_multiplier"] *= 3
    path.write_text(json.dumps(ledger))
    assert main(["privacy-report", str(copy_of_run)]) == 1
    error = capsys.readouterr().err
    assert f"{site}: parties/{site}/privacy_ledger.json: SHA-256 against manifest.json" in error
    if charges > 1:
        assert f"number of charges: expected {charges} (signed audit log), found 1" in error
    else:
        assert "ε after the charge: expected" in error
    assert not (copy_of_run / JSON_FILE).exists()  # nothing written from a ledger that does not match


def test_a_forger_who_also_rewrites_the_manifest_is_caught_by_the_signed_privacy_spent_entries(copy_of_run, capsys):
    path = copy_of_run / "parties" / "server" / LEDGER_FILE
    ledger = json.loads(path.read_text())
    for spent in ledger["ledgers"][0]["rounds"]:
        for event in spent["events"]:
            event["noise_multiplier"] *= 3
    path.write_text(json.dumps(ledger))
    manifest = json.loads((copy_of_run / "manifest.json").read_text())
    manifest["files"][f"parties/server/{LEDGER_FILE}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (copy_of_run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["privacy-report", str(copy_of_run)]) == 1
    lines = capsys.readouterr().err.splitlines()[1:]
    assert len(lines) == 2 and all(line.strip().startswith("server: parties/server/privacy_ledger.json: "
                                                           "client-level ledger: charge for round") for line in lines)
    assert "ε after the charge: expected" in lines[0] and "(signed audit log)" in lines[0]


def test_an_edited_privacy_spent_entry_fails_the_audit_logs_signature(copy_of_run, capsys):
    site, _ = _busiest_site(copy_of_run)
    log = copy_of_run / "parties" / site / f"{site}.audit.jsonl"
    lines = log.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"privacy_spent"' in line)
    entry = json.loads(lines[index])
    entry["meta"]["epsilon"] = entry["meta"]["epsilon"] / 3  # what a forged, cheaper ledger would need
    lines[index] = json.dumps(entry, separators=(",", ":"), sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    assert main(["privacy-report", str(copy_of_run)]) == 1
    error = capsys.readouterr().err
    assert f"{site}: parties/{site}/{site}.audit.jsonl: audit log verification: expected intact" in error
    assert "signature does not verify" in error


def test_a_ledger_file_whose_digest_differs_from_the_manifest_is_refused(copy_of_run, capsys):
    path = copy_of_run / "parties" / "client2" / LEDGER_FILE
    path.write_text(json.dumps(json.loads(path.read_text())))  # same ledger, other bytes
    assert main(["privacy-report", str(copy_of_run)]) == 1
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 2 and error[1].strip().startswith(
        "client2: parties/client2/privacy_ledger.json: SHA-256 against manifest.json: expected ")
    (copy_of_run / "manifest.json").unlink()  # an unfinished run: the digest check cannot run, and says so
    report = build_report(copy_of_run)
    assert any(line.startswith("manifest.json is not written yet") for line in report["evidence"]["unchecked"])


def test_a_run_without_audit_logs_is_refused_unless_the_reviewer_accepts_unsigned_ledgers(copy_of_run, capsys):
    for log in (copy_of_run / "parties").glob("*/*.audit.jsonl"):
        log.unlink()
    files = load_run_ledgers(copy_of_run)["files"]
    manifest = json.loads((copy_of_run / "manifest.json").read_text())
    check = check_ledgers(copy_of_run, files, manifest=manifest, audit_enabled=False)
    assert [m.what for m in check.mismatches] == ["signed evidence for the ledgers"]
    check = check_ledgers(copy_of_run, files, manifest=manifest, audit_enabled=False, allow_unsigned=True)
    assert not check.mismatches and SIGNED_UNCHECKED in check.unchecked
    assert check.checks[0] == "every ledger file's SHA-256 against manifest.json (written when the run finished)"
    assert not any("audit" in line for line in check.checks)
    assert len(check.ledger_sha256) == 4
    assert main(["privacy-report", str(copy_of_run), "--allow-unsigned"]) == 1  # the run says it kept logs
    assert "found no audit logs" in capsys.readouterr().err
    manifest["config"]["resolved"]["audit"]["enabled"] = False  # a run that really kept none
    (copy_of_run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["privacy-report", str(copy_of_run)]) == 1
    assert main(["privacy-report", str(copy_of_run), "--allow-unsigned"]) == 0
    assert "NOT CHECKED against signed evidence" in (copy_of_run / MARKDOWN_FILE).read_text()


def test_the_runs_unsigned_configuration_cannot_switch_the_signed_checks_off(copy_of_run, capsys):
    """The red team's forgery: ledgers cut to one round with σ tripled, audit.enabled = false written into the
    (unsigned) manifest and config, the manifest's digests recomputed. The signed logs are still there: checked."""
    for path in (copy_of_run / "parties").glob(f"*/{LEDGER_FILE}"):
        content = json.loads(path.read_text())
        for ledger in content["ledgers"]:
            ledger["rounds"] = [{**r, "events": [{**e, "noise_multiplier": 3 * e["noise_multiplier"]}
                                                 for e in r["events"]]} for r in ledger["rounds"][:1]]
        path.write_text(json.dumps(content))
    manifest_path = copy_of_run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["resolved"]["audit"]["enabled"] = False
    for name in manifest["files"]:
        if (copy_of_run / name).is_file():
            manifest["files"][name] = hashlib.sha256((copy_of_run / name).read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    assert main(["privacy-report", str(copy_of_run)]) == 1
    assert "number of charges" in capsys.readouterr().err


def test_the_report_reads_as_a_reviewer_needs(finished_run):
    report = json.loads((finished_run / JSON_FILE).read_text())
    assert report["software"]["dp-accounting"] and report["software"]["opacus"] and report["generated"]
    assert report["run"]["started"] < report["run"]["ended"]
    assert {f["party"] for f in report["run"]["ledger_files"]} == {"server", "client0", "client1", "client2"}
    page = (finished_run / "privacy_report.html").read_text()
    assert "σ/√k" in page and "σ/√steps" not in page and "in grid steps" not in page  # central: no grid
    run_table = page.split("<h2>Run</h2>")[1].split("</table>")[0]
    assert "<thead>" not in run_table and "<th></th>" not in run_table
    assistant = "\n".join(report["assumptions"])
    for needle in ("(image, question, answer)", "replaced by nothing", "Composition across runs",
                   "number of training records", "timing"):
        assert needle in assistant
    assert "zero update" not in assistant


def test_a_dataset_ledger_that_lost_this_runs_charges_is_refused(copy_of_run, capsys):
    """The auditor on the data owner's machine: the site's dataset ledger (outside the run folder) must still hold
    every charge this run made; cutting its last charges, or any edit, makes the report refuse."""
    summaries = {site: json.loads((copy_of_run / "parties" / site / LEDGER_FILE).read_text())["dataset_ledger"]
                 for site in ("client0", "client1", "client2")}
    site, summary = max(summaries.items(), key=lambda item: item[1]["entries"])  # a site that was sampled
    ledger = Path(summary["path"])
    original = ledger.read_bytes()
    lines = original.splitlines(keepends=True)
    try:
        ledger.write_bytes(b"".join(lines[:-2]))  # the last charge and the tree head after it: a valid shorter log?
        assert main(["privacy-report", str(copy_of_run)]) == 1
        assert f"{site}: parties/{site}/privacy_ledger.json: dataset ledger" in capsys.readouterr().err
        # an edited entry: the first charge's round moved (whichever rounds this site was sampled in: the sampling
        # is random, and a site sampled in round 2 only holds no '"round":1')
        edited = re.sub(rb'"round":(\d+)', lambda found: b'"round":%d' % (int(found.group(1)) + 7), original, count=1)
        assert edited != original
        ledger.write_bytes(edited)
        assert main(["privacy-report", str(copy_of_run)]) == 1
        assert "dataset ledger" in capsys.readouterr().err
    finally:
        ledger.write_bytes(original)
    assert main(["privacy-report", str(copy_of_run)]) == 0
