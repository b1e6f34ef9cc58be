"""The audit receipt (issue 13, item 4): a finished run leaves a small file, signed by the server, with every
party's last signed tree head and the roster's SHA-256, outside the run folder. Whoever holds the run folder of a
simulation holds every party's key and can re-key every party, re-sign every log and replace the roster: the
logs then verify against each other. Checked against the receipt a reviewer kept, they do not.

The attacker is played on a copy of one small real run with the package's own classes (``SignedTreeHead``,
``merkle``, ``Roster``); the reviewer with ``feddat-secure audit verify``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_audit_support import index_of, read_lines, sign_line, write_lines

from audits import SignedTreeHead, find_logs, key_id, load_receipt, merkle, receipt_path
from audits.entries import canonical_json
from feddat_secure.cli import main
from feddat_secure.federation.runner import run
from feddat_secure.privacy.report import JSON_FILE
from protocols.enrolment import load_party_identity
from protocols.identity import ROSTER_FILE, Roster, RosterEntry, load_roster
from tests.conftest import small_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, module_receipt_dir) -> tuple[Path, Path]:
    """A masked run of 3 sites, 2 rounds, central client-level DP (so a privacy report is written): (run folder,
    its receipt)."""
    privacy = {"client": {"placement": "central", "clip_norm": 0.05, "noise_multiplier": 1.0, "budget_epsilon": 50}}
    config = small_config(tmp_path_factory.mktemp("receipt"), privacy=privacy,
                          federation={"aggregation": "uniform", "clients_per_round": 2, "rounds": 2})
    said: list[str] = []
    run_dir = run(config, progress=False, echo=said.append).run_dir
    kept = [line.rsplit(": ", 1)[1] for line in said if line.startswith("feddat-secure: audit receipt")]
    assert len(kept) == 1, said
    return run_dir, Path(kept[0])


@pytest.fixture()
def copy_of_run(finished_run, tmp_path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(finished_run[0], folder)
    return folder


def test_a_finished_run_keeps_a_signed_receipt_outside_its_folder_and_its_logs_pass_against_it(
        finished_run, module_receipt_dir, capsys):
    run_dir, file = finished_run
    receipt, digest = load_receipt(file)
    assert file.parent == module_receipt_dir and run_dir.resolve() not in file.resolve().parents
    assert file == receipt_path(module_receipt_dir, "tiny", receipt.session)
    logs = {path.name.split(".")[0] for path in find_logs(run_dir / "parties")}
    assert receipt.signer == "server" and set(receipt.parties) == logs == {"server", "client0", "client1", "client2"}
    assert receipt.roster_sha256 == load_roster(run_dir / ROSTER_FILE).digest  # the digest every party pinned
    assert receipt.verify({e.party_id: e.public_key for e in load_roster(run_dir / ROSTER_FILE).entries}) == []
    # the privacy report names the receipt's digest, for the reviewer to compare with the copy they keep
    report = json.loads((run_dir / JSON_FILE).read_text())
    assert report["run"]["audit_receipt"] == {"file": str(file), "sha256": digest}

    assert main(["audit", "verify", str(run_dir), "--receipt", str(file)]) == 0
    out = capsys.readouterr().out
    assert "\nintact: " in out and f"receipt {file} (SHA-256 {digest}, signed by 'server'" in out


def test_an_attacker_who_rekeys_every_party_passes_verify_but_not_the_receipt(finished_run, copy_of_run, capsys):
    _, file = finished_run
    rekeyed = _rekey_and_resign_everything(copy_of_run)
    assert main(["audit", "verify", str(copy_of_run)]) == 0, capsys.readouterr().out  # the logs agree
    capsys.readouterr()

    assert main(["audit", "verify", str(copy_of_run), "--receipt", str(file), "--all"]) == 1
    out = capsys.readouterr().out
    assert "\nNOT INTACT: " in out and "the roster is not the run's" in out
    for party in rekeyed:  # every party's head in the receipt is named: none verifies under the attacker's keys
        assert f"the signed tree head of {party!r}" in out and f"the log of {party!r} does not match" in out


def test_with_the_original_roster_kept_too_the_rewrite_is_named_party_by_party(finished_run, copy_of_run, tmp_path,
                                                                               capsys):
    run_dir, file = finished_run
    pinned = tmp_path / "kept-roster.json"
    shutil.copyfile(run_dir / ROSTER_FILE, pinned)
    rekeyed = _rekey_and_resign_everything(copy_of_run)
    assert main(["audit", "verify", str(copy_of_run), "--roster", str(pinned), "--receipt", str(file), "--all"]) == 1
    out = capsys.readouterr().out
    assert "the roster is not the run's" not in out and "the receipt's signature" not in out
    for party in rekeyed:  # the verifier stops at each log's first entry; the receipt says what that costs
        assert f"the log of {party!r} verifies for 0 entries only, short of its tree head" in out


def test_an_edited_receipt_fails_its_signature(finished_run, tmp_path, capsys):
    run_dir, file = finished_run
    value = json.loads(file.read_text())
    value["tree_heads"]["client0"]["tree_size"] -= 1  # what a rewriter who cut client0's log would want it to say
    edited = tmp_path / "edited.receipt.json"
    edited.write_text(json.dumps(value))
    assert main(["audit", "verify", str(run_dir), "--receipt", str(edited)]) == 1
    out = capsys.readouterr().out
    assert f"\nNOT INTACT: {edited}: the receipt's signature does not verify against the roster key of " \
           "its signer 'server'" in out
    edited.write_text(file.read_text()[:-40])
    assert main(["audit", "verify", str(run_dir), "--receipt", str(edited)]) == 1
    assert "the receipt is not valid JSON" in capsys.readouterr().out
    assert main(["audit", "verify", str(run_dir), "--receipt", str(tmp_path / "absent.json")]) == 2
    assert "no such receipt file" in capsys.readouterr().err


def test_a_log_cut_back_to_a_signed_head_or_removed_is_named_against_the_receipt(finished_run, copy_of_run, capsys):
    _, file = finished_run
    log = copy_of_run / "parties" / "client1" / "client1.audit.jsonl"
    lines = read_lines(log)
    write_lines(log, lines[:-1])  # the final tree head gone: every remaining entry still signed and chained
    assert main(["audit", "verify", str(copy_of_run), "--receipt", str(file), "--all"]) == 1
    assert "the log of 'client1' has no final tree head" in capsys.readouterr().out
    log.unlink()
    assert main(["audit", "verify", str(copy_of_run), "--receipt", str(file), "--all"]) == 1
    assert "the folder holds no log of 'client1'" in capsys.readouterr().out


def test_an_entry_slipped_in_after_a_partys_closing_head_is_named(finished_run, copy_of_run, capsys):
    """With client0's own key (in the folder), an entry added after the head it handed the server at close, and
    the log re-closed: every head the server recorded still holds; the manifest's record of client0's final head
    and the receipt both tell."""
    _, file = finished_run
    log = copy_of_run / "parties" / "client0" / "client0.audit.jsonl"
    key = load_party_identity(copy_of_run / "parties" / "client0").private_key
    lines = read_lines(log)
    closing = index_of(lines, "tree_head", -2)  # the head of the close reply; its message_sent and the final follow
    forged = {**json.loads(lines[closing - 1]), "event": "budget_exceeded", "meta": {"reason": "invented"},
              "time": json.loads(lines[closing])["time"]}
    lines = [*lines[:closing + 1], canonical_json(forged), *lines[closing + 1:]]
    for seq in range(closing + 1, len(lines)):  # renumbered, re-chained, re-signed; the final head recomputed
        value = {**json.loads(lines[seq]), "seq": seq, "prev": hashlib.sha256(lines[seq - 1]).hexdigest()}
        if value["event"] == "tree_head":
            root = merkle.root([merkle.leaf_hash(line) for line in lines[:seq]])
            value["sth"] = SignedTreeHead.sign(key, "client0", seq, root, value["time"]).to_dict()
        lines[seq] = sign_line(value, key)
    write_lines(log, lines)
    assert main(["audit", "verify", str(copy_of_run)]) == 1  # the manifest's record of client0's final head ...
    capsys.readouterr()
    manifest = json.loads((copy_of_run / "manifest.json").read_text())  # ... which the attacker edits too (unsigned)
    manifest["audit"]["parties"]["client0"]["final_tree_head"] = json.loads(lines[-1])["sth"]
    (copy_of_run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["audit", "verify", str(copy_of_run)]) == 1  # only the close exchange may follow the closing head
    assert f"the log of 'client0' holds a budget_exceeded entry (seq {closing + 1}) after the tree head of size " \
           f"{closing} it handed 'server' at close" in capsys.readouterr().out
    assert main(["audit", "verify", str(copy_of_run), "--receipt", str(file), "--all"]) == 1
    out = capsys.readouterr().out
    assert f"the log of 'client0' holds a budget_exceeded entry (seq {closing + 1}) after the tree head of size " \
           f"{closing} it handed 'server' at close" in out


# ------------------------------------------------------------------------------------------------ the attacker

def _rekey_and_resign_everything(run_dir: Path) -> list[str]:
    """What whoever holds a simulated run's folder can do: a new key for every party, every log re-signed with
    it (entries, own tree heads and the peers' heads each log records, made consistent across logs), the roster
    replaced by one with the new keys, and every digest of the manifest updated. Returns the parties."""
    old_roster = load_roster(run_dir / ROSTER_FILE)
    keys = {entry.party_id: Ed25519PrivateKey.generate() for entry in old_roster.entries}
    logs = {path.name.split(".")[0]: path for path in find_logs(run_dir / "parties")}
    current = {party: read_lines(path) for party, path in logs.items()}
    for _ in range(50):  # each pass fixes one more exchange of tree heads; a fixed point is a consistent set
        rewritten = {party: _resign(party, lines, keys, current) for party, lines in current.items()}
        if rewritten == current:
            break
        current = rewritten
    else:
        raise AssertionError("the re-signed logs did not settle")
    replaced: dict[Any, Any] = {}
    for party, path in logs.items():
        old_final, new_final = (json.loads(lines[-1])["sth"] for lines in (read_lines(path), current[party]))
        replaced[json.dumps(old_final, sort_keys=True)] = new_final
        write_lines(path, current[party])
    roster = Roster([RosterEntry(e.party_id, e.role, keys[e.party_id].public_key()) for e in old_roster.entries])
    for copy in [run_dir / ROSTER_FILE, *(run_dir / "parties").glob(f"*/{ROSTER_FILE}")]:
        copy.unlink()
        roster.save(copy)
    _update_manifest(run_dir, replaced)
    return sorted(logs)


def _resign(party: str, lines: list[bytes], keys: dict[str, Ed25519PrivateKey],
            current: dict[str, list[bytes]]) -> list[bytes]:
    key, out, tree = keys[party], [], merkle.CompactTree()
    for line in lines:
        value = json.loads(line)
        value["prev"] = hashlib.sha256(out[-1]).hexdigest() if out else "0" * 64
        sth = value["sth"]
        if value["event"] == "log_opened":
            value["meta"]["key_id"] = key_id(key.public_key())
        elif value["event"] == "tree_head":
            value["sth"] = SignedTreeHead.sign(key, party, sth["tree_size"], tree.root(), sth["time"]).to_dict()
        elif value["event"] == "peer_tree_head":
            peer = value["peer"]
            root = merkle.root([merkle.leaf_hash(x) for x in current[peer][:sth["tree_size"]]])
            value["sth"] = SignedTreeHead.sign(keys[peer], peer, sth["tree_size"], root, sth["time"]).to_dict()
        out.append(sign_line(value, key))
        tree.append(merkle.leaf_hash(out[-1]))
    return out


def _update_manifest(run_dir: Path, heads: dict[str, dict]) -> None:
    """Every file digest and every recorded signed tree head (in whatever shape the manifest holds them) made to
    match the rewritten folder, as the attacker would."""
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    digests = {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest() for name in manifest["files"]
               if (run_dir / name).is_file()}
    old_roster = manifest["files"].get(ROSTER_FILE)

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if json.dumps(value, sort_keys=True) in heads:
                return heads[json.dumps(value, sort_keys=True)]
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and json.dumps(parsed, sort_keys=True) in heads:
                return json.dumps(heads[json.dumps(parsed, sort_keys=True)], sort_keys=True, separators=(",", ":"))
            if old_roster is not None and value == old_roster:
                return digests[ROSTER_FILE]
        return value

    manifest = walk(manifest)
    manifest["files"].update(digests)
    if "audit" in manifest:  # the roster digest the run recorded: the replaced roster's
        manifest["audit"]["roster_sha256"] = load_roster(run_dir / ROSTER_FILE).digest
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
