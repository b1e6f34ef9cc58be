"""Enrolment without a key dealer: each party makes its own key in its own folder; the roster comes from
public enrolment files only; nobody ever holds a second party's private key."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from feddat_secure.cli import main
from protocols import (
    ConfigurationError,
    Identity,
    Roster,
    RosterEntry,
    build_roster,
    enrol_parties,
    load_party_identity,
    load_roster,
    read_enrolment,
    save_party_identity,
)
from protocols import enrolment as enrolment_module
from protocols.identity import public_pem

PARTIES = [("server", "server"), ("keyholder", "keyholder"), ("site-a", "client"), ("site-b", "client"),
           ("site-c", "client")]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for folders): to show a refusal changed nothing."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


# --- one party's identity in its own folder ---------------------------------------------------------------

def test_a_party_identity_is_a_0600_key_in_a_0700_folder_and_a_public_enrolment_file(tmp_path):
    folder = tmp_path / "parent" / "site-a"
    identity = save_party_identity(folder, "site-a", "client")
    assert sorted(p.name for p in folder.iterdir()) == ["enrolment.json", "identity.pem"]
    assert mode(folder) == 0o700 and mode(folder / "identity.pem") == 0o600
    assert (folder / "identity.pem").read_bytes() == identity.private_pem()  # PKCS#8 PEM
    assert (folder / "identity.pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    enrolment = json.loads((folder / "enrolment.json").read_text())
    assert enrolment == {"format": "feddat-secure-enrolment/1", "party": "site-a", "role": "client",
                         "public_key": enrolment["public_key"]}
    assert "PRIVATE" not in enrolment["public_key"]
    assert read_enrolment(folder / "enrolment.json") == RosterEntry("site-a", "client", identity.public_key)
    loaded = load_party_identity(folder)
    assert loaded.party_id == "site-a" and loaded.public_key == identity.public_key
    assert load_party_identity(folder, "site-a").public_key == identity.public_key


def test_modes_are_exact_whatever_the_umask(tmp_path):
    previous = os.umask(0o277)  # would make the folder 0500 and the key 0400
    try:
        save_party_identity(tmp_path / "site-a", "site-a", "client")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "site-a") == 0o700 and mode(tmp_path / "site-a" / "identity.pem") == 0o600


def test_an_existing_private_folder_is_accepted(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir(mode=0o700)
    save_party_identity(folder, "site-a", "client")
    assert load_party_identity(folder).party_id == "site-a"


@pytest.mark.parametrize("folder_mode", [0o750, 0o705, 0o770])
def test_an_existing_folder_others_can_access_is_refused_and_left_untouched(tmp_path, folder_mode):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(folder_mode)
    with pytest.raises(ConfigurationError, match=f"identity folder .*/shared' has mode {folder_mode:04o}"):
        save_party_identity(folder, "site-a", "client")
    assert list(folder.iterdir()) == []


def test_an_existing_identity_is_never_overwritten(tmp_path):
    folder = tmp_path / "site-a"
    save_party_identity(folder, "site-a", "client")
    before = tree(tmp_path)
    with pytest.raises(ConfigurationError, match="identity.pem' already exists; refusing to overwrite"):
        save_party_identity(folder, "site-a", "client")
    (folder / "identity.pem").unlink()
    with pytest.raises(ConfigurationError, match="enrolment.json' already exists; refusing to overwrite"):
        save_party_identity(folder, "site-a", "client")
    assert tree(tmp_path) == {name: content for name, content in before.items() if name != "site-a/identity.pem"}


@pytest.mark.parametrize(("party_id", "role", "message"), [
    ("", "client", "invalid party id ''"), ("../evil", "client", "invalid party id"),
    ("site-a", "king", "role must be one of server, client, keyholder, not 'king'"),
])
def test_a_bad_id_or_role_writes_nothing(tmp_path, party_id, role, message):
    with pytest.raises(ConfigurationError, match=message):
        save_party_identity(tmp_path / "new" / "site", party_id, role)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_created_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigurationError, match="cannot create identity folder .*/a-file' is not a folder"):
        save_party_identity(tmp_path / "a-file" / "deeper" / "site-a", "site-a", "client")
    assert tree(tmp_path) == {"a-file": b"x"}


def test_a_failure_while_writing_removes_everything_the_call_made(tmp_path, monkeypatch):
    real = enrolment_module._write_new

    def fail_on_enrolment(path, data, file_mode, created):
        if path.name == "enrolment.json":
            raise OSError(28, "No space left on device", str(path))
        real(path, data, file_mode, created)

    monkeypatch.setattr(enrolment_module, "_write_new", fail_on_enrolment)
    with pytest.raises(ConfigurationError, match="cannot write .*enrolment.json': No space left on device"):
        save_party_identity(tmp_path / "new" / "site-a", "site-a", "client")
    assert list(tmp_path.iterdir()) == []


# --- loading one's own identity ---------------------------------------------------------------------------

@pytest.mark.parametrize("key_mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o610])
def test_a_key_file_group_or_others_can_access_is_refused_naming_file_and_mode(tmp_path, key_mode):
    save_party_identity(tmp_path / "site-a", "site-a", "client")
    (tmp_path / "site-a" / "identity.pem").chmod(key_mode)
    with pytest.raises(ConfigurationError, match=f"key file .*identity.pem' has mode {key_mode:04o}: group or others"):
        load_party_identity(tmp_path / "site-a")


@pytest.mark.parametrize("folder_mode", [0o720, 0o702, 0o777])
def test_a_folder_group_or_others_can_write_to_is_refused(tmp_path, folder_mode):
    save_party_identity(tmp_path / "site-a", "site-a", "client")
    (tmp_path / "site-a").chmod(folder_mode)
    with pytest.raises(ConfigurationError, match=f"identity folder .*/site-a' has mode {folder_mode:04o}: group or "
                                                 "others can write"):
        load_party_identity(tmp_path / "site-a")


def test_a_key_reached_through_a_symbolic_link_is_refused(tmp_path):
    save_party_identity(tmp_path / "elsewhere", "site-a", "client")
    folder = tmp_path / "site-a"
    folder.mkdir(mode=0o700)
    (folder / "identity.pem").symlink_to(tmp_path / "elsewhere" / "identity.pem")
    with pytest.raises(ConfigurationError, match="is a symbolic link"):
        load_party_identity(folder, "site-a")


def test_a_key_that_is_not_the_enrolled_one_is_refused(tmp_path):
    save_party_identity(tmp_path / "site-a", "site-a", "client")
    save_party_identity(tmp_path / "site-b", "site-b", "client")
    os.replace(tmp_path / "site-b" / "identity.pem", tmp_path / "site-a" / "identity.pem")
    with pytest.raises(ConfigurationError, match="does not match the public key in .*site-a/enrolment.json"):
        load_party_identity(tmp_path / "site-a")


def test_the_party_asked_for_must_be_the_one_enrolled(tmp_path):
    save_party_identity(tmp_path / "site-a", "site-a", "client")
    with pytest.raises(ConfigurationError, match="enrols 'site-a', not 'site-b'"):
        load_party_identity(tmp_path / "site-a", "site-b")


def test_without_an_enrolment_file_the_party_id_must_be_given(tmp_path):
    identity = save_party_identity(tmp_path / "site-a", "site-a", "client")
    (tmp_path / "site-a" / "enrolment.json").unlink()
    with pytest.raises(ConfigurationError, match="has no enrolment.json naming its party"):
        load_party_identity(tmp_path / "site-a")
    assert load_party_identity(tmp_path / "site-a", "site-a").public_key == identity.public_key


def test_missing_or_unreadable_keys_are_clear_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="identity folder .* does not exist"):
        load_party_identity(tmp_path / "nobody")
    folder = tmp_path / "bad"
    folder.mkdir(mode=0o700)
    with pytest.raises(ConfigurationError, match="key file .* does not exist"):
        load_party_identity(folder, "bad")
    descriptor = os.open(folder / "identity.pem", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(descriptor, b"not a key")
    os.close(descriptor)
    with pytest.raises(ConfigurationError, match="not an unencrypted PEM private key"):
        load_party_identity(folder, "bad")


# --- enrolment files and the roster built from them -------------------------------------------------------

def enrol(root: Path, parties=PARTIES) -> dict[str, Identity]:
    return {party: save_party_identity(root / party, party, role) for party, role in parties}


def test_the_roster_is_built_from_public_enrolment_files_only(tmp_path):
    identities = enrol(tmp_path)
    roster = build_roster(sorted(tmp_path.glob("*/enrolment.json")))
    expected = Roster.from_identities(identities["server"], [identities[c] for c in ("site-a", "site-b", "site-c")],
                                      identities["keyholder"])
    assert roster == expected and roster.digest == expected.digest


def test_a_party_id_enrolled_twice_is_refused_naming_both_files(tmp_path):
    save_party_identity(tmp_path / "one", "site-a", "client")
    save_party_identity(tmp_path / "two", "site-a", "client")
    with pytest.raises(ConfigurationError, match="party 'site-a' is enrolled twice: .*one/enrolment.json' and "
                                                 ".*two/enrolment.json'"):
        build_roster([tmp_path / "one" / "enrolment.json", tmp_path / "two" / "enrolment.json"])


def test_a_public_key_enrolled_for_two_parties_is_refused(tmp_path):
    save_party_identity(tmp_path / "site-a", "site-a", "client")
    copy = json.loads((tmp_path / "site-a" / "enrolment.json").read_text()) | {"party": "site-b"}
    (tmp_path / "copy.json").write_text(json.dumps(copy))
    with pytest.raises(ConfigurationError, match="enrol the same public key \\(parties 'site-a' and 'site-b'\\)"):
        build_roster([tmp_path / "site-a" / "enrolment.json", tmp_path / "copy.json"])


def test_two_servers_are_refused(tmp_path):
    enrol(tmp_path, [("s1", "server"), ("s2", "server")])
    with pytest.raises(ConfigurationError, match="more than one server: s1, s2"):
        build_roster(sorted(tmp_path.glob("*/enrolment.json")))


def test_no_enrolment_files_is_refused():
    with pytest.raises(ConfigurationError, match="no enrolment files given"):
        build_roster([])


GOOD = {"format": "feddat-secure-enrolment/1", "party": "site-a", "role": "client"}


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "feddat-secure-enrolment/2"}, "has format 'feddat-secure-enrolment/2'"),
    ({"party": "../evil"}, "invalid party id"),
    ({"role": "king"}, "role must be one of"),
    ({"public_key": "garbage"}, "unreadable public key"),
    ({"private_key": "x"}, "exactly the keys"),
])
def test_malformed_enrolment_files_are_refused_naming_the_file(tmp_path, change, message):
    identity = Identity.generate("site-a")
    (tmp_path / "e.json").write_text(json.dumps({**GOOD, "public_key": public_pem(identity.public_key), **change}))
    with pytest.raises(ConfigurationError, match=f"enrolment file .*e.json'.*{message}"):
        read_enrolment(tmp_path / "e.json")


def test_a_repeated_key_in_an_enrolment_file_is_refused(tmp_path):
    save_party_identity(tmp_path / "site-a", "site-a", "client")
    text = (tmp_path / "site-a" / "enrolment.json").read_text()
    (tmp_path / "e.json").write_text(text.replace('"party": "site-a"', '"party": "site-a", "party": "site-b"'))
    with pytest.raises(ConfigurationError, match="the key 'party' appears twice"):
        read_enrolment(tmp_path / "e.json")


# --- the simulation helper --------------------------------------------------------------------------------

def test_enrol_parties_gives_each_party_its_own_folder_and_writes_the_roster(tmp_path):
    roster = enrol_parties(tmp_path / "run", PARTIES)
    root = tmp_path / "run"
    assert sorted(p.name for p in root.iterdir()) == sorted([party for party, _ in PARTIES] + ["roster.json"])
    assert load_roster(root) == roster
    for party, role in PARTIES:
        assert sorted(p.name for p in (root / party).iterdir()) == ["enrolment.json", "identity.pem"]
        assert mode(root / party) == 0o700 and mode(root / party / "identity.pem") == 0o600
        roster.check_identity(load_party_identity(root / party), role)
    assert build_roster(sorted(root.glob("*/enrolment.json"))) == roster


@pytest.mark.parametrize(("parties", "message"), [
    ([("server", "server"), ("site-a", "client"), ("site-a", "client")], "'site-a' is listed twice"),
    ([("s1", "server"), ("s2", "server")], "more than one server"),
    ([("server", "server"), ("../evil", "client")], "invalid party id"),
    ([("server", "server"), ("site-a", "king")], "role must be one of"),
    ([], "no parties to enrol"),
    ([("server", "server"), ("roster.json", "client")], "would be the roster file's name"),
])
def test_enrol_parties_checks_everything_before_writing(tmp_path, parties, message):
    with pytest.raises(ConfigurationError, match=message):
        enrol_parties(tmp_path / "run", parties)
    assert not (tmp_path / "run").exists()


def test_enrol_parties_never_overwrites_and_then_writes_nothing(tmp_path):
    root = tmp_path / "run"
    save_party_identity(root / "site-b", "site-b", "client")
    before = tree(tmp_path)
    with pytest.raises(ConfigurationError, match="site-b/identity.pem' already exists"):
        enrol_parties(root, PARTIES)
    assert tree(tmp_path) == before
    (root / "roster.json").write_text("{}")
    with pytest.raises(ConfigurationError, match="roster.json' already exists"):
        enrol_parties(root, [("server", "server")])


# --- the command line -------------------------------------------------------------------------------------

def test_cli_round_trip_each_party_enrols_itself_and_the_roster_comes_from_public_files(tmp_path, capsys):
    for party, role in PARTIES:
        assert main(["keys", "create", "--party", party, "--role", role, "--out", str(tmp_path / party)]) == 0
        printed = capsys.readouterr().out
        assert str(tmp_path / party / "identity.pem") in printed
        assert str(tmp_path / party / "enrolment.json") in printed
    assert main(["keys", "create", "--party", "site-d", "--out", str(tmp_path / "site-d")]) == 0  # default: client
    capsys.readouterr()
    enrolments = [str(tmp_path / party / "enrolment.json") for party in (*dict(PARTIES), "site-d")]
    out = tmp_path / "public" / "roster.json"
    out.parent.mkdir()
    assert main(["roster", "build", *enrolments, "--out", str(out)]) == 0
    roster = load_roster(out)
    printed = capsys.readouterr().out
    assert "6 parties" in printed and f"sha256 {roster.digest}" in printed
    assert roster.client_ids == ("site-a", "site-b", "site-c", "site-d")
    assert roster.server_id == "server" and roster.keyholder_id == "keyholder"
    for party, role in [*PARTIES, ("site-d", "client")]:
        identity = load_party_identity(tmp_path / party)
        roster.check_identity(identity, role)
        roster.verify(party, identity.sign(b"round 1"), b"round 1")
    assert sorted(p.name for p in out.parent.iterdir()) == ["roster.json"]  # no private key near the roster


def enrolled(tmp_path: Path) -> list[str]:
    enrol(tmp_path / "keys", PARTIES[:3])
    return [str(tmp_path / "keys" / party / "enrolment.json") for party, _ in PARTIES[:3]]


def duplicate_id(tmp_path: Path) -> list[str]:
    save_party_identity(tmp_path / "again", "site-a", "client")
    return ["roster", "build", *enrolled(tmp_path), str(tmp_path / "again" / "enrolment.json"),
            "--out", str(tmp_path / "roster.json")]


def duplicate_key(tmp_path: Path) -> list[str]:
    files = enrolled(tmp_path)
    copy = json.loads(Path(files[-1]).read_text()) | {"party": "site-z"}
    (tmp_path / "copy.json").write_text(json.dumps(copy))
    return ["roster", "build", *files, str(tmp_path / "copy.json"), "--out", str(tmp_path / "roster.json")]


def existing_roster(tmp_path: Path) -> list[str]:
    files = enrolled(tmp_path)
    (tmp_path / "roster.json").write_text("keep me")
    return ["roster", "build", *files, "--out", str(tmp_path / "roster.json")]


def shared_folder(tmp_path: Path) -> list[str]:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o755)
    return ["keys", "create", "--party", "site-a", "--out", str(tmp_path / "shared")]


def under_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "a-file").write_text("x")
    return ["keys", "create", "--party", "site-a", "--out", str(tmp_path / "a-file" / "site-a")]


def roster_under_a_file(tmp_path: Path) -> list[str]:
    files = enrolled(tmp_path)
    (tmp_path / "a-file").write_text("x")
    return ["roster", "build", *files, "--out", str(tmp_path / "a-file" / "roster.json")]


def not_json(tmp_path: Path) -> list[str]:
    (tmp_path / "e.json").write_text("{not json")
    return ["roster", "build", *enrolled(tmp_path), str(tmp_path / "e.json"), "--out", str(tmp_path / "roster.json")]


@pytest.mark.parametrize(("make_argv", "message"), [
    (lambda tmp: ["keys", "create", "--party", "", "--out", str(tmp / "k")], "invalid party id ''"),
    (lambda tmp: ["keys", "create", "--party", "../evil", "--out", str(tmp / "k")], "invalid party id '../evil'"),
    (lambda tmp: ["keys", "create", "--party", "a", "--role", "king", "--out", str(tmp / "k")], "role must be"),
    (shared_folder, "has mode 0755: group or others can access it"),
    (under_a_file, "cannot create identity folder .* is not a folder"),
    (roster_under_a_file, "cannot write roster file .*: Not a directory"),
    (existing_roster, "roster file .* already exists; refusing to overwrite it"),
    (duplicate_id, "party 'site-a' is enrolled twice"),
    (duplicate_key, "enrol the same public key"),
    (lambda tmp: ["roster", "build", str(tmp / "missing.json"), "--out", str(tmp / "r.json")], "does not exist"),
    (lambda tmp: ["roster", "build", str(tmp), "--out", str(tmp / "r.json")], "cannot read enrolment file"),
    (not_json, "e.json' is not valid JSON"),
], ids=["empty-id", "bad-id", "bad-role", "shared-folder", "unwritable-folder", "unwritable-roster-folder",
        "existing-roster", "duplicate-id", "duplicate-key", "missing-enrolment", "enrolment-is-a-folder",
        "enrolment-not-json"])
def test_cli_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, make_argv, message):
    argv = make_argv(tmp_path)
    before = tree(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("feddat-secure: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert tree(tmp_path) == before


def test_parties_enrolling_at_once_into_one_new_parent_folder_do_not_trip_over_each_other(tmp_path, monkeypatch):
    # Another party's process creates the shared parent between this party's check and its mkdir: the parent
    # that already exists is fine; only the party's own folder must be new.
    shared = tmp_path / "runs" / "parties"
    shared.mkdir(parents=True)
    real_lexists = os.path.lexists
    monkeypatch.setattr(os.path, "lexists", lambda path: False if Path(path) == shared else real_lexists(path))
    identity = save_party_identity(shared / "site-a", "site-a", "client")
    assert load_party_identity(shared / "site-a").public_key == identity.public_key
