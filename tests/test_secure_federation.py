"""Runs through `feddat-secure run`'s code path with secure aggregation, audit logs, checkpoints and budgets; every
party keeps its own files in ``runs/<name>/parties/<party>/``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated_federation, small_config
from safetensors.numpy import load_file

from audits import reconcile, verify_path
from feddat_secure.cli import USER_ERRORS, _roster_keys, main
from feddat_secure.config import ConfigError, to_toml
from feddat_secure.federation import envelopes as E
from feddat_secure.federation import site_app
from feddat_secure.federation.party_folder import PartyFolder
from feddat_secure.federation.runner import run
from feddat_secure.federation.server_app import RoundLog
from feddat_secure.federation.simulation import InMemoryChannel
from feddat_secure.privacy.run_privacy import LEDGER_FILE, load_run_ledgers
from protocols import Outgoing, enrol_parties, load_party_identity
from protocols.identity import load_roster

pytestmark = pytest.mark.slow

QUIET = {"progress": False, "echo": lambda _: None}


def captured_run(tmp_path_factory, protocol: str):
    """A 1-round run of 3 sites with uniform weights (so a site's protocol input is exactly its update),
    capturing every byte string that passes the server (requests, replies, relayed protocol messages) and
    every update the sites computed, around the runner's real code."""
    seen, updates = [], []

    def exchange(self, requests, *, deadline_s, original=InMemoryChannel.exchange):
        replies = original(self, requests, deadline_s=deadline_s)
        seen.extend(request.data for request in requests)
        seen.extend(message.data for reply in replies for message in reply.messages or ())
        return replies

    def update_vector(*args, original=site_app.update_vector):
        vector = original(*args)
        updates.append(vector.copy())
        return vector

    config = small_config(tmp_path_factory.mktemp(protocol), secure_aggregation={"protocol": protocol},
                          federation={"rounds": 1, "aggregation": "uniform"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InMemoryChannel, "exchange", exchange)
        patch.setattr(site_app, "update_vector", update_vector)
        result = run(config, **QUIET)
    return result, seen, updates


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {protocol: captured_run(tmp_path_factory, protocol) for protocol in ("plain", "masked", "he")}


def contains_update(seen: list[bytes], updates: list[np.ndarray]) -> bool:
    """Does any 8-value window of any site's update (float64 or float32) appear in what passed the server?"""
    received = b"".join(seen)
    for update in updates:
        start = int(np.flatnonzero(update)[len(np.flatnonzero(update)) // 2])
        window = update[start:start + 8]
        if window.astype("<f8").tobytes() in received or window.astype("<f4").tobytes() in received:
            return True
    return False


@pytest.mark.parametrize("protocol, server_sees_updates", [("plain", True), ("masked", False), ("he", False)])
def test_the_server_side_gets_only_protocol_messages_never_a_sites_plain_update(runs, protocol,
                                                                                server_sees_updates):
    result, seen, updates = runs[protocol]
    assert len(updates) == 3 and all(np.any(u != 0) for u in updates)
    assert contains_update(seen, updates) == server_sees_updates
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
    parties = run_dir / "parties"
    roster = _roster_keys(run_dir / "roster.json")
    report = verify_path(parties, roster, require_closed=True)
    assert report.ok, report.summary()
    assert reconcile(parties).ok
    assert main(["audit", "verify", str(parties)]) == 0
    assert main(["audit", "reconcile", str(run_dir)]) == 0
    copy = tmp_path / "parties"
    shutil.copytree(parties, copy)
    shutil.copy(run_dir / "roster.json", tmp_path / "roster.json")
    log = copy / "server" / "server.audit.jsonl"
    lines = log.read_text().splitlines()
    entry = json.loads(lines[5])
    entry["size"] = (entry.get("size") or 0) + 1
    lines[5] = json.dumps(entry, separators=(",", ":"), sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", str(copy)]) == 1


@pytest.mark.parametrize("protocol", ["masked", "he"])
def test_each_party_keeps_its_own_key_and_log_and_records_only_its_own_exchanges(runs, protocol):
    run_dir = runs[protocol][0].run_dir
    expected = {"server", "client0", "client1", "client2", *(["keyholder"] if protocol == "he" else [])}
    roster = load_roster(run_dir / "roster.json")
    folders = {p.name: p for p in (run_dir / "parties").iterdir()}
    assert set(folders) == expected == set(roster.ids("client")) | {"server"} | set(roster.ids("keyholder"))
    for party, folder in folders.items():
        assert sorted(p.name for p in folder.glob("*.pem")) == ["identity.pem"]
        assert load_party_identity(folder, party).public_key == roster.public_key(party)
        assert sorted(p.name for p in folder.glob("*.audit.jsonl")) == [f"{party}.audit.jsonl"]
        assert (folder / "roster.json").read_text() == (run_dir / "roster.json").read_text()
        entries = [json.loads(line) for line in (folder / f"{party}.audit.jsonl").read_text().splitlines()]
        assert {e["party"] for e in entries} == {party}
        peers = {e["peer"] for e in entries if e["event"].startswith("message_")}
        # a site and the key holder talk to the server only; the server to every other party
        assert peers == (expected - {"server"} if party == "server" else {"server"})
    assert not list(run_dir.glob("*.pem")) and not (run_dir / "identities").exists()


def run_dir_of(config) -> Path:
    return Path(config.output_dir) / config.name


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
    for party in ("server", "client0", "client1", "client2"):  # each party resumes from a checkpoint of its own
        assert 1 in PartyFolder(run_dir_of(interrupted) / "parties" / party, party).checkpoints(), party
    with pytest.raises(ConfigError, match="already exists"):
        run(interrupted, **QUIET)
    resumed = run(interrupted, resume=True, **QUIET)

    assert [r["round"] for r in resumed.history] == [1, 2]
    lines = (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]  # round 2's first attempt is not kept
    for name in ("global_adapter/adapter_model.safetensors",
                 "parties/client1/client_adapter/adapter_model.safetensors"):
        a, b = load_file(str(whole.run_dir / name)), load_file(str(resumed.run_dir / name))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    roster = _roster_keys(resumed.run_dir / "roster.json")
    assert verify_path(resumed.run_dir / "parties", roster, require_closed=True).ok
    assert not list(resumed.run_dir.glob("parties/*/checkpoints"))  # a finished run keeps no checkpoint
    with pytest.raises(ConfigError, match="finished"):
        run(interrupted, resume=True, **QUIET)


def crash_in_round_2(text: str) -> None:
    if text.startswith("round   2"):  # round 2 is logged, not yet checkpointed; round 1 is
        raise KeyboardInterrupt


def test_resume_refuses_other_data_or_configuration_and_names_what_changed(tmp_path):
    config = small_config(tmp_path, secure_aggregation={"protocol": "plain"})
    with pytest.raises(KeyboardInterrupt):
        run(config, progress=False, echo=crash_in_round_2)
    more_data = small_config(tmp_path, secure_aggregation={"protocol": "plain"}, data={"train_per_client": 40})
    with pytest.raises(ConfigError, match=r"'data.train_per_client' \(32 → 40\) changed"):
        run(more_data, resume=True, **QUIET)
    provenance = run_dir_of(config) / "provenance.json"
    started = json.loads(provenance.read_text())
    provenance.write_text(json.dumps({**started, "data_sha256": "0" * 64}))  # the data changed under the same config
    with pytest.raises(ConfigError, match="the data changed since the run started"):
        run(config, resume=True, **QUIET)
    provenance.write_text(json.dumps(started))
    assert [r["round"] for r in run(config, resume=True, **QUIET).history] == [1, 2]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder_behind(tmp_path):
    config = small_config(tmp_path, secure_aggregation={"protocol": "plain"})

    def crash_in_round_1(text: str) -> None:
        raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError):
        run(config, progress=False, echo=lambda text: crash_in_round_1(text) if text.startswith("round") else None)
    assert not run_dir_of(config).exists()  # the corrected re-run is not blocked by a half-made folder
    assert run(config, **QUIET).history


# the dataset's budget (across runs) is larger than this run's, so the run starts and its own budget stops it; with
# the default (the run's budget) a run whose plan overdraws it is refused before it starts (test_privacy_issue12_...)
RECORD_BUDGET = {"record": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "budget_epsilon": 10.0,
                            "dataset_budget_epsilon": 100.0}}


def test_a_round_that_would_exceed_the_record_level_budget_is_not_run(tmp_path):
    # one round spends ε ≈ 7.9 at these settings (q = 8/32, σ/√2 per MKD batch, 3 batches): the second
    # would pass the budget of 10, so every site refuses it and the run stops cleanly before it
    config = small_config(tmp_path, federation={"rounds": 3}, privacy=RECORD_BUDGET)
    result = run(config, **QUIET)
    assert result.stopped.startswith("stopped before round 2") and "over the budget" in result.stopped
    assert [r["round"] for r in result.history] == [1]
    parties = result.run_dir / "parties"
    assert sorted(p.parent.name for p in parties.glob(f"*/{LEDGER_FILE}")) == ["client0", "client1", "client2"]
    for cid in ("client0", "client1", "client2"):  # each site keeps, and enforces, its own record-level ledger
        [ledger] = json.loads((parties / cid / LEDGER_FILE).read_text())["ledgers"]
        assert (ledger["level"], ledger["client"], len(ledger["rounds"])) == ("record", cid, 1)
        assert "budget_exceeded" in audit_events(parties / cid / f"{cid}.audit.jsonl")
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["finished"].startswith("stopped early")
    assert "budget_exceeded" in audit_events(parties / "server" / "server.audit.jsonl")
    assert (result.run_dir / "global_adapter" / "adapter_model.safetensors").is_file()


def test_the_command_line_exits_1_when_a_budget_stopped_the_run_and_still_writes_its_outputs(tmp_path, capsys):
    config = small_config(tmp_path, federation={"rounds": 3}, privacy=RECORD_BUDGET)
    path = tmp_path / "budget.toml"
    path.write_text(to_toml(config))
    assert main(["run", str(path), "--quiet"]) == 1
    assert "stopped before round 2" in capsys.readouterr().err
    assert (run_dir_of(config) / "manifest.json").is_file()


def audit_events(path) -> list[str]:
    return [json.loads(line)["event"] for line in path.open()]


def site_state(site) -> dict[str, np.ndarray]:
    model = site.trainer.model
    state = {f"head/{k}": v for k, v in model.head_state().items()}
    for name in site.trainer.kept:
        state.update({f"{name}/{k}": v for k, v in model.adapters.get_state(name).items()})
    return state


def test_a_site_refuses_to_train_past_its_own_record_level_budget_even_when_the_server_asks(foundation, tmp_path):
    federation = simulated_federation(small_config(tmp_path, federation={"rounds": 3}, privacy=RECORD_BUDGET),
                                      foundation)
    server, site = federation.server, federation.sites["client0"]
    assert server.privacy.accountants == []  # the server holds no record-level ledger: the site is the gate
    server.run(RoundLog(write=lambda record: record, echo=lambda _: None))
    assert [r["round"] for r in server.history] == [1] and "over the budget" in server.stopped

    before, ledger = site_state(site), site.folder.ledger.read_text()
    spent = list(site.privacy.record_accountant.rounds)
    arrays = E.state_arrays(server.global_state)
    fields = {"model_sha256": E.model_digest(arrays), "send_update": True, **server.privacy.train_terms(3)}
    insisting = server.stamp.envelope(E.TRAIN, 2, "client0", fields, arrays)  # round 3: asked all the same
    [reply] = federation.channel.exchange([Outgoing("client0", insisting)], deadline_s=60.0)
    [answer] = reply.messages
    report = server.stamp.open(answer.data, session=server.stamp.session)
    assert report.stage == E.UPDATE and "over the budget" in report.fields["refused"]
    assert report.fields["epsilon"] == {} and report.fields["losses"] is None  # under DP a site keeps its metrics
    after = site_state(site)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    assert site.privacy.record_accountant.rounds == spent and len(spent) == 1
    assert site.folder.ledger.read_text() == ledger
    assert audit_events(site.folder.audit_log).count("budget_exceeded") == 2  # round 2, and round 3


def test_identities_from_a_keys_folder_are_used_and_checked(tmp_path):
    keys = tmp_path / "keys"
    enrol_parties(keys, [("server", "server"), ("client0", "client"), ("client1", "client"), ("client2", "client")])
    config = small_config(tmp_path, secure_aggregation={"protocol": "masked", "keys": str(keys)},
                          federation={"rounds": 1})
    result = run(config, **QUIET)
    assert (result.run_dir / "roster.json").read_text() == (keys / "roster.json").read_text()
    assert not list(result.run_dir.rglob("*.pem"))  # the keys stay where their owners keep them
    roster = _roster_keys(keys / "roster.json")
    assert verify_path(result.run_dir / "parties", roster, require_closed=True).ok  # signed with those keys
    (keys / "client1" / "identity.pem").unlink()
    with pytest.raises(USER_ERRORS, match="client1"):  # one line on the command line, exit code 2
        run(small_config(tmp_path / "again", secure_aggregation={"protocol": "masked", "keys": str(keys)}), **QUIET)


def test_secure_aggregation_over_a_single_site_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="secure_aggregation"):  # at load time, or at the latest before any folder
        run(small_config(tmp_path, federation={"clients_per_round": 1}), **QUIET)
    assert not (tmp_path / "runs" / "tiny").exists()  # no half-made run folder left behind


def test_a_resumed_dp_run_spends_what_an_uninterrupted_one_spends_plus_the_interrupted_release(tmp_path):
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
    ledgers = [load_run_ledgers(r.run_dir)["ledgers"] for r in (whole, resumed)]
    assert sorted((ledger["level"], ledger["client"] or "") for ledger in ledgers[1]) == \
        [("client", ""), ("record", "client0"), ("record", "client1"), ("record", "client2")]
    for whole_ledger, resumed_ledger in zip(*ledgers):
        # every party's ledger was charged before round 2's first release (write-ahead), and the retry after the
        # resume is a second release, charged again
        assert [spent["round"] for spent in resumed_ledger["rounds"]] == [0, 1, 1]
        assert resumed_ledger["rounds"] == [*whole_ledger["rounds"], whole_ledger["rounds"][1]]
    report = json.loads((resumed.run_dir / "privacy_report.json").read_text())
    assert {ledger["level"] for ledger in report["ledgers"]} == {"record", "client"}
    # each site's own metrics (withheld under DP) hold every round once: the interrupted round 2 is kept once
    kept = (resumed.run_dir / "parties" / "client0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in kept] == [1, 2]
