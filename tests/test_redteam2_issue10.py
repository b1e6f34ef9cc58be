"""Second red-team pass on issue 10's hardening: attacks played through the package's own parties and signed
messages, after the first pass (tests/test_redteam_issue10.py) and the review fixes.

Each test plays an attack the defence now stops (the two breaks this pass found are fixed: the key holder refuses a
malformed ``open``, and a key recovered through a malformed ciphertext decrypts no input) and that no other test
plays."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi  # noqa: F401  (SEAL's own encoder, evaluator and decryptor, for the attacker)
from test_protocols_he import Harness as HEHarness
from test_protocols_he import chunks_of

from feddat_secure.federation import envelopes as E
from feddat_secure.federation.channel import PartyAudit, Served, ServerLink
from feddat_secure.federation.keyholder_app import KeyHolder
from feddat_secure.federation.protocol_round import run_protocol_round
from feddat_secure.federation.simulation import InMemoryChannel
from protocols import Identity, Outgoing, Roster, make_protocol, new_session_id
from protocols.he import ckks
from protocols.he import client as he_client
from protocols.he import masks as he_masks
from protocols.masked import shamir
from protocols.masked.config import MaskedOptions
from protocols.wire import Envelope, encode, peek

# ------------------------------------------- HE: one colluding site learns the round's secret key from the release

DEGREE = 4096  # the HE harness's N
SEAL_MAGIC, SEAL_VERSION = 0xA15E, (4, 3)


def _seal_header(size: int) -> bytes:
    """SEAL's serialization header, compression "none" (SEAL loads it like its own zstd-compressed output)."""
    return struct.pack("<HBBBBHQ", SEAL_MAGIC, 16, *SEAL_VERSION, 0, 0, size)


def _second_part_only(template, p: np.ndarray, context: ts.Context, scratch: Path):
    """The two-part "ciphertext" (0, p) at ``template``'s level and scale, written in SEAL's own format: what the
    attacker adds to its honest ciphertext to turn its second part c1 into c1 + p."""
    data = np.concatenate([np.zeros(DEGREE, np.uint64), p]).astype("<u8").tobytes()
    array = _seal_header(16 + 8 + len(data)) + struct.pack("<Q", 2 * DEGREE) + data
    body = (struct.pack("<4Q", *template.parms_id()) + b"\x01"
            + struct.pack("<QQQdQ", 2, DEGREE, 1, template.scale, 1) + array)
    scratch.write_bytes(_seal_header(16 + len(body)) + body)
    ciphertext = ts.sealapi.Ciphertext()
    ciphertext.load(context.seal_context().data, str(scratch))
    return ciphertext


