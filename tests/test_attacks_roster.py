"""Attacks on who is who: public keys that let someone else speak as a party, or agree secrets everyone knows.

The attacker writes the files a federation is assembled from (an enrolment file, a roster with a
correctly recomputed sha256) or advertises a key on the wire; each test shows what the crafted key
would give the attacker under ``cryptography``'s own verification or key agreement, then that the
package refuses the key where it arrives, with one line naming whose key it is.
Sources: RFC 8032 §5.1.3 (decoding), RFC 7748 §5 and §6.1, Chalkias et al., "Taming the many
EdDSAs" (2020, the small-order encodings), Bernstein's Curve25519 validation notes (libsodium's list).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from protocols import ConfigurationError, Envelope, Identity, MessageRejected, Roster, RosterEntry, encode
from protocols.enrolment import build_roster, read_enrolment, save_party_identity
from protocols.identity import check_ed25519_public_key, public_pem, raw_public
from protocols.wire import SIGNATURE_BYTES, new_session_id
from protocols.x25519 import check_x25519_public_key

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493

# The eight Ed25519 points of order dividing 8, canonically encoded (Chalkias et al. 2020).
SMALL_ORDER_ED25519 = [bytes.fromhex(h) for h in (
    "0100000000000000000000000000000000000000000000000000000000000000",  # neutral element, order 1
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
)]
# Non-canonical spellings of small-order points: x = 0 with the sign bit set, and y >= p (RFC 8032 §5.1.3 refuses both).
NON_CANONICAL_ED25519 = [bytes.fromhex(h) for h in (
    "0100000000000000000000000000000000000000000000000000000000000080",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
)]
# u-coordinates of the Curve25519/twist points of order dividing 8 (RFC 7748 §6.1; libsodium's blocklist).
SMALL_ORDER_U = [0, 1, P - 1,
                 325606250916557431795983626356110631294008115727848805560023387167927233504,
                 39382357235489614581723060781553021112529911719440698176882885853963445705823]


def short(raw: bytes) -> str:
    """A test id: the first four and the last byte of a key, where the encodings differ."""
    return raw.hex()[:8] + ".." + raw.hex()[-2:]


def u_bytes(u: int) -> bytes:
    return u.to_bytes(32, "little")


def pem_of(raw: bytes) -> str:
    return public_pem(Ed25519PublicKey.from_public_bytes(raw))  # cryptography loads any 32 bytes


def signed_part(data: bytes) -> bytes:
    return data[:-SIGNATURE_BYTES]


def forge(key: bytes, message: bytes) -> bytes | None:
    """A signature of ``message`` under the small-order ``key`` without any private key: R a small-order point,
    s = 0. Then [s]B = O, and R + [k]A = O whenever R = -[k]A, which one of the eight R's is about once in eight."""
    public = Ed25519PublicKey.from_public_bytes(key)
    for r in SMALL_ORDER_ED25519:
        try:
            public.verify(r + bytes(32), message)
        except InvalidSignature:
            continue
        return r + bytes(32)
    return None


# -- Ed25519 arithmetic (RFC 8032 §5.1), just enough for the attacker who signs under a key with torsion added --

D = -121665 * pow(121666, -1, P) % P
B = (15112221349535400772501151409588531511454012693041857206046113283949847762202,
     46316835694926478169428394003475163141307993866256225615783033603165251855960)  # RFC 8032 §5.1

