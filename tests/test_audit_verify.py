"""The verifier against every kind of tampering, on real signed logs changed on disk."""

from __future__ import annotations

import json
import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_audit_support import (
    build_run,
    index_of,
    read_lines,
    rechain,
    sign_line,
    write_lines,
)

from audits import AuditError, SignedTreeHead, verify_path
from audits.entries import ENTRY_KEYS, canonical_json


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine")
    return build_run(folder)


@pytest.fixture
def run(pristine, tmp_path):
    """A fresh copy of the pristine run for each test to tamper with."""
    folder = tmp_path / "run"
    shutil.copytree(pristine.folder, folder)
    return type(pristine)(folder, pristine.keys)


def problem_of(run, path=None, **kwargs):
    report = verify_path(path or run.folder, run.roster, **kwargs)
    assert not report.ok, "tampering went undetected"
    assert report.summary().startswith("NOT INTACT: ")
    return report.first_problem


def test_an_intact_run_and_each_of_its_logs_verify(run):
    report = verify_path(run.folder, run.roster)
    assert report.ok and report.summary().startswith("intact: 3 logs")
    assert "all closed" in report.summary()
    for party in ("server", "client_0", "client_1"):
        single = verify_path(run.path(party), run.roster)
        assert single.ok, single.summary()
        assert single.summary().startswith(f"intact: {run.path(party)} ('{party}')")
    assert verify_path(run.folder, run.roster, require_closed=True).ok


def _flip_one_byte_of(line: bytes, key: str) -> bytes:
    """Change one character inside the value of top-level ``key``, keeping the line valid JSON where possible."""
    start = line.index(b'"%s":' % key.encode()) + len(key) + 3
    for i in range(start, len(line)):
        c = chr(line[i])
        if c.isalnum():
            replacement = {"9": "8", "z": "y", "Z": "Y", "f": "e"}.get(c, chr(line[i] + 1))
            return line[:i] + replacement.encode() + line[i + 1:]
    raise AssertionError(f"nothing to change in {key}")


@pytest.mark.parametrize("key", sorted(ENTRY_KEYS))
def test_a_changed_byte_in_any_field_is_detected_at_that_entry(run, key):
    path = run.path("server")
    lines = read_lines(path)
    target = index_of(lines, "tree_head", 1) if key == "sth" else index_of(lines, "message_sent", 1)
    original = lines[target]
    lines[target] = _flip_one_byte_of(original, key)
    assert lines[target] != original and len(lines[target]) == len(original)
    write_lines(path, lines)
    problem = problem_of(run)
    assert problem.path == path and problem.line == target + 1, str(problem)


@pytest.mark.parametrize("event", ["tree_head", "peer_tree_head"])
@pytest.mark.parametrize("key", ["party", "root", "sig", "time", "tree_size"])
def test_a_changed_byte_inside_a_tree_head_is_detected_at_that_entry(run, event, key):
    path = run.path("server")
    lines = read_lines(path)
    target = index_of(lines, event, 1)
    start = lines[target].index(b'"sth":{')
    head, tail = lines[target][:start], lines[target][start:]
    lines[target] = head + _flip_one_byte_of(tail, key)
    write_lines(path, lines)
    problem = problem_of(run)
    assert problem.path == path and problem.line == target + 1, str(problem)


def test_a_log_under_another_key_names_both_key_ids(run):
    roster = run.roster
    roster["client_0"] = Ed25519PrivateKey.generate().public_key()
    problem = verify_path(run.path("client_0"), roster).first_problem
    assert problem.line == 1 and "the log names key id" in problem.reason


def test_a_byte_change_that_keeps_the_json_meaning_is_detected(run):
    """Signatures are over the parsed entry, so only the canonical form pins the exact bytes of the last line
    (whose hash no later entry holds)."""
    path = run.path("client_0")
    lines = read_lines(path)
    lines[-1] = lines[-1].replace(b'"party":"client_0"', b'"party":"\\u0063lient_0"', 1)
    assert json.loads(lines[-1])["party"] == "client_0"
    write_lines(path, lines)
    problem = problem_of(run, path)
    assert problem.line == len(lines) and "canonical" in problem.reason


def test_a_broken_chain_is_detected_even_when_every_entry_is_signed(run):
    """A party that deletes an entry and re-signs the rest with its own key, but keeps the old prev values."""
    path = run.path("client_1")
    values = [json.loads(line) for line in read_lines(path)]
    del values[4]
    for seq, value in enumerate(values):
        value["seq"] = seq
    write_lines(path, [sign_line(value, run.keys["client_1"]) for value in values])
    problem = problem_of(run, path)
    assert problem.line == 5 and "hash chain is broken" in problem.reason


def test_a_deleted_entry_is_detected(run):
    path = run.path("client_0")
    lines = read_lines(path)
    del lines[5]
    write_lines(path, lines)
    problem = problem_of(run)
    assert (problem.path, problem.line, problem.seq) == (path, 6, 6)
    assert "sequence number 6 where 5 was expected" in problem.reason


