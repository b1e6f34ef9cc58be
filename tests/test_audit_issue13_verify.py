"""``feddat-secure audit verify`` on a finished run, safe by default (issue 13, faults 1-3): tampered copies of
one real HE run (so there is a key holder), each failing with exit 1 and a message naming the party and the
problem, and the intact run passing.

The attacker holds the run folder: it can cut, delete and rewrite logs, re-sign a party's log with that party's
key (``parties/<party>/identity.pem``), and replace the roster and every log with a run of its own."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import small_config
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from audits import check_log, merkle
from audits.entries import ENTRY_CONTEXT, SignedTreeHead, canonical_json
from feddat_secure.cli import main
from feddat_secure.federation.runner import run
from feddat_secure.federation.simulation import InMemoryChannel
from protocols.identity import load_roster
from protocols.wire import peek

QUIET = {"progress": False, "echo": lambda _: None}
KEEP = shutil.ignore_patterns("base_model", "*_adapter", "*.safetensors")  # only what verify reads


def _he_run(folder: Path, *, replay_aggregate: bool) -> Path:
    """A 1-round HE run. ``replay_aggregate``: someone on the wire delivers the server's ``he:aggregate`` request
    to the key holder a second time; the key holder refuses it (a real refusal in its log)."""
    config = small_config(folder, secure_aggregation={"protocol": "he"}, federation={"rounds": 1})
    if not replay_aggregate:
        return run(config, **QUIET).run_dir

    def exchange(self, requests, *, deadline_s, original=InMemoryChannel.exchange):
        replies = original(self, requests, deadline_s=deadline_s)
        for request in requests:
            header = peek(request.data)
            if request.recipient == "keyholder" and header is not None and header.stage == "aggregate":
                self.endpoints["keyholder"].handle(request.data)
        return replies

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InMemoryChannel, "exchange", exchange)
        return run(config, **QUIET).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return {"original": _he_run(tmp_path_factory.mktemp("original"), replay_aggregate=True),
            "attacker": _he_run(tmp_path_factory.mktemp("attacker"), replay_aggregate=False)}


@pytest.fixture
def run_dir(runs, tmp_path) -> Path:
    """A fresh copy of the original run (its logs, roster, manifest and keys) to tamper with."""
    return Path(shutil.copytree(runs["original"], tmp_path / "run", ignore=KEEP))


def pin(run_dir: Path) -> str:
    return load_roster(run_dir / "roster.json").digest


def verify(run_dir: Path, capsys, *args: str) -> tuple[int, str]:
    code = main(["audit", "verify", str(run_dir), "--all", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def log_of(run_dir: Path, party: str) -> Path:
    return run_dir / "parties" / party / f"{party}.audit.jsonl"


def reseal(path: Path, key_file: Path, edit) -> None:
    """What an attacker with the party's key does: ``edit(entry)`` changes entries (a dict, in place), then every
    entry from the first change on is re-chained and re-signed and every tree head over them recomputed."""
    key = load_pem_private_key(key_file.read_bytes(), password=None)
    entries = [json.loads(line) for line in path.read_bytes().splitlines()]
    lines, leaves, prev = [], [], "0" * 64
    for entry in entries:
        edit(entry)
        entry["prev"] = prev
        if entry["event"] == "tree_head":
            entry["sth"] = SignedTreeHead.sign(key, entry["party"], len(leaves), merkle.root(leaves),
                                               entry["time"]).to_dict()
        body = {k: v for k, v in entry.items() if k != "sig"}
        entry["sig"] = key.sign(ENTRY_CONTEXT + canonical_json(body)).hex()
        line = canonical_json(entry)
        lines.append(line)
        leaves.append(merkle.leaf_hash(line))
        prev = hashlib.sha256(line).hexdigest()
    path.write_bytes(b"".join(line + b"\n" for line in lines))


# ------------------------------------------------------------------------------------------ the intact run


def test_the_intact_run_verifies_by_default_and_says_which_roster_it_used(run_dir, capsys):
    code, out = verify(run_dir, capsys, "--roster-sha256", pin(run_dir))
    assert code == 0, out
    assert f"roster: {run_dir / 'roster.json'} (sha256 {pin(run_dir)})" in out
    assert "every final tree head as the run's record holds it (5 parties)" in out
    assert "not pinned" not in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["audit"]["roster_sha256"] == pin(run_dir)
    assert set(manifest["audit"]["parties"]) == {"server", "keyholder", "client0", "client1", "client2"}


def test_the_key_holder_exchanges_tree_heads_with_the_server_every_round_and_at_close(run_dir):
    held = [json.loads(line) for line in log_of(run_dir, "server").read_text().splitlines()]
    heads = [entry for entry in held if entry["event"] == "peer_tree_head" and entry["peer"] == "keyholder"]
    assert len(heads) == 2  # round 1 and the close


# -------------------------------------------------------------------------------------- fault 1: truncation


def test_a_log_cut_after_its_last_exchanged_tree_head_fails(run_dir, capsys):
    server = log_of(run_dir, "server")
    server.write_bytes(b"".join(line + b"\n" for line in server.read_bytes().splitlines()[:-3]))
    code, out = verify(run_dir, capsys, "--roster-sha256", pin(run_dir))
    assert code == 1
    assert "NOT INTACT" in out and "the log of 'server' ends without its final tree head" in out
    assert "it was cut" in out


def test_a_finished_run_without_its_manifest_fails_unless_allowed_as_unfinished(run_dir, capsys):
    (run_dir / "manifest.json").unlink()
    code, out = verify(run_dir, capsys, "--roster-sha256", pin(run_dir))
    assert code == 1 and "has no record of a finished run" in out and "--allow-unfinished" in out
    code, out = verify(run_dir, capsys, "--roster-sha256", pin(run_dir), "--allow-unfinished")
    assert code == 0 and "unfinished run (no manifest)" in out and "could not be checked" in out


def test_allow_unfinished_never_relaxes_a_finished_run(run_dir, capsys):
    server = log_of(run_dir, "server")
    server.write_bytes(b"".join(line + b"\n" for line in server.read_bytes().splitlines()[:-3]))
    code, out = verify(run_dir, capsys, "--roster-sha256", pin(run_dir), "--allow-unfinished")
    assert code == 1 and "the log of 'server' ends without its final tree head" in out


# ---------------------------------------------------------------------------------- fault 2: a party's log


def test_a_deleted_key_holder_log_fails_naming_the_key_holder(run_dir, capsys):
    log_of(run_dir, "keyholder").unlink()
    code, out = verify(run_dir, capsys, "--roster-sha256", pin(run_dir))
    assert code == 1
    assert "no log of party 'keyholder': the run finished and recorded its log" in out


def test_a_key_holder_refusal_rewritten_as_accepted_fails(run_dir, capsys):
    keyholder = log_of(run_dir, "keyholder")
    refusals = [json.loads(line) for line in keyholder.read_text().splitlines()
                if json.loads(line)["event"] == "message_rejected"]
    assert len(refusals) == 1 and refusals[0]["stage"] == "he:aggregate"  # the replayed request, refused

    def accept(entry: dict) -> None:
        if entry["event"] == "message_rejected":
            entry["event"], entry["meta"] = "message_received", {}

    reseal(keyholder, run_dir / "parties" / "keyholder" / "identity.pem", accept)
    roster = {entry.party_id: entry.public_key for entry in load_roster(run_dir / "roster.json").entries}
    assert check_log(keyholder, roster).ok  # on its own the forged log is well formed and signed
    code, out = verify(run_dir, capsys, "--roster-sha256", pin(run_dir))
    assert code == 1
    assert "the log of 'keyholder' (keyholder.audit.jsonl) does not match its signed tree head" in out  # server's
    assert "the log of 'keyholder' ends with a final tree head of size" in out  # the manifest's
    assert "rewritten" in out


# ------------------------------------------------------------------------------------- fault 3: the roster


def test_a_roster_swapped_with_re_keyed_logs_passes_only_unpinned_and_with_a_warning(run_dir, runs, capsys):
    original = pin(run_dir)
    forged = runs["attacker"]
    shutil.rmtree(run_dir / "parties")
    shutil.copytree(forged / "parties", run_dir / "parties", ignore=KEEP)
    for name in ("roster.json", "manifest.json"):
        shutil.copyfile(forged / name, run_dir / name)
    assert pin(run_dir) != original  # new keys for every party

    code, out = verify(run_dir, capsys)
    assert code == 0 and "warning: roster not pinned" in out
    code, out = verify(run_dir, capsys, "--roster-sha256", original)
    assert code == 1
    assert f"has sha256 {pin(run_dir)}, not the pinned {original}: it is not the run's roster" in out


def test_a_roster_swapped_under_the_manifest_fails_even_unpinned(run_dir, runs, capsys):
    (run_dir / "roster.json").unlink()
    shutil.copyfile(runs["attacker"] / "roster.json", run_dir / "roster.json")
    code, out = verify(run_dir, capsys)
    assert code == 1
    assert "is not the one the run recorded" in out


def test_a_party_the_roster_names_cannot_be_dropped_from_the_record_with_its_log(run_dir, capsys):
    """The run's record is the manifest's (unsigned) audit object: dropping the key holder from it, with its log,
    still leaves the roster naming it."""
    log_of(run_dir, "keyholder").unlink()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    del manifest["audit"]["parties"]["keyholder"]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert main(["audit", "verify", str(run_dir), "--all"]) == 1
    assert "the roster names party 'keyholder', but the run's record names no log of it" in capsys.readouterr().out