def add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return (x1 * y2 + x2 * y1) * pow(1 + t, -1, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P


def times(point: tuple[int, int], scalar: int) -> tuple[int, int]:
    result = (0, 1)
    for bit in bin(scalar)[2:]:
        result = add(result, result)
        if bit == "1":
            result = add(result, point)
    return result


def encode_point(point: tuple[int, int]) -> bytes:
    x, y = point
    return (y | (x & 1) << 255).to_bytes(32, "little")


def private_scalar(key: Ed25519PrivateKey) -> tuple[int, bytes]:
    """RFC 8032 §5.1.5: the clamped scalar a and the nonce prefix, from the 32-byte seed."""
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    digest = hashlib.sha512(seed).digest()
    return (int.from_bytes(digest[:32], "little") & ((1 << 254) - 8)) | (1 << 254), digest[32:]


def sign_under(key_bytes: bytes, a: int, message: bytes) -> bytes | None:
    """RFC 8032 §5.1.6 signing with scalar ``a`` but hashing ``key_bytes`` as the public key; None if the
    cofactorless check would fail for this R (then the attacker picks another nonce)."""
    for nonce in range(64):
        r = int.from_bytes(hashlib.sha512(b"attacker nonce %d" % nonce + message).digest(), "little") % L
        big_r = encode_point(times(B, r))
        k = int.from_bytes(hashlib.sha512(big_r + key_bytes + message).digest(), "little") % L
        if k % 2 == 0:  # [k]T = O for the order-2 point T
            return big_r + ((r + k * a) % L).to_bytes(32, "little")
    return None


# -- Ed25519 identity keys: roster and enrolment files --------------------------------------------------------

def write_enrolment(tmp_path: Path, party: str, key: bytes) -> Path:
    """An enrolment file for ``party`` whose public key is ``key``: what anyone assembling a federation can write."""
    save_party_identity(tmp_path / "template", "template", "client")
    raw = json.loads((tmp_path / "template" / "enrolment.json").read_text())
    path = tmp_path / f"{party}.json"
    path.write_text(json.dumps(raw | {"party": party, "public_key": pem_of(key)}))
    return path


def honest_enrolments(tmp_path: Path) -> list[Path]:
    for party, role in (("server", "server"), ("site-a", "client")):
        save_party_identity(tmp_path / party, party, role)
    return [tmp_path / "server" / "enrolment.json", tmp_path / "site-a" / "enrolment.json"]


def test_cryptography_accepts_forged_wire_messages_under_a_small_order_key_so_enrolment_refuses_it(tmp_path):
    # The attacker (say, a malicious server) enrols "site-x" with the neutral element as its key and then signs
    # wire messages as site-x with no private key at all.
    key = SMALL_ORDER_ED25519[0]
    envelope = Envelope("masked", 1, "masked_input", "site-x", "server", {"note": "forged"}, session=new_session_id(),
                        roster="0" * 64)
    body = signed_part(encode(envelope, Identity.generate("site-x")))
    forged = forge(key, body)
    assert forged is not None
    Ed25519PublicKey.from_public_bytes(key).verify(forged, body)  # what Roster.verify would call: it passes

    path = write_enrolment(tmp_path, "site-x", key)
    with pytest.raises(ConfigurationError, match=r"site-x\.json'.*the Ed25519 public key is a point of small order: "
                                                 "anyone can forge signatures"):
        build_roster([*honest_enrolments(tmp_path), path])


@pytest.mark.parametrize("key", SMALL_ORDER_ED25519, ids=short)
def test_every_small_order_key_admits_forgeries_and_every_one_is_refused(tmp_path, key):
    # Vary a field of the message until one of the eight R's fits: about one try in eight per R.
    forged = next(f for f in (forge(key, b"site-x says %d" % i) for i in range(64)) if f is not None)
    assert forged[32:] == bytes(32)  # s = 0: no private key went into it
    with pytest.raises(ConfigurationError, match="point of small order"):
        read_enrolment(write_enrolment(tmp_path, "site-x", key))
    with pytest.raises(ConfigurationError, match="party 'site-x': the Ed25519 public key is a point of small order"):
        RosterEntry("site-x", "client", Ed25519PublicKey.from_public_bytes(key))


@pytest.mark.parametrize("key", NON_CANONICAL_ED25519, ids=short)
def test_non_canonical_encodings_are_refused(key):
    with pytest.raises(ConfigurationError, match="is not canonically encoded"):
        check_ed25519_public_key(key, "party 'site-x'")


def test_a_crafted_roster_file_with_a_recomputed_sha256_cannot_carry_a_small_order_key(tmp_path):
    server, site = Identity.generate("server"), Identity.generate("site-a")
    content = {"version": 1, "parties": {
        "server": {"role": "server", "public_key": public_pem(server.public_key)},
        "site-a": {"role": "client", "public_key": public_pem(site.public_key)},
        "site-x": {"role": "client", "public_key": pem_of(SMALL_ORDER_ED25519[4])},
    }}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (tmp_path / "roster.json").write_text(json.dumps(content | {"sha256": digest}))
    with pytest.raises(ConfigurationError, match=r"roster file '.*roster\.json': party 'site-x': the Ed25519 public "
                                                 "key is a point of small order"):
        Roster.load(tmp_path / "roster.json")


def test_a_key_with_torsion_added_is_a_second_identity_for_one_key_holder_and_is_refused():
    # site-a's owner enrols "site-b" under A + T (T of order 2): other bytes, so a comparison of bytes sees two
    # keys, yet site-a's private scalar signs as site-b whenever the hash is even.
    owner = Ed25519PrivateKey.generate()
    a, _ = private_scalar(owner)
    honest = raw_public(owner.public_key())
    assert encode_point(times(B, a)) == honest
    x, y = times(B, a)
    twin = encode_point(add((x, y), (0, P - 1)))
    assert twin != honest
    message = b"site-b's consistency signature"
    signature = sign_under(twin, a, message)
    assert signature is not None
    Ed25519PublicKey.from_public_bytes(twin).verify(signature, message)  # cryptography accepts it
    with pytest.raises(ConfigurationError, match="party 'site-b': the Ed25519 public key has a small-order component"):
        Roster([RosterEntry("site-a", "client", owner.public_key()),
                RosterEntry("site-b", "client", Ed25519PublicKey.from_public_bytes(twin))])


def test_honest_keys_pass_and_honest_rosters_still_build(tmp_path):
    for _ in range(20):
        key = raw_public(Ed25519PrivateKey.generate().public_key())
        assert check_ed25519_public_key(key, "party 'p'") == key
    roster = build_roster(honest_enrolments(tmp_path))
    assert roster.client_ids == ("site-a",) and roster.server_id == "server"


def test_bytes_that_are_no_point_of_the_curve_are_refused_although_cryptography_loads_them():
    off_curve = (2).to_bytes(32, "little")  # y = 2: (y² - 1)/(d·y² + 1) has no square root
    Ed25519PublicKey.from_public_bytes(off_curve)
    with pytest.raises(ConfigurationError, match="party 'p': the Ed25519 public key is not a point of Ed25519"):
        check_ed25519_public_key(off_curve, "party 'p'")


def test_a_wrong_length_key_is_refused():
    with pytest.raises(ConfigurationError, match="party 'p': an Ed25519 public key is 32 bytes, not 31"):
        check_ed25519_public_key(bytes(31), "party 'p'")


# -- X25519 agreement keys on the wire ------------------------------------------------------------------------

SMALL_ORDER_X25519 = [u_bytes(u) for u in SMALL_ORDER_U]
NON_CANONICAL_SMALL_ORDER_X25519 = [u_bytes(P), u_bytes(P + 1)] + [u_bytes(u | 1 << 255) for u in
                                                                    [*SMALL_ORDER_U, P, P + 1]]


@pytest.mark.parametrize("raw", SMALL_ORDER_X25519 + NON_CANONICAL_SMALL_ORDER_X25519, ids=short)
def test_a_degenerate_x25519_key_would_agree_the_all_zero_secret_and_is_refused_on_arrival(raw):
    # With such a key every agreement is all zero: the library notices only when the secret is computed, as a bare
    # ValueError deep inside a later stage. The check refuses it where the key arrives, naming its owner.
    with pytest.raises(ValueError):
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    canonical = int.from_bytes(raw, "little") < P
    with pytest.raises(MessageRejected, match="site-c's X25519 public key is "
                                              + ("a point of small order" if canonical else "not canonically encoded")):
        check_x25519_public_key(raw, "site-c")


def test_a_second_spelling_of_an_x25519_key_is_the_same_key_and_is_refused():
    # The top bit is masked (RFC 7748 §5): the attacker passes one key off as two distinct keys, compared as bytes.
    honest = X25519PrivateKey.generate()
    raw = honest.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    respelt = raw[:31] + bytes([raw[31] | 0x80])
    peer = X25519PrivateKey.generate()
    assert respelt != raw
    assert peer.exchange(X25519PublicKey.from_public_bytes(respelt)) == peer.exchange(honest.public_key())
    assert check_x25519_public_key(raw, "site-c") == raw
    with pytest.raises(MessageRejected, match="site-c's X25519 public key is not canonically encoded"):
        check_x25519_public_key(respelt, "site-c")


def test_x25519_refusals_name_the_owner_and_the_sender_that_relayed_the_key():
    with pytest.raises(MessageRejected, match="site-c's X25519 public key must be 32 bytes, not 33") as refused:
        check_x25519_public_key(bytes(33), "site-c", sender="server")
    assert refused.value.sender == "server"
    with pytest.raises(MessageRejected) as refused:
        check_x25519_public_key(bytes(32), "the key holder")
    assert refused.value.sender is None and "the key holder's X25519 public key" in str(refused.value)


def test_honest_x25519_keys_pass_unchanged():
    for _ in range(50):
        raw = X25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                    serialization.PublicFormat.Raw)
        assert check_x25519_public_key(raw, "site-c") == raw