def test_an_inserted_copy_of_an_entry_is_detected(run):
    path = run.path("server")
    lines = read_lines(path)
    lines.insert(7, lines[3])
    write_lines(path, lines)
    problem = problem_of(run)
    assert (problem.line, problem.seq) == (8, 3) and "sequence number" in problem.reason


def test_an_inserted_forged_entry_with_a_consistent_chain_is_detected(run):
    path = run.path("server")
    lines = read_lines(path)
    forged = json.loads(lines[6])
    forged["meta"] = {"note": "never happened"}
    lines.insert(6, canonical_json(forged))
    for seq, _ in enumerate(lines):  # renumber and re-chain everything, as a careful attacker would
        value = json.loads(lines[seq])
        value["seq"] = seq
        lines[seq] = canonical_json(value)
    write_lines(path, rechain(lines, 1))
    problem = problem_of(run)
    assert problem.line == 7 and "signature does not verify" in problem.reason  # the forged entry


def test_two_swapped_entries_are_detected(run):
    path = run.path("client_1")
    lines = read_lines(path)
    lines[3], lines[4] = lines[4], lines[3]
    write_lines(path, lines)
    problem = problem_of(run)
    assert (problem.line, problem.seq) == (4, 4) and "sequence number 4 where 3 was expected" in problem.reason


def test_a_truncated_tail_is_detected_against_the_last_exchanged_tree_head(run):
    server = run.path("server")
    lines = read_lines(server)
    client = run.path("client_1")
    recorded = [json.loads(line)["sth"] for line in read_lines(client)
                if json.loads(line)["event"] == "peer_tree_head"]
    last_size = recorded[-1]["tree_size"]
    write_lines(server, lines[:last_size - 1])  # whole lines: the cut log is a valid prefix on its own
    alone = verify_path(server, run.roster)
    assert alone.ok and "not closed" in alone.summary()
    problem = problem_of(run)
    assert problem.path == client and "truncated" in problem.reason
    assert f"fewer than the {last_size}" in problem.reason


def test_a_cut_after_the_last_exchanged_tree_head_needs_require_closed(run):
    server = run.path("server")
    write_lines(server, read_lines(server)[:-2])  # drops run_stopped and the final tree head
    assert verify_path(run.folder, run.roster).ok  # no peer holds a tree head this large: documented limit
    problem = problem_of(run, require_closed=True)
    assert problem.path == server and "final tree head" in problem.reason


def test_an_entry_resigned_with_a_key_not_on_the_roster_is_detected(run):
    path = run.path("server")
    lines = read_lines(path)
    target = index_of(lines, "message_received")
    value = json.loads(lines[target])
    value["digest"] = "0" * 64
    lines[target] = sign_line(value, Ed25519PrivateKey.generate())
    write_lines(path, rechain(lines, target + 1, Ed25519PrivateKey.generate()))
    problem = problem_of(run)
    assert problem.line == target + 1
    assert "signature does not verify against the roster key of 'server'" in problem.reason


def test_a_whole_log_resigned_with_another_key_is_detected(run):
    path = run.path("client_0")
    write_lines(path, rechain(read_lines(path), 0, Ed25519PrivateKey.generate()))
    problem = problem_of(run)
    assert problem.line == 1 and "signature does not verify" in problem.reason


def test_a_hash_chain_recomputed_without_the_signing_key_is_detected(run):
    path = run.path("server")
    lines = read_lines(path)
    target = index_of(lines, "aggregate_computed")
    value = json.loads(lines[target])
    value["meta"] = {"updates": 1}
    lines[target] = canonical_json(value)
    write_lines(path, rechain(lines, target))
    problem = problem_of(run)
    assert problem.line == target + 1 and "signature does not verify" in problem.reason


def test_a_party_rewriting_its_own_history_with_its_own_key_is_caught_by_its_peers(run, tmp_path):
    other = build_run(tmp_path / "other", keys=run.keys, note="rewritten")  # another history, validly signed
    shutil.copy(other.path("server"), run.path("server"))
    assert verify_path(run.path("server"), run.roster).ok
    report = verify_path(run.folder, run.roster)
    for client in ("client_0", "client_1"):
        assert any(p.path == run.path(client) and "the log of 'server' (server.audit.jsonl) does not match its "
                   "signed tree head" in p.reason and "history was rewritten" in p.reason for p in report.problems)


def _resign_all(run, party, edit):
    """Apply ``edit(values)`` to the parsed lines and re-sign everything with the party's own key."""
    path = run.path(party)
    values = [json.loads(line) for line in read_lines(path)]
    edit(values)
    write_lines(path, rechain([canonical_json(v) for v in values], 0, run.keys[party]))
    return path


def test_time_going_backwards_is_detected(run):
    def edit(values):
        values[4]["time"] = values[3]["time"].replace("2025", "2024")

    _resign_all(run, "client_0", edit)
    problem = problem_of(run, run.path("client_0"))
    assert problem.line == 5 and "time goes backwards" in problem.reason


