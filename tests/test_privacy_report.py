"""The privacy budget report: three files, a stable JSON shape, ε recomputable from the events, merged from the
ledger every party keeps in its own folder."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from PIL import Image

from feddat_secure.cli import main
from feddat_secure.config import config_from_dict, to_dict, to_toml
from feddat_secure.privacy.report import write_privacy_report
from feddat_secure.privacy.run_privacy import (
    LEDGER_FILE,
    ServerPrivacy,
    SitePrivacy,
    load_run_ledgers,
    privacy_settings,
    write_ledger,
)

SITES = {"site-0": 40, "site-1": 30, "site-2": 20}


@pytest.fixture()
def run_dir(tmp_path):
    config = config_from_dict({
        "name": "dp-run", "federation": {"rounds": 4, "aggregation": "uniform", "clients_per_round": 2},
        "audit": {"enabled": False},  # ledgers written by hand: no signed entries to check them against
        "data": {"num_clients": 3}, "training": {"local_steps": 5, "batch_size": 8},
        "privacy": {"record": {"enabled": True, "noise_multiplier": 2.0, "budget_epsilon": 20.0},
                    "client": {"placement": "central", "noise_multiplier": 1.5, "budget_epsilon": 30.0}}})
    settings = privacy_settings(config, SITES, update_dimension=100)
    sites = {cid: SitePrivacy(cid, settings.record[cid], settings.client) for cid in SITES}
    server = ServerPrivacy(settings.client)
    for round_index, participants in enumerate([["site-0", "site-1"], ["site-1", "site-2"], ["site-0", "site-2"]]):
        assert server.refusal(round_index) is None
        for cid in participants:
            assert sites[cid].refusal(round_index) is None
            sites[cid].charge_training(settings.record[cid].round_events(), round_index)
        server.charge(round_index)
    folder = tmp_path / "dp-run"
    for party, privacy in [*sites.items(), ("server", server)]:  # each party writes only its own ledger
        write_ledger(folder / "parties" / party / LEDGER_FILE, privacy.ledger())
    (folder / "config.toml").write_text(to_toml(config))
    manifest = {"base_model": {"sha256": "a" * 64}, "data": {"sha256": "b" * 64},
                "config": {"sha256": config.digest(), "resolved": to_dict(config)},
                "files": {"global_adapter/adapter_model.safetensors": "c" * 64,
                          **{p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                             for p in folder.glob(f"parties/*/{LEDGER_FILE}")}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_the_report_writes_three_files_tied_to_the_run(run_dir):
    paths = write_privacy_report(run_dir, allow_unsigned=True)
    assert [p.name for p in paths] == ["privacy_report.html", "privacy_report.md", "privacy_report.json"]
    report = json.loads((run_dir / "privacy_report.json").read_text())
    run = report["run"]
    assert run["config_sha256"] == json.loads((run_dir / "manifest.json").read_text())["config"]["sha256"]
    assert run["base_model_sha256"] == "a" * 64 and run["global_adapter_sha256"] == "c" * 64
    assert run["audit_tree_heads"] == []  # no audit log (a real run's heads: tests/test_privacy_issue12_report.py)
    markdown = (run_dir / "privacy_report.md").read_text()
    for needle in ("config SHA-256", "NOT CHECKED against signed evidence", "Participation is visible to the server",
                   "σ/√2", "site-2"):
        assert needle in markdown


def test_one_ledger_per_level_per_client_per_accountant_with_the_documented_keys(run_dir):
    write_privacy_report(run_dir, allow_unsigned=True)
    ledgers = json.loads((run_dir / "privacy_report.json").read_text())["ledgers"]
    keys = {(e["level"], e["client"], e["accountant"]) for e in ledgers}
    assert keys == {(level, cid, a) for level, cid in [("record", c) for c in SITES] + [("client", None)]
                    for a in ("rdp", "prv")}
    for entry in ledgers:
        assert {"level", "client", "accountant", "delta", "epsilon", "budget_epsilon", "events"} <= set(entry)
        for event in entry["events"]:
            assert set(event) == {"round", "noise_multiplier", "sample_rate", "steps"}
        if entry["accountant"] == "prv":
            rdp = next(e for e in ledgers if e["accountant"] == "rdp" and e["level"] == entry["level"]
                       and e["client"] == entry["client"])
            assert entry["epsilon"] <= rdp["epsilon"]
    site_2 = next(e for e in ledgers if e["client"] == "site-2" and e["accountant"] == "rdp")
    assert [e["round"] for e in site_2["events"]] == [2, 3]  # it took part in rounds 2 and 3 only
    assert site_2["remaining_epsilon"] == pytest.approx(20.0 - site_2["epsilon"])
    central = next(e for e in ledgers if e["level"] == "client" and e["accountant"] == "rdp")
    assert central["epsilon_if_participation_known"] > central["epsilon"]  # q = 2/3 amplification


def test_the_report_merges_every_partys_ledger_file_and_refuses_one_of_another_format(run_dir):
    merged = load_run_ledgers(run_dir)
    assert merged["files"] == [f"parties/{party}/{LEDGER_FILE}" for party in ("server", *SITES)]
    assert set(merged["levels"]["record"]) == set(SITES) and merged["levels"]["client"]["placement"] == "central"
    assert sorted((s["level"], s["client"] or "") for s in merged["ledgers"]) == \
        [("client", ""), *(("record", cid) for cid in SITES)]
    assert load_run_ledgers(run_dir / "parties" / "site-0") is None  # no parties/ folder there
    stale = run_dir / "parties" / "site-1" / LEDGER_FILE
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "format": "feddat-secure-privacy-ledger/1"}))
    with pytest.raises(ValueError, match="site-1"):
        load_run_ledgers(run_dir)


def test_anyone_can_recompute_epsilon_from_the_published_events(run_dir):
    write_privacy_report(run_dir, allow_unsigned=True)
    ledgers = json.loads((run_dir / "privacy_report.json").read_text())["ledgers"]
    for entry in (e for e in ledgers if e["accountant"] == "rdp"):
        accountant = RdpAccountant()
        for event in entry["events"]:
            gaussian = dp_event.GaussianDpEvent(event["noise_multiplier"])
            accountant.compose(dp_event.PoissonSampledDpEvent(event["sample_rate"], gaussian), event["steps"])
        assert entry["epsilon"] == pytest.approx(accountant.get_epsilon(entry["delta"]), rel=0.02)


def test_the_html_is_one_self_contained_file_with_the_plot_embedded(run_dir):
    write_privacy_report(run_dir, allow_unsigned=True)
    page = (run_dir / "privacy_report.html").read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing to fetch
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1))
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size[0] >= 600
    assert "What is protected, and what is not" in page


def test_a_run_without_differential_privacy_says_so(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "config.toml").write_text(to_toml(config_from_dict({"name": "plain"})))
    write_privacy_report(folder, allow_unsigned=True)
    report = json.loads((folder / "privacy_report.json").read_text())
    assert report["ledgers"] == [] and not report["run"]["finished"]
    assert "No differential privacy" in (folder / "privacy_report.md").read_text()


def test_the_command_writes_the_report_and_refuses_a_folder_that_is_no_run(run_dir, tmp_path, capsys):
    assert main(["privacy-report", str(run_dir)]) == 1  # no signed audit log to check the ledgers against
    assert main(["privacy-report", str(run_dir), "--allow-unsigned"]) == 0
    assert (run_dir / "privacy_report.html").is_file()
    assert main(["privacy-report", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err


def test_the_plot_draws_sites_with_identical_epsilon_as_one_labelled_line():
    from feddat_secure.privacy.report import _merge_identical

    same = [(1, 2.0), (2, 3.0)]
    series = [("record: a", same, False, 8.0), ("record: b", same, False, 8.0),
              ("record: c", [(1, 2.5)], False, 8.0), ("client: federation", same, True, 10.0)]
    merged = _merge_identical(series)
    assert [label for label, *_ in merged] == ["record: 2 sites (same)", "record: c", "client: federation"]
