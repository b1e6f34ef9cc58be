"""Identities on disk and the roster: what the CLI's `keys create` writes and every party loads."""

from __future__ import annotations

import json
import stat

import pytest

from protocols import (
    ConfigurationError,
    Identity,
    MessageRejected,
    Roster,
    create_identities,
    load_identity,
    load_roster,
)


def test_create_identities_writes_private_keys_0600_and_a_roster(tmp_path):
    folder = tmp_path / "keys"
    roster = create_identities(folder, "server", ["site-a", "site-b"], keyholder_id="keyholder")
    assert sorted(p.name for p in folder.iterdir()) == ["keyholder.pem", "roster.json", "server.pem", "site-a.pem",
                                                        "site-b.pem"]
    for key_file in folder.glob("*.pem"):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert roster.server_id == "server" and roster.keyholder_id == "keyholder"
    assert roster.client_ids == ("site-a", "site-b")
    assert load_roster(folder) == roster == load_roster(folder / "roster.json")


def test_loaded_identity_signs_what_the_roster_verifies(tmp_path):
    roster = create_identities(tmp_path, "server", ["site-a"])
    identity = load_identity(tmp_path, "site-a")
    roster.verify("site-a", identity.sign(b"hello"), b"hello")
    with pytest.raises(MessageRejected, match="bad signature from 'site-a'"):
        roster.verify("site-a", identity.sign(b"hello"), b"hellO")


def test_roster_file_format_is_versioned_json_of_pem_public_keys(tmp_path):
    create_identities(tmp_path, "server", ["site-a"])
    raw = json.loads((tmp_path / "roster.json").read_text())
    assert raw["version"] == 1
    assert raw["parties"]["site-a"]["role"] == "client"
    assert raw["parties"]["server"]["public_key"].startswith("-----BEGIN PUBLIC KEY-----")


def test_existing_files_are_never_overwritten_and_nothing_is_half_written(tmp_path):
    create_identities(tmp_path, "server", ["site-a"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigurationError, match="refusing to overwrite"):
        create_identities(tmp_path, "server", ["site-a", "site-new"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize(("server", "clients"), [("server", ["a", "a"]), ("server", ["server"]),
                                                  ("server", ["../evil"]), ("", ["a"]), ("server", [".hidden"])])
def test_bad_or_repeated_ids_are_refused(tmp_path, server, clients):
    with pytest.raises(ConfigurationError):
        create_identities(tmp_path / "k", server, clients)
    assert not (tmp_path / "k").exists()


def test_unknown_party_is_a_rejection_naming_it():
    roster = Roster.from_identities(Identity.generate("server"), [Identity.generate("site-a")])
    with pytest.raises(MessageRejected, match="unknown sender 'site-z'"):
        roster.public_key("site-z")


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "not valid JSON"),
    ('{"version": 2, "parties": {}}', "version 2"),
    ('{"version": 1}', "exactly the keys"),
    ('{"version": 1, "parties": {"a": {"role": "client", "public_key": "garbage"}}}', "unreadable public key"),
    ('{"version": 1, "parties": {"a": {"role": "king", "public_key": "x"}}}', "unreadable public key|role"),
])
def test_malformed_rosters_are_refused_clearly(tmp_path, text, message):
    (tmp_path / "roster.json").write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        load_roster(tmp_path)


def test_roster_allows_one_server_only():
    twice = [*Roster.from_identities(Identity.generate("s1"), []).entries,
             *Roster.from_identities(Identity.generate("s2"), []).entries]
    with pytest.raises(ConfigurationError, match="more than one server"):
        Roster(twice)


def test_missing_key_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_identity(tmp_path, "nobody")
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigurationError, match="not an unencrypted PEM"):
        load_identity(tmp_path, "bad")
