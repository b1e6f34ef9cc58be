"""Runs through `feddat-secure run`'s code path with secure aggregation, audit logs, checkpoints and budgets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import small_config
from safetensors.numpy import load_file

from audits import reconcile, verify_path
from feddat_secure.cli import _roster_keys, main
from feddat_secure.config import ConfigError
from feddat_secure.federation import client as client_module
from feddat_secure.federation.runner import run
from feddat_secure.federation.transport import InProcessTransport

pytestmark = pytest.mark.slow

QUIET = {"progress": False, "echo": lambda _: None}


def captured_run(tmp_path_factory, protocol: str):
    """A 1-round run of 3 sites with uniform weights (so a site's protocol input is exactly its update),
    capturing every byte string delivered to the server side (update reports, protocol messages) and
    every update the sites computed, around the runner's real code."""
    inbox, updates = [], []

    def send(self, recipient, data, original=InProcessTransport.send):
        if recipient == "server":
            inbox.append(data)
        return original(self, recipient, data)

    def account(self, recipient, data, original=InProcessTransport.account):
        if recipient == "server":
            inbox.append(data)
        return original(self, recipient, data)

    def update_vector(*args, original=client_module.update_vector):
        vector = original(*args)
        updates.append(vector.copy())
        return vector

    config = small_config(tmp_path_factory.mktemp(protocol), secure_aggregation={"protocol": protocol},
                          federation={"rounds": 1, "aggregation": "uniform"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InProcessTransport, "send", send)
        patch.setattr(InProcessTransport, "account", account)
        patch.setattr(client_module, "update_vector", update_vector)
        result = run(config, **QUIET)
    return result, inbox, updates


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {protocol: captured_run(tmp_path_factory, protocol) for protocol in ("plain", "masked", "he")}


def contains_update(inbox: list[bytes], updates: list[np.ndarray]) -> bool:
    """Does any 8-value window of any site's update (float64 or float32) appear in what the server got?"""
    received = b"".join(inbox)
    for update in updates:
        start = int(np.flatnonzero(update)[len(np.flatnonzero(update)) // 2])
        window = update[start:start + 8]
        if window.astype("<f8").tobytes() in received or window.astype("<f4").tobytes() in received:
            return True
    return False


@pytest.mark.parametrize("protocol, server_sees_updates", [("plain", True), ("masked", False), ("he", False)])
def test_the_server_side_gets_only_protocol_messages_never_a_sites_plain_update(runs, protocol,
                                                                                server_sees_updates):
    result, inbox, updates = runs[protocol]
    assert len(updates) == 3 and all(np.any(u != 0) for u in updates)
    assert contains_update(inbox, updates) == server_sees_updates
    record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["aggregation"]["protocol"] == protocol
    assert record["aggregation"]["counted"] == ["client0", "client1", "client2"]


@pytest.mark.parametrize("protocol, tolerance", [
    ("masked", 2 * 0.25 / (2**16 - 1)),  # one step of the default grid: the rounding error is below it
    ("he", 2.0**-16),  # the key holder releases multiples of 2^-16
])
def test_secure_aggregation_moves_the_global_adapter_as_plain_does_within_its_precision(runs, protocol, tolerance):
    a = load_file(str(runs["plain"][0].run_dir / "global_adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs[protocol][0].run_dir / "global_adapter" / "adapter_model.safetensors"))
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=tolerance + 1e-7)
    assert any(not np.array_equal(a[key], b[key]) for key in a)  # the protocol's encoding really happened


@pytest.mark.parametrize("protocol", ["masked", "he"])
def test_a_runs_audit_logs_verify_and_reconcile_and_show_tampering(runs, protocol, tmp_path):
    run_dir = runs[protocol][0].run_dir
    roster = _roster_keys(run_dir / "roster.json")
    report = verify_path(run_dir / "audit", roster, require_closed=True)
    assert report.ok, report.summary()
    assert reconcile(run_dir / "audit").ok
    assert main(["audit", "verify", str(run_dir / "audit")]) == 0
    assert main(["audit", "reconcile", str(run_dir)]) == 0
    copy = tmp_path / "audit"
    shutil.copytree(run_dir / "audit", copy)
    shutil.copy(run_dir / "roster.json", tmp_path / "roster.json")
    log = copy / "server.audit.jsonl"
    lines = log.read_text().splitlines()
    entry = json.loads(lines[5])
    entry["size"] = (entry.get("size") or 0) + 1
    lines[5] = json.dumps(entry, separators=(",", ":"), sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", str(copy)]) == 1


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    config = small_config(tmp_path / "whole", secure_aggregation={"protocol": "masked"})
    whole = run(config, **QUIET)

    interrupted = small_config(tmp_path / "parts", secure_aggregation={"protocol": "masked"})

    class Crash(Exception):
        pass

    def crash_in_round_2(text: str) -> None:
        if text.startswith("round   2"):
            raise Crash  # after round 2 is logged, before it is checkpointed: a crash mid-round

    with pytest.raises(Crash):
        run(interrupted, progress=False, echo=crash_in_round_2)
    with pytest.raises(ConfigError, match="already exists"):
        run(interrupted, **QUIET)
    resumed = run(interrupted, resume=True, **QUIET)

    assert [r["round"] for r in resumed.history] == [1, 2]
    lines = (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]  # round 2's first attempt is not kept
    for name in ("global_adapter/adapter_model.safetensors",
                 "clients/client1/client_adapter/adapter_model.safetensors"):
        a, b = load_file(str(whole.run_dir / name)), load_file(str(resumed.run_dir / name))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    roster = _roster_keys(resumed.run_dir / "roster.json")
    assert verify_path(resumed.run_dir / "audit", roster, require_closed=True).ok
    with pytest.raises(ConfigError, match="finished"):
        run(interrupted, resume=True, **QUIET)


def test_a_round_that_would_exceed_the_record_level_budget_is_not_run(tmp_path):
    # one round spends ε ≈ 7.9 at these settings (q = 8/32, σ/√2 per MKD batch, 3 batches): the second
    # would pass the budget of 10, so the run stops cleanly before it
    config = small_config(tmp_path, federation={"rounds": 3}, privacy={"record": {
        "enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "budget_epsilon": 10.0}})
    result = run(config, **QUIET)
    assert result.stopped.startswith("stopped before round 2") and "over the budget" in result.stopped
    assert [r["round"] for r in result.history] == [1]
    ledger = json.loads((result.run_dir / "privacy" / "ledger.json").read_text())
    record = [s for s in ledger["ledgers"] if s["level"] == "record"]
    assert len(record) == 3 and all(len(s["rounds"]) == 1 for s in record)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["finished"].startswith("stopped early")
    events = [json.loads(line)["event"] for line in (result.run_dir / "audit" / "server.audit.jsonl").open()]
    assert "budget_exceeded" in events
    assert (result.run_dir / "global_adapter" / "adapter_model.safetensors").is_file()


def test_identities_from_a_keys_folder_are_used_and_checked(tmp_path):
    keys = tmp_path / "keys"
    assert main(["keys", "create", "--out", str(keys), "--clients", "client0,client1,client2"]) == 0
    config = small_config(tmp_path, secure_aggregation={"protocol": "masked", "keys": str(keys)},
                          federation={"rounds": 1})
    result = run(config, **QUIET)
    assert (result.run_dir / "roster.json").read_text() == (keys / "roster.json").read_text()
    assert not (result.run_dir / "identities").exists()
    (keys / "client1.pem").unlink()
    with pytest.raises(ConfigError, match="client1"):
        run(small_config(tmp_path / "again", secure_aggregation={"protocol": "masked", "keys": str(keys)}), **QUIET)


def test_secure_aggregation_over_a_single_site_is_refused_before_anything_runs(tmp_path):
    config = small_config(tmp_path, federation={"clients_per_round": 1})
    with pytest.raises(ConfigError, match="secure_aggregation"):
        run(config, **QUIET)
    assert not (tmp_path / "runs" / "tiny").exists()  # no half-made run folder left behind


def test_a_resumed_dp_run_spends_exactly_what_an_uninterrupted_one_spends(tmp_path):
    privacy = {"record": {"enabled": True, "noise_multiplier": 1.5, "reproducible": True},
               "client": {"placement": "central", "clip_norm": 0.05, "noise_multiplier": 1.0, "reproducible": True}}
    whole = run(small_config(tmp_path / "whole", privacy=privacy, federation={"aggregation": "uniform"}), **QUIET)
    parts = small_config(tmp_path / "parts", privacy=privacy, federation={"aggregation": "uniform"})

    def crash_in_round_2(text: str) -> None:
        if text.startswith("round   2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(parts, progress=False, echo=crash_in_round_2)
    resumed = run(parts, resume=True, **QUIET)
    ledgers = [json.loads((r.run_dir / "privacy" / "ledger.json").read_text())["ledgers"] for r in (whole, resumed)]
    assert ledgers[0] == ledgers[1]
    assert all([spent["round"] for spent in ledger["rounds"]] == [0, 1] for ledger in ledgers[1])
    report = json.loads((resumed.run_dir / "privacy_report.json").read_text())
    assert {ledger["level"] for ledger in report["ledgers"]} == {"record", "client"}