def test_an_unknown_event_and_raw_data_in_meta_are_schema_errors(run):
    def edit(values):
        values[2]["event"] = "message_dropped"

    _resign_all(run, "client_0", edit)
    problem = problem_of(run, run.path("client_0"))
    assert problem.line == 3 and "unknown event 'message_dropped'" in problem.reason

    def edit_meta(values):
        values[1]["meta"] = {"update": [0.25, -1.5, 3.0]}

    _resign_all(run, "client_1", edit_meta)
    problem = problem_of(run, run.path("client_1"))
    assert problem.line == 2 and "never raw data" in problem.reason


def test_a_tree_head_over_the_wrong_root_is_detected_even_when_signed(run):
    key = run.keys["server"]

    def edit(values):
        i = next(i for i, v in enumerate(values) if v["event"] == "tree_head")
        sth = SignedTreeHead.from_dict(values[i]["sth"])
        values[i]["sth"] = SignedTreeHead.sign(key, "server", sth.tree_size, b"\x00" * 32, sth.time).to_dict()

    path = _resign_all(run, "server", edit)
    problem = problem_of(run, path)
    assert "tree head root is not the Merkle root" in problem.reason


@pytest.mark.parametrize("change", ["size", "time", "signer"])
def test_a_tree_head_with_a_wrong_size_time_or_signer_is_detected_even_in_a_signed_entry(run, change):
    key = run.keys["server"]

    def edit(values):
        i = next(i for i, v in enumerate(values) if v["event"] == "tree_head")
        sth = SignedTreeHead.from_dict(values[i]["sth"])
        if change == "size":  # the right root, a wrong claim about how many entries it covers
            values[i]["sth"] = SignedTreeHead.sign(key, "server", sth.tree_size + 5, sth.root, sth.time).to_dict()
        elif change == "time":
            later = sth.time.replace("2025", "2026")
            values[i]["sth"] = SignedTreeHead.sign(key, "server", sth.tree_size, sth.root, later).to_dict()
        else:
            values[i]["sth"] = SignedTreeHead.sign(Ed25519PrivateKey.generate(), "server", sth.tree_size, sth.root,
                                                   sth.time).to_dict()

    path = _resign_all(run, "server", edit)
    problem = problem_of(run, path)
    expected = {"size": "tree head covers", "time": "tree head time differs",
                "signer": "signed tree head of 'server' (size"}[change]
    assert expected in problem.reason


def test_a_rewritten_and_cut_log_is_caught_by_the_tree_heads_its_peers_hold(run, tmp_path):
    """No own tree head is left that covers what the peers hold: the Merkle root itself must match."""
    recorded = [json.loads(line)["sth"] for line in read_lines(run.path("client_1"))
                if json.loads(line)["event"] == "peer_tree_head"]
    size = recorded[-1]["tree_size"]
    other = build_run(tmp_path / "other", keys=run.keys, note="rewritten")
    write_lines(run.path("server"), read_lines(other.path("server"))[:size])
    assert verify_path(run.path("server"), run.roster).ok
    report = verify_path(run.folder, run.roster)
    assert any(p.path == run.path("client_1") and f"signed tree head of size {size} recorded here: its history was "
               "rewritten" in p.reason for p in report.problems), report.problems


def test_an_entry_after_the_final_tree_head_is_detected(run):
    path = run.path("client_1")
    lines = read_lines(path)
    extra = json.loads(lines[-2])
    extra["seq"] = len(lines)
    lines.append(canonical_json(extra))
    write_lines(path, rechain(lines, len(lines) - 1, run.keys["client_1"]))
    problem = problem_of(run, path)
    assert problem.line == len(lines) and "after the log's final tree head" in problem.reason


def test_a_party_missing_from_the_roster_is_detected(run):
    roster = run.roster
    del roster["client_1"]
    report = verify_path(run.folder, roster)
    assert not report.ok and "not on the roster" in report.first_problem.reason


def test_a_removed_or_duplicated_log_is_detected(run):
    run.path("client_1").unlink()
    problem = problem_of(run)
    assert problem.path == run.path("server") and "no log of 'client_1'" in problem.reason
    shutil.copy(run.path("client_0"), run.folder / "copy.audit.jsonl")
    report = verify_path(run.folder, run.roster)
    assert any("a second log of party 'client_0'" in p.reason for p in report.problems)


def test_a_torn_last_line_and_an_empty_log_are_reported(run):
    path = run.path("server")
    lines = read_lines(path)
    path.write_bytes(b"".join(line + b"\n" for line in lines[:-1]) + lines[-1][:40])
    problem = problem_of(run, path)
    assert problem.line == len(lines) and "incomplete last line of 40 bytes" in problem.reason
    path.write_bytes(b"")
    assert problem_of(run, path).reason == "the log is empty"


def test_user_errors_raise(run, tmp_path):
    with pytest.raises(FileNotFoundError):
        verify_path(tmp_path / "absent", run.roster)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AuditError, match="no audit logs"):
        verify_path(tmp_path / "empty", run.roster)