def _key_probe(context: ts.Context, chunk: bytes, direction: complex, gain: float, scratch: Path,
               canaries: int = 4) -> bytes:
    """The colluder's own chunk (c0, c1) with c1 replaced by c1 + P, P = Encode(gain·direction on every data slot,
    0 on the public canary slots). It decrypts to m + P·s: the slots carry gain·direction·s(ζ_j) next to m, the
    canary slots nothing. It is still a fresh, two-part, scale-2^40 ciphertext of the right size: every check of
    ``ckks.load_ciphertext`` passes, and nobody but the key holder could tell c1 + P from a fresh c1."""
    vector = ts.ckks_vector_from(context, chunk)
    [ciphertext] = vector.ciphertext()
    seal = context.seal_context().data
    plain = ts.sealapi.Plaintext()
    slots = [direction] * (DEGREE // 2 - canaries) + [0j] * canaries
    ts.sealapi.CKKSEncoder(seal).encode(slots, ciphertext.parms_id(), gain * 2.0**40, plain)
    p = np.array([plain.data(i) for i in range(DEGREE)], dtype=np.uint64)
    ts.sealapi.Evaluator(seal).add_inplace(ciphertext, _second_part_only(ciphertext, p, context, scratch))
    return ckks.tenseal_vector(ciphertext, vector.size(), scratch)


def _secret_key(context: ts.Context, slots: np.ndarray, scratch: Path):
    """The secret key s from its slot values s(ζ_j) (the 4 canary slots unknown, taken as 0): SEAL's encoder at
    scale 1 rounds σ⁻¹(slots) to the nearest integer polynomial (s is ternary, the missing canary slots move each
    coefficient by far less than 1/2) and puts it in NTT form at the key level: a SecretKey's own format."""
    seal = context.seal_context().data
    plain = ts.sealapi.Plaintext()
    ts.sealapi.CKKSEncoder(seal).encode(list(slots), seal.key_parms_id(), 1.0, plain)
    plain.save(str(scratch))
    key = ts.sealapi.SecretKey()
    key.load(seal, str(scratch))
    return key


def _decrypt(context: ts.Context, key, chunk: bytes) -> np.ndarray:
    vector = ts.ckks_vector_from(context, chunk)
    [ciphertext] = vector.ciphertext()
    seal = context.seal_context().data
    plain = ts.sealapi.Plaintext()
    ts.sealapi.Decryptor(seal, key).decrypt(ciphertext, plain)
    return np.array(ts.sealapi.CKKSEncoder(seal).decode_double(plain))[:vector.size()]


def _unmasked(context: ts.Context, chunk: bytes, mask: np.ndarray, scratch: Path) -> bytes:
    """``chunk`` with its mask taken off (what only its client and the key holder can do: they know the seed)."""
    vector = ts.ckks_vector_from(context, chunk)
    [ciphertext] = vector.ciphertext()
    seal = context.seal_context().data
    ts.sealapi.Evaluator(seal).sub_plain_inplace(ciphertext, ckks.rns_plaintext(seal, ciphertext, mask, scratch))
    return ckks.tenseal_vector(ciphertext, vector.size(), scratch)


def _key_coefficients(key) -> list[int]:
    plain = key.data()
    return [plain.data(i) for i in range(plain.coeff_count())]


def test_one_colluding_site_learns_the_rounds_secret_key_but_decrypts_no_input_with_it(tmp_path, monkeypatch):
    """Active key recovery (the chosen-ciphertext counterpart of Li–Micciancio, EUROCRYPT 2021): the colluder
    commits to its own input with the second part of its first two chunks shifted by P = Encode(256 on every data
    slot) and Encode(256·i), 0 on the public canary slots. Receipt, commit-before-reveal, committee (each member
    recomputes the same sum), canaries and ranges all pass: it is the exact sum of the receipted inputs, and its
    decryption is Σm + P·s, i.e. 256·Re s(ζ_j) and −256·Im s(ζ_j) on the data slots of chunks 0 and 1, next to an
    honest sum 256 times smaller. From the released vector the colluder (or a server it shares it with, which
    holds every counted ciphertext; or a committee member, which receives them all) still rebuilds s exactly.
    The defence (protocols/he/masks.py): every ciphertext's first part carries a uniform polynomial mod q that
    only its client and the key holder know, so the victim's ciphertext decrypts under s to its input plus that
    mask: values of magnitude ~2^25 where the input is at most a few hundred. Taking the mask off (which needs
    the victim's sealed seed) would reveal the input exactly: the key is right, the mask is what protects."""
    scratch = tmp_path / "seal.bin"
    harness = HEHarness(3, length=2 * (DEGREE // 2 - 4) + 10)  # chunks 0 and 1 full, the weight in chunk 2
    colluder, victim, gain = "client-2", "client-0", 256.0
    honest_encrypt, honest_masks = he_client.ckks.encrypt, he_masks.masks
    drawn: dict[str, list[np.ndarray]] = {}  # each client's masks, kept by the test to show what they hide

    def probing_encrypt(context, plaintexts, masks):
        chunks = honest_encrypt(context, plaintexts, masks)
        return [_key_probe(context, chunks[0], 1 + 0j, gain, scratch),
                _key_probe(context, chunks[1], 1j, gain, scratch), *chunks[2:]]

    harness.open()
    secret = harness.keyholder._open.context.secret_key().data  # the real key, to compare the recovered one with
    for name, client in harness.clients.items():
        with monkeypatch.context() as patch:
            patch.setattr(he_masks, "masks", lambda *args, _name=name: drawn.setdefault(_name, honest_masks(*args)))
            if name == colluder:  # a site runs whatever client code it likes
                patch.setattr(he_client.ckks, "encrypt", probing_encrypt)
            [commit] = client.handle(harness.contexts[name])
        harness.server.receive(commit.data)
    inputs = harness.reveal()
    result = harness.finish()  # the malformed ciphertext is not refused: the attack's first half works
    per_chunk = DEGREE // 2 - 4
    own = harness.ws[2] * harness.xs[2]  # the colluder's own contribution (a refinement; the honest rest is noise)
    real = (result.vector[:per_chunk] - own[:per_chunk]) / gain
    imaginary = -(result.vector[per_chunk:2 * per_chunk] - own[per_chunk:2 * per_chunk]) / gain
    public = harness.public_context()  # the context every site and the server holds
    key = _secret_key(public, np.concatenate([real + 1j * imaginary, np.zeros(4)]), scratch)
    assert _key_coefficients(key) == _key_coefficients(secret), "the secret key is rebuilt exactly"

    chunk = chunks_of(harness, inputs[victim])[0]
    truth = harness.ws[0] * harness.xs[0][:per_chunk]
    error = np.abs(_decrypt(public, key, chunk)[:per_chunk] - truth)
    assert np.median(error) > 1e4 * np.max(np.abs(truth)), "the victim's ciphertext decrypts to its input + noise"
    np.testing.assert_allclose(_decrypt(public, key, _unmasked(public, chunk, drawn[victim][0], scratch))[:per_chunk],
                               truth, atol=1e-3)  # only the victim's mask stood between the key and its input


# ------------------------------------------------------ federation: a malicious server's request to the key holder


def test_the_key_holder_refuses_an_open_whose_clients_are_not_party_ids():
    """Anything but a refusal escaping a replying party stops the in-process runner (and a deployment's key holder
    process); the key holder's ``open`` used to check that 'clients' is a list but not that its entries are
    strings, so [["client0"]] escaped as a TypeError. Now it is refused."""
    server, keyholder = Identity.generate("server"), Identity.generate("keyholder")
    sites = [Identity.generate(f"client{i}") for i in range(3)]
    roster = Roster.from_identities(server, sites, keyholder)
    party = KeyHolder(keyholder, roster, None, config_digest="c" * 64, protocol=make_protocol("he"),
                      audit=PartyAudit(None, {}))
    served = Served(party, party.audit, server_id="server")
    stamp = E.Stamp(server, roster)
    stamp.session = new_session_id()
    request = stamp.envelope(E.OPEN, 0, "keyholder", {"config_sha256": "c" * 64, "next_round": 0, "resume": False,
                                                      "resumes_session": None, "clients": [["client0"]]})
    assert served.handle(request) == []


# ------------------------------------------- federation: a malicious site abusing the server's relay (relay_to)


class _Refusals(PartyAudit):
    """A party's audit that only counts the messages the party refused."""

    def __init__(self) -> None:
        super().__init__(None, {})
        self.refused: list[str] = []

    def rejected(self, peer: str, data: bytes, reason: str) -> None:
        self.refused.append(reason)


class _Injecting:
    """A malicious site: answers every request honestly, and adds to each answer copies of its own signed
    messages, re-addressed (new envelope, its own signature) to every other party of the round, which the runner's
    relay (protocol_round._deliver) forwards in the next wave."""

    def __init__(self, session, identity: Identity, others: list[str]):
        self.party_id, self._session, self._identity, self._others = identity.party_id, session, identity, others

    def handle(self, data: bytes) -> list[Outgoing]:
        answers = self._session.handle(data)
        injected = []
        for answer in answers:
            header = peek(answer.data)
            decoded = self._session._decode(answer.data)
            for other in self._others:
                for recipient in ("server", other):  # as if addressed to the server, and to the victim itself
                    forged = Envelope(header.protocol, header.round, header.stage, self.party_id, recipient,
                                      decoded.fields, decoded.arrays, decoded.blobs, header.session, header.roster)
                    injected.append(Outgoing(other, encode(forged, self._identity)))
        return [*answers, *injected]


@pytest.mark.parametrize("name", ["masked", "he"])
def test_a_site_injecting_messages_through_the_relay_changes_nothing(name):
    """Every site-to-site message the relay forwards is refused by its recipient (a masked client takes only the
    server's requests; an HE member takes relayed inputs only once announced, from counted clients, once each): the
    round ends with the honest sum, and the runner's relay survives it."""
    options = {"poly_modulus_degree": 4096} if name == "he" else {}
    protocol = make_protocol(name, **options)
    server_identity = Identity.generate("server")
    keyholder_identity = Identity.generate("keyholder") if protocol.needs_keyholder else None
    identities = [Identity.generate(f"client{i}") for i in range(4)]
    roster = Roster.from_identities(server_identity, identities, keyholder_identity)
    session_id = new_session_id()
    server = protocol.server(server_identity, roster, session=session_id)
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-0.2, 0.2, 20) for _ in identities]
    endpoints, audits = {}, {}
    for identity, x in zip(identities, xs):
        client = protocol.client(identity, roster, session=session_id)
        client.set_input(0, x, 1, round_context="model")
        if identity.party_id == "client3":
            client = _Injecting(client, identity, [i.party_id for i in identities if i.party_id != "client3"])
        audits[identity.party_id] = _Refusals()
        endpoints[identity.party_id] = Served(client, audits[identity.party_id], server_id="server")
    if keyholder_identity is not None:
        keyholder = protocol.keyholder(keyholder_identity, roster, session=session_id)
        endpoints["keyholder"] = Served(keyholder, PartyAudit(None, {}), server_id="server")
    link = ServerLink(InMemoryChannel(endpoints), PartyAudit(None, {}))
    clients = [i.party_id for i in identities]
    rejections: list[str] = []
    result = run_protocol_round(server, link, clients, 0, 20, protocol=name, server_id="server",
                                relay_to={*clients, *(["keyholder"] if keyholder_identity else [])},
                                rejections=rejections, answered=set(), round_context="model")
    assert result.counted == tuple(clients)
    np.testing.assert_allclose(result.vector, np.sum(xs, axis=0), atol=1e-3)
    assert all(audits[victim].refused for victim in clients if victim != "client3")  # relayed, and refused


# ------------------------------------------------- masked: the CPU a single lying share holder can cost the server


def test_one_lying_share_holder_costs_at_most_one_decode_per_secret(monkeypatch):
    """Denial of service beyond a round: one malicious site lies in every share it reveals. At the largest
    complete-graph round (n = 48: k = 47, t = 26), with its share first (the worst place: the first t fail), the
    server interpolates once and runs one Berlekamp–Welch decode (≈ 20 ms) per secret, never the 512-subset search
    (that needs more liars than the decoding radius ⌊(k − t)/2⌋ = 10, i.e. 11 colluding holders)."""
    parameters = MaskedOptions().graph_parameters(48)
    k, t = parameters.neighbours, parameters.threshold
    assert (k, t) == (47, 26)
    secret = bytes(range(32))
    shares = shamir.split(secret, t, range(1, k + 1))
    calls = {"interpolate": 0, "berlekamp_welch": 0}
    for function in calls:
        original = getattr(shamir, f"_{function}")

        def counted(*args, _original=original, _name=function):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(shamir, f"_{function}", counted)
    lying = {**shares, 1: (int.from_bytes(shares[1], "big") ^ 1).to_bytes(shamir.SHARE_BYTES, "big")}
    recovered, bad = shamir.recover(lying, t, lambda candidate: candidate == secret)
    assert (recovered, bad) == (secret, {1})
    assert calls == {"interpolate": 1, "berlekamp_welch": 1}
