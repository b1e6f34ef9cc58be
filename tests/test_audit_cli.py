"""The ``audit`` commands through an argparse parser, as the host CLI registers them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from test_audit_support import build_run, read_lines, write_lines

from audits.cli import add_audit_commands


def load_roster(path: Path):
    """A stand-in for the host's roster loader: {party: raw public key hex}."""
    return {party: Ed25519PublicKey.from_public_bytes(bytes.fromhex(key))
            for party, key in json.loads(path.read_text()).items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="feddat-secure")
    add_audit_commands(parser.add_subparsers(dest="command", required=True), load_roster)
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture
def run_dir(tmp_path):
    run = build_run(tmp_path / "run" / "audit")
    roster = {p: k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex() for p, k in run.keys.items()}
    (tmp_path / "run" / "roster.json").write_text(json.dumps(roster))
    return tmp_path / "run"


def test_verify_a_folder_or_a_log_with_the_roster_found_by_default(run_dir, capsys):
    for target in (run_dir, run_dir / "audit", run_dir / "audit" / "server.audit.jsonl"):
        assert main(["audit", "verify", str(target)]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 2 and out[0].startswith("roster: ") and out[1].startswith("intact: ")
    assert main(["audit", "verify", str(run_dir), "--roster", str(run_dir / "roster.json"), "--require-closed"]) == 0


def test_verify_names_the_first_bad_entry_and_exits_1(run_dir, capsys):
    path = run_dir / "audit" / "client_1.audit.jsonl"
    lines = read_lines(path)
    del lines[3]
    write_lines(path, lines)
    assert main(["audit", "verify", str(run_dir)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith("roster: ")
    assert out[1].startswith(f"NOT INTACT: {path}: line 4 (seq 4): sequence number 4 where 3 was expected")
    (run_dir / "audit" / "server.audit.jsonl").write_bytes(b"{}\n")
    assert main(["audit", "verify", str(run_dir), "--all"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[1].startswith("NOT INTACT: ") and len(out) > 2


def test_user_errors_exit_2(run_dir, tmp_path, capsys):
    assert main(["audit", "verify", str(tmp_path / "absent")]) == 2
    assert "no such log or folder" in capsys.readouterr().err
    (run_dir / "roster.json").rename(run_dir / "elsewhere.json")
    assert main(["audit", "verify", str(run_dir)]) == 2
    assert "pass --roster FILE" in capsys.readouterr().err
    (run_dir / "bad.json").write_text("{not json")
    assert main(["audit", "verify", str(run_dir), "--roster", str(run_dir / "bad.json")]) == 2
    assert "cannot read roster" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["audit", "verify", str(tmp_path / "empty"), "--roster", str(run_dir / "elsewhere.json")]) == 2
    assert main(["audit", "reconcile", str(tmp_path / "absent")]) == 2
    assert main(["audit", "proof", str(tmp_path / "absent"), "--index", "0"]) == 2
    assert main(["audit", "proof", str(run_dir / "audit" / "server.audit.jsonl"), "--index", "9999"]) == 2
    assert "has no entry 9999" in capsys.readouterr().err
    assert main(["audit", "check-proof", str(tmp_path / "absent.json")]) == 2


def test_reconcile(run_dir, capsys):
    assert main(["audit", "reconcile", str(run_dir)]) == 0
    assert capsys.readouterr().out.startswith("reconciled: 8 exchanges in 3 logs")
    path = run_dir / "audit" / "server.audit.jsonl"
    lines = read_lines(path)
    received = [i for i, line in enumerate(lines) if json.loads(line)["event"] == "message_received"]
    write_lines(path, lines[:received[-1]])  # the server "forgets" the last update it received
    assert main(["audit", "reconcile", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("UNMATCHED: 1 exchange(s) recorded by one side only")
    assert "'client_1' sent to 'server' (round 1, stage update" in out


def test_proof_and_check_proof(run_dir, tmp_path, capsys):
    log = run_dir / "audit" / "client_0.audit.jsonl"
    out = run_dir / "proof.json"
    assert main(["audit", "proof", str(log), "--index", "5", "--out", str(out)]) == 0
    assert "written to" in capsys.readouterr().out
    assert main(["audit", "check-proof", str(out)]) == 0
    assert capsys.readouterr().out.startswith("valid: entry 5 of 'client_0' is in its signed tree of size")
    assert main(["audit", "proof", str(log), "--index", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["index"] == 2 and printed["tree_head"]["party"] == "client_0"
    value = json.loads(out.read_text())
    value["entry"] = value["entry"].replace('"round":0', '"round":1')
    out.write_text(json.dumps(value))
    assert main(["audit", "check-proof", str(out)]) == 1
    assert capsys.readouterr().out.startswith("INVALID: ")
    log.write_bytes(log.read_bytes()[:-5])
    assert main(["audit", "proof", str(log), "--index", "1"]) == 1
    assert capsys.readouterr().out.startswith("NOT INTACT: ")
