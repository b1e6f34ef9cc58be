"""Issue 12, item 2: under differential privacy nothing a site computes from its records leaves it outside an
accounted mechanism. A site's training losses (exact, from its training records), the count of update entries
the protocol clipped (from its update) and its test accuracies (under FedDAT from the never-noised client adapter
and local head) are no output of any DP mechanism: sent to the server they would void the protection that local
and distributed noise claim against it. The attacker is the server: everything it received (each reply's bytes,
read as the server reads them), its audit log and the run's ``metrics.jsonl`` hold none of them, while each site
keeps them in its own folder; with ``privacy.share_site_metrics = true`` they travel, and every site's ledger
names them as unprotected releases; without DP nothing changes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import simulated_federation, small_config

from feddat_secure.config import ConfigError, config_from_dict
from feddat_secure.federation import envelopes as E
from feddat_secure.federation.runner import run
from feddat_secure.federation.server_app import RoundLog
from feddat_secure.federation.simulation import InMemoryChannel
from feddat_secure.privacy.run_privacy import LEDGER_FILE, SitePrivacy, load_run_ledgers, privacy_settings
from protocols.wire import peek

pytestmark = pytest.mark.slow

SITES = ("client0", "client1", "client2")
LOCAL = {"client": {"placement": "local", "clip_norm": 0.5, "noise_multiplier": 1.0}}
DP_RUNS = {
    "client level, local noise": (LOCAL, "plain"),
    "client level, distributed noise": ({"client": {"placement": "distributed", "clip_norm": 0.05,
                                                    "noise_multiplier": 1.0}}, "masked"),
    "record level": ({"record": {"enabled": True, "noise_multiplier": 1.0}}, "plain"),
}


def one_round(tmp_path: Path, privacy: dict, protocol: str = "plain", **extra) -> dict:
    """A one-round, 3-site FedDAT configuration (uniform weights, as client-level DP requires)."""
    return small_config(tmp_path, federation={"rounds": 1, "aggregation": "uniform"},
                        data={"train_per_client": 16, "test_per_client": 4}, training={"local_steps": 1},
                        secure_aggregation={"protocol": protocol},
                        **({"privacy": privacy} if privacy else {}), **extra)


def run_as_the_server_sees_it(config, monkeypatch) -> tuple:
    """Run ``config`` and keep every reply the server received, as bytes; also what the run printed."""
    received: list[bytes] = []
    exchange = InMemoryChannel.exchange

    def recording(self, requests, *, deadline_s):
        replies = exchange(self, requests, deadline_s=deadline_s)
        received.extend(m.data for reply in replies for m in reply.messages or () if m.recipient == "server")
        return replies

    monkeypatch.setattr(InMemoryChannel, "exchange", recording)
    printed: list[str] = []
    result = run(config, progress=False, echo=printed.append)
    return result, received, printed


def runner_replies(received: list[bytes], stage: str) -> list[dict]:
    """The fields of every runner reply of ``stage`` among the server's received bytes (read as the server
    reads them: the signature proves who sent them, the fields are what it learns)."""
    headers = [peek(data) for data in received]
    return [dict(h.fields) for h in headers if h is not None and h.protocol == E.PROTOCOL and h.stage == stage]


def site_lines(run_dir: Path, site: str) -> list[dict]:
    path = run_dir / "parties" / site / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("level", DP_RUNS)
def test_under_dp_the_server_receives_no_loss_clipped_count_or_accuracy_and_each_site_keeps_its_own(
        tmp_path, monkeypatch, level):
    privacy, protocol = DP_RUNS[level]
    result, received, printed = run_as_the_server_sees_it(one_round(tmp_path, privacy, protocol), monkeypatch)

    updates, evaluations = runner_replies(received, E.UPDATE), runner_replies(received, E.METRICS)
    assert len(updates) == len(evaluations) == len(SITES)
    for fields in updates:  # the example count (public) and ε (from public parameters) travel, nothing else
        assert fields["losses"] is None and fields["clipped"] is None and fields["refused"] is None
    assert all(fields == {"metrics": None} for fields in evaluations)
    # The server's audit log holds digests of exactly those replies (and of its own sends), never their content.
    audit = [json.loads(line) for line in (result.run_dir / "parties/server/server.audit.jsonl").read_text()
             .splitlines()]
    digests = {hashlib.sha256(data).hexdigest() for data in received}
    assert {e["digest"] for e in audit if e["event"] == "message_received"} == digests
    # The run's metrics.jsonl (the server's records) says withheld, with null where the values would be.
    [record] = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["site_metrics"] == "withheld"
    assert (record["mean"], record["train_loss"], record["clipped"]) == (None, None, None)
    assert record["clients"] == dict.fromkeys(SITES)  # who evaluated, not what they measured

    # Each site kept what it computed, in its own folder: the data owner still sees it.
    for site in SITES:
        [kept] = site_lines(result.run_dir, site)
        assert kept["round"] == 1 and set(kept["accuracy"]) == {"dat", "shared", "client"}
        assert kept["clipped"] == 0
        # record-level DP-SGD computes no loss at all; without it the exact losses stay here
        assert bool(kept["train_loss"]) == (level != "record level")
    # The operator of a simulation is every party: the printed table and final_mean come from the sites' folders,
    # labelled as such.
    assert any(line.startswith("round   1  accuracies withheld by the sites") for line in printed)
    assert any("read from the sites' folders; the server did not receive them" in line for line in printed)
    kept = [site_lines(result.run_dir, site)[0]["accuracy"]["dat"] for site in SITES]
    assert result.final_mean["dat"] == pytest.approx(sum(kept) / len(kept))


def test_a_site_that_sends_its_metrics_against_the_agreement_is_refused_and_nothing_of_it_is_recorded(
        foundation, tmp_path):
    federation = simulated_federation(one_round(tmp_path, LOCAL), foundation)
    federation.sites["client1"].privacy.withholds_metrics = False  # this site reports what the others keep
    server = federation.server
    server.run(RoundLog(write=lambda record: record, echo=lambda _: None))
    [record] = server.history
    assert record["trained"] == ["client0", "client2"]  # its update report was refused: it took no part
    assert record["clients"] == {"client0": None, "client2": None}  # and its accuracies were not taken
    assert record["mean"] is None
    audit = [json.loads(line) for line in server.audit.log.path.read_text().splitlines()]
    refused = [(e["event"], e["stage"]) for e in audit if e.get("peer") == "client1" and e["event"] in
               ("party_dropped", "message_rejected")]
    assert refused == [("message_rejected", f"{E.PROTOCOL}:{E.UPDATE}"),
                       ("message_rejected", f"{E.PROTOCOL}:{E.METRICS}")]


def test_with_share_site_metrics_they_reach_the_server_and_every_sites_ledger_lists_them(tmp_path, monkeypatch):
    config = one_round(tmp_path, {**LOCAL, "share_site_metrics": True})
    result, received, printed = run_as_the_server_sees_it(config, monkeypatch)
    [record] = result.history
    assert "site_metrics" not in record and set(record["clients"]) == set(SITES)
    assert all(set(accuracies) == {"dat", "shared", "client"} for accuracies in record["clients"].values())
    assert set(record["train_loss"]) == set(SITES) and record["clipped"] == dict.fromkeys(SITES, 0)
    assert all(fields["metrics"] is not None for fields in runner_replies(received, E.METRICS))
    releases = ["train_loss", "clipped", "test_accuracy"]
    for site in SITES:
        ledger = json.loads((result.run_dir / "parties" / site / LEDGER_FILE).read_text())
        assert ledger["unprotected_releases"] == releases
        assert not site_lines(result.run_dir, site)  # nothing withheld, so no second copy
    assert load_run_ledgers(result.run_dir)["unprotected_releases"] == dict.fromkeys(SITES, releases)
    assert not any("read from the sites' folders" in line for line in printed)


def test_the_unprotected_releases_are_what_the_site_computes_outside_a_mechanism():
    config = config_from_dict({"data": {"num_clients": 2}, "federation": {"aggregation": "uniform"},
                               "privacy": {"record": {"enabled": True}, "share_site_metrics": True}})
    settings = privacy_settings(config, {"a": 32, "b": 32}, update_dimension=10)
    # record-level DP-SGD computes no training loss; a site that sends no update has nothing clipped
    assert SitePrivacy("a", settings.record["a"], None, share_site_metrics=True).unprotected_releases == \
        ("clipped", "test_accuracy")
    assert SitePrivacy("a", settings.record["a"], None, share_site_metrics=True,
                       sends_updates=False).unprotected_releases == ("test_accuracy",)
    withheld = SitePrivacy("a", settings.record["a"], None)
    assert withheld.withholds_metrics and withheld.unprotected_releases == ()
    assert not SitePrivacy("a", None, None, share_site_metrics=True).unprotected_releases  # no DP: nothing to list
    with pytest.raises(ConfigError, match="privacy.share_site_metrics"):
        config_from_dict({"privacy": {"share_site_metrics": True}})


def test_without_dp_nothing_changes(tmp_path, monkeypatch):
    result, received, printed = run_as_the_server_sees_it(one_round(tmp_path, None), monkeypatch)
    [record] = result.history
    assert "site_metrics" not in record and set(record["mean"]) == {"dat", "shared", "client"}
    assert set(record["train_loss"]) == set(SITES) and set(record["clipped"]) == set(SITES)
    assert all(isinstance(fields["losses"], dict) and isinstance(fields["clipped"], int)
               for fields in runner_replies(received, E.UPDATE))
    for site in SITES:  # no ledger and no metrics file of its own
        assert not (result.run_dir / "parties" / site / LEDGER_FILE).exists() and not site_lines(result.run_dir, site)
    assert result.final_mean == record["mean"]
