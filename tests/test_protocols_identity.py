"""Identities and the roster: the file every party holds a copy of, pins by its SHA-256, and trusts for keys."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.exceptions import InvalidSignature

from protocols import ConfigurationError, Identity, MessageRejected, Roster, RosterEntry, load_roster


def make_roster(*clients: str, keyholder: bool = True) -> tuple[Roster, dict[str, Identity]]:
    identities = {pid: Identity.generate(pid) for pid in ("server", *clients, *(["keyholder"] if keyholder else []))}
    roster = Roster.from_identities(identities["server"], [identities[c] for c in clients],
                                    identities.get("keyholder"))
    return roster, identities


def test_roster_file_is_versioned_json_of_pem_keys_recording_its_own_sha256(tmp_path):
    roster, _ = make_roster("site-a", "site-b")
    roster.save(tmp_path / "roster.json")
    raw = json.loads((tmp_path / "roster.json").read_text())
    assert set(raw) == {"version", "parties", "sha256"}
    assert raw["version"] == 1
    assert raw["parties"]["site-a"]["role"] == "client" and raw["parties"]["keyholder"]["role"] == "keyholder"
    assert raw["parties"]["server"]["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    assert raw["sha256"] == roster.digest
    assert load_roster(tmp_path) == roster == load_roster(tmp_path / "roster.json")
    assert load_roster(tmp_path).digest == roster.digest


def test_digest_is_sha256_of_the_canonical_json_of_version_and_parties():
    roster, _ = make_roster("site-a")
    content = {key: value for key, value in json.loads(roster.to_json()).items() if key != "sha256"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert roster.digest == hashlib.sha256(canonical).hexdigest()
    assert make_roster("site-a")[0].digest != roster.digest  # fresh keys, another roster


def test_loaded_roster_verifies_what_an_identity_signs(tmp_path):
    roster, identities = make_roster("site-a")
    roster.save(tmp_path / "roster.json")
    loaded = load_roster(tmp_path)
    loaded.verify("site-a", identities["site-a"].sign(b"hello"), b"hello")
    with pytest.raises(MessageRejected, match="bad signature from 'site-a'"):
        loaded.verify("site-a", identities["site-a"].sign(b"hello"), b"hellO")


def test_the_roster_accepts_exactly_the_signatures_openssl_accepts_and_refuses_forged_ones():
    """Verification runs on libsodium (PyNaCl) for speed; it must agree with OpenSSL's Ed25519 (cryptography) on
    every genuine signature, and refuse, as OpenSSL does, a flipped bit anywhere, another party's key, a signature
    of S + L (the same point, a non-canonical scalar: the classic malleability) and signatures of the wrong
    length, whatever buffer type carries them."""
    roster, identities = make_roster("site-a", "site-b")
    openssl = roster.public_key("site-a")
    for message in (b"", b"hello", bytes(range(256)) * 40):
        signature = identities["site-a"].sign(message)
        openssl.verify(signature, message)
        roster.verify("site-a", signature, message)
        roster.verify("site-a", bytearray(signature), memoryview(message))
        with pytest.raises(MessageRejected, match="bad signature from 'site-b'"):
            roster.verify("site-b", signature, message)
        forged = [signature[:i] + bytes([signature[i] ^ 1 << bit]) + signature[i + 1:]
                  for i in (0, 31, 32, 63) for bit in (0, 7)]
        s = int.from_bytes(signature[32:], "little") + 2**252 + 27742317777372353535851937790883648493  # S + L
        forged += [signature[:32] + s.to_bytes(32, "little"), signature[:-1], signature + b"\0", b""]
        for bad in forged:
            with pytest.raises(InvalidSignature):
                openssl.verify(bad, message)
            with pytest.raises(MessageRejected, match="bad signature from 'site-a'"):
                roster.verify("site-a", bad, message)


def altered(roster: Roster, change) -> str:
    raw = json.loads(roster.to_json())
    change(raw)
    return json.dumps(raw, indent=2)


def test_an_altered_roster_is_refused_quoting_both_digests(tmp_path):
    roster, _ = make_roster("site-a", "site-b")

    def promote(raw):
        raw["parties"]["site-a"]["role"] = "keyholder"
        del raw["parties"]["keyholder"]

    text = altered(roster, promote)
    content = Roster([RosterEntry("server", "server", roster.public_key("server")),
                      RosterEntry("site-a", "keyholder", roster.public_key("site-a")),
                      RosterEntry("site-b", "client", roster.public_key("site-b"))])
    with pytest.raises(ConfigurationError) as refused:
        Roster.from_json(text)
    assert roster.digest in str(refused.value) and content.digest in str(refused.value)
    assert "altered" in str(refused.value)


def test_a_tampered_sha256_is_refused_quoting_both_digests():
    roster, _ = make_roster("site-a")
    forged = "0" * 64
    text = altered(roster, lambda raw: raw.update(sha256=forged))
    with pytest.raises(ConfigurationError, match=f"records sha256 {forged} but its content has sha256 "
                                                 f"{roster.digest}"):
        Roster.from_json(text)


def test_a_roster_without_its_sha256_is_refused():
    roster, _ = make_roster("site-a")
    with pytest.raises(ConfigurationError, match="exactly the keys 'version', 'parties' and 'sha256'"):
        Roster.from_json(altered(roster, lambda raw: raw.pop("sha256")))


def test_a_party_listed_twice_in_the_json_text_is_refused():
    roster, _ = make_roster("site-a")
    text = roster.to_json()
    entry = json.dumps(json.loads(text)["parties"]["site-a"])
    twice = text.replace('"parties": {', f'"parties": {{\n    "site-a": {entry},', 1)
    assert twice.count('"site-a"') == 2
    with pytest.raises(ConfigurationError, match="the key 'site-a' appears twice"):
        Roster.from_json(twice)


def test_a_key_repeated_anywhere_in_the_json_text_is_refused():
    roster, _ = make_roster("site-a")
    text = roster.to_json().replace('"role": "client"', '"role": "server", "role": "client"', 1)
    with pytest.raises(ConfigurationError, match="the key 'role' appears twice"):
        Roster.from_json(text)


def test_the_same_public_key_for_two_parties_is_refused():
    key = Identity.generate("site-a").public_key
    with pytest.raises(ConfigurationError, match="'site-a' and 'site-b' are enrolled with the same public key"):
        Roster([RosterEntry("site-a", "client", key), RosterEntry("site-b", "client", key)])
    roster, _ = make_roster("site-a", "site-b")
    text = altered(roster, lambda raw: raw["parties"]["site-b"].update(raw["parties"]["site-a"]))
    with pytest.raises(ConfigurationError, match="same public key"):
        Roster.from_json(text)


@pytest.mark.parametrize("role", ["server", "keyholder"])
def test_roster_allows_one_server_and_one_key_holder_only(role):
    entries = [RosterEntry(pid, role, Identity.generate(pid).public_key) for pid in ("p1", "p2")]
    with pytest.raises(ConfigurationError, match=f"more than one {role}: p1, p2"):
        Roster(entries)


def test_unknown_party_is_a_rejection_naming_it():
    roster, _ = make_roster("site-a")
    with pytest.raises(MessageRejected, match="unknown sender 'site-z'"):
        roster.public_key("site-z")


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "not valid JSON"),
    ("[]", "must be a JSON object"),
    ('{"version": 2, "parties": {}, "sha256": ""}', "version 2"),
    ('{"version": 1}', "exactly the keys"),
    ('{"version": 1, "parties": [], "sha256": ""}', "'parties' must be an object"),
    ('{"version": 1, "parties": {}, "sha256": "ABC"}', "'sha256' must be 64 lower-case hexadecimal digits"),
    ('{"version": 1, "parties": {"a": {"role": "client"}}, "sha256": "' + "0" * 64 + '"}',
     "party 'a' needs exactly 'role' and 'public_key'"),
    ('{"version": 1, "parties": {"a": {"role": "client", "public_key": "garbage"}}, "sha256": "' + "0" * 64 + '"}',
     "party 'a': unreadable public key"),
])
def test_malformed_rosters_are_refused_clearly(tmp_path, text, message):
    (tmp_path / "roster.json").write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        load_roster(tmp_path)


def test_a_roster_with_an_unknown_role_is_refused():
    roster, _ = make_roster("site-a")
    with pytest.raises(ConfigurationError, match="role must be one of server, client, keyholder, not 'king'"):
        Roster.from_json(altered(roster, lambda raw: raw["parties"]["site-a"].update(role="king")))


def test_missing_roster_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="roster file .* does not exist"):
        load_roster(tmp_path / "nowhere.json")


def test_saving_never_overwrites_a_roster(tmp_path):
    first, _ = make_roster("site-a")
    first.save(tmp_path / "roster.json")
    with pytest.raises(ConfigurationError, match="already exists; refusing to overwrite"):
        make_roster("site-a")[0].save(tmp_path / "roster.json")
    assert load_roster(tmp_path) == first


def test_check_identity_accepts_only_the_enrolled_key_in_the_enrolled_role():
    roster, identities = make_roster("site-a")
    roster.check_identity(identities["site-a"], "client")
    roster.check_identity(identities["server"])
    with pytest.raises(ConfigurationError, match="enrols 'site-a' as a client, not a server"):
        roster.check_identity(identities["site-a"], "server")
    with pytest.raises(ConfigurationError, match="private key of 'site-a' does not match"):
        roster.check_identity(Identity.generate("site-a"))
    with pytest.raises(ConfigurationError, match="'site-z' is not on the roster"):
        roster.check_identity(Identity.generate("site-z"))


@pytest.mark.parametrize("party_id", ["", "../evil", ".hidden", "-x", "a" * 65, "a/b", None])
def test_bad_party_ids_are_refused(party_id):
    with pytest.raises(ConfigurationError, match="invalid party id"):
        Identity.generate(party_id)
