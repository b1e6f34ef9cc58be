"""The masked protocol's building blocks: Shamir sharing, the PRG, quantization, the graph, the defaults."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_protocols_masked_adversarial import Harness

from protocols import ConfigurationError, MessageRejected, ProtocolError
from protocols.masked import MaskedOptions, Quantizer, default_parameters, shamir
from protocols.masked.graph import neighbours_of, resolve_parameters, ring_neighbours
from protocols.masked.prg import apply_masks, mask_words
from protocols.masked.quantize import ROUNDING_PIECE, largest_safe_weight
from protocols.masked.stages import STAGES


def test_any_t_shares_reconstruct_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [2, 5, 7, 11, 12])
    for subset in itertools.combinations(shares.items(), 3):
        assert shamir.recover(dict(subset), 3, lambda candidate: candidate == secret) == (secret, set())
    with pytest.raises(ProtocolError, match="2 well-formed shares cannot reconstruct a 3-of-n secret"):
        shamir.recover(dict(list(shares.items())[:2]), 3, lambda candidate: True)


def test_prg_is_deterministic_per_seed_and_independent_across_seeds():
    first = mask_words(b"\x01" * 32, 1000, np.dtype(np.uint32))
    assert np.array_equal(first, mask_words(b"\x01" * 32, 1000, np.dtype(np.uint32)))
    assert not np.array_equal(first, mask_words(b"\x02" * 32, 1000, np.dtype(np.uint32)))
    accumulator = np.zeros(1000, np.uint32)
    apply_masks(accumulator, add=[b"\x03" * 32])
    apply_masks(accumulator, subtract=[b"\x03" * 32])
    assert not accumulator.any()
    with pytest.raises(ValueError):
        mask_words(b"\x01" * 4, 10, np.dtype(np.uint32))  # never a folded 32-bit seed


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_masks_are_the_aes_ctr_keystream_whatever_the_pieces_and_workers(monkeypatch, dtype):
    """Fused, split expansion (each worker seeks the keystream to its span, in cache-sized pieces) gives exactly
    the whole keystream of AES-256-CTR from counter 0, and the same accumulator for any worker count."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from protocols.masked import prg
    length = 3 * prg.PIECE_BYTES // np.dtype(dtype).itemsize + 5  # pieces, a span boundary and a ragged end
    seeds = [bytes([k]) * 32 for k in range(1, 6)]

    def keystream(seed):
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        words = np.dtype(dtype).newbyteorder("<")
        return np.frombuffer(encryptor.update(bytes(length * words.itemsize)), words)

    start = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, size=length, dtype=dtype, endpoint=True)
    expected = start + keystream(seeds[0]) + keystream(seeds[1]) - keystream(seeds[2]) + keystream(seeds[3]) \
        - keystream(seeds[4])
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("FEDDAT_SECURE_THREADS", threads)
        accumulator = start.copy()
        apply_masks(accumulator, add=[seeds[0], seeds[1], seeds[3]], subtract=[seeds[2], seeds[4]])
        assert np.array_equal(accumulator, expected)
    assert np.array_equal(mask_words(seeds[0], length, np.dtype(dtype)), keystream(seeds[0]))


def test_stochastic_rounding_is_unbiased_and_stays_on_the_grid():
    quantizer = Quantizer(1.0, 4)
    x = np.full(200_000, 0.123)
    q = quantizer.quantize(x, np.random.default_rng(0))
    assert q.min() >= 0 and q.max() <= quantizer.levels
    assert abs((q * quantizer.scale - 1.0).mean() - 0.123) < 1e-3
    assert set(np.unique(q)) <= {8, 9}


@pytest.mark.parametrize("bits", [16, 32, 33, 48, 52])
def test_stochastic_rounding_is_unbiased_even_at_the_top_of_a_fine_grid(bits):
    """Half-way between two grid points near L, on grids up to 2^52 points: rounded up half of the time (floor(g + u)
    in float64 would round g + u first, which at 48 bits already moves that chance by about 0.015)."""
    quantizer = Quantizer(1.0, bits)
    below = quantizer.levels - 3
    x = (below + 0.5) * quantizer.scale - 1.0
    grid = (x + 1.0) / quantizer.scale
    assert grid - np.floor(grid) == 0.5
    q = quantizer.quantize(np.full(1 << 18, x), np.random.default_rng(1), dtype=np.uint64)
    assert abs(float(np.mean(q - np.uint64(np.floor(grid)))) - 0.5) < 0.005  # 2^18 draws: σ of the mean ≈ 0.001


def whole_vector_rounding(quantizer: Quantizer, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of the whole vector at once, as the module docstring states it."""
    grid = (np.clip(x.astype(np.float64), -quantizer.clip_range, quantizer.clip_range) + quantizer.clip_range) \
        / quantizer.scale
    return np.clip(np.floor(grid + rng.random(grid.shape)), 0, quantizer.levels).astype(np.int64)


@pytest.mark.parametrize("length", [0, 1, ROUNDING_PIECE - 1, ROUNDING_PIECE, 3 * ROUNDING_PIECE + 17])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rounding_piece_by_piece_is_bit_identical_to_rounding_the_whole_vector(length, dtype):
    quantizer = Quantizer(0.25, 16)
    x = np.random.default_rng(length).uniform(-0.4, 0.4, length).astype(dtype)
    q = quantizer.quantize(x, np.random.default_rng(7))
    assert q.dtype == np.int64 and q.shape == x.shape
    assert np.array_equal(q, whole_vector_rounding(quantizer, x, np.random.default_rng(7)))


def test_quantizing_into_a_type_that_cannot_hold_the_grid_is_refused():
    with pytest.raises(ConfigurationError, match="0..65535 do not fit uint8"):
        Quantizer(0.25, 16).quantize(np.zeros(4), np.random.default_rng(0), dtype=np.uint8)
    with pytest.raises(ConfigurationError, match="do not fit float64"):
        Quantizer(0.25, 8).quantize(np.zeros(4), np.random.default_rng(0), dtype=np.float64)
    assert Quantizer(0.25, 8).quantize(np.full(4, 0.25), np.random.default_rng(0), dtype=np.uint8).tolist() == [255] * 4


def test_clipping_maps_the_range_ends_to_the_grid_ends():
    quantizer = Quantizer(0.25, 8)
    q = quantizer.quantize(np.array([-5.0, -0.25, 0.25, 7.0]), np.random.default_rng(0))
    assert q.tolist() == [0, 0, 255, 255]


@given(st.lists(st.integers(1, 50), min_size=1, max_size=6), st.integers(1, 12))
def test_dequantized_sums_are_exact_for_any_counted_subset(weights, bits):
    quantizer = Quantizer(0.5, bits)
    rng = np.random.default_rng(len(weights))
    inputs = [quantizer.quantize(rng.uniform(-1, 1, 4), rng) for _ in weights]
    expected = sum(w * (q * quantizer.scale - 0.5) for w, q in zip(weights, inputs))
    total = sum(w * q for w, q in zip(weights, inputs))
    np.testing.assert_allclose(quantizer.dequantize_sum(total, sum(weights)), expected, atol=1e-9)


def test_largest_safe_weight_is_tight():
    for n, bits, modulus, noise in [(4, 16, 32, 0), (100, 16, 32, 0), (10, 8, 24, 100)]:
        weight = largest_safe_weight(n, bits, modulus, noise)
        levels = 2**bits - 1
        assert n * (weight * levels + 2 * noise) <= 2**modulus - 1 < n * ((weight + 1) * levels + 2 * noise)


@pytest.mark.parametrize("n", [12, 30, 101])
def test_harary_graph_is_k_regular_and_symmetric(n):
    ring = tuple(f"c{i}" for i in np.random.default_rng(n).permutation(n))
    for k in (2, 4, 10):
        near = ring_neighbours(ring, k)
        assert all(len(set(peers)) == k and client not in peers for client, peers in near.items())
        assert all(client in near[peer] for client, peers in near.items() for peer in peers)
        assert all(neighbours_of(ring, k, client) == peers for client, peers in near.items())  # what a client uses
    assert all(len(peers) == n - 1 for peers in ring_neighbours(ring, n - 1).values())
    assert all(neighbours_of(ring, n - 1, client) == peers for client, peers in ring_neighbours(ring, n - 1).items())


def test_bell_defaults_grow_slowly_and_keep_a_safe_threshold():
    table = {n: default_parameters(n) for n in (10, 100, 1000, 10_000)}
    assert table[100].neighbours == 26 and table[100].threshold == 16
    assert [table[n].neighbours for n in sorted(table)] == sorted(table[n].neighbours for n in table)
    assert table[10_000].neighbours < 120
    for parameters in table.values():
        assert parameters.neighbours // 2 < parameters.threshold <= parameters.neighbours
    assert default_parameters(5) == default_parameters(5, "complete")  # small federations: the complete graph
    assert default_parameters(48) == default_parameters(48, "complete")  # up to the measured cut-over


@pytest.mark.parametrize("n", range(3, 201))
def test_default_parameters_tolerate_the_assumed_dropouts_rounded_up(n):
    # issue 10 item 8: 10 % of 16 sites is two, not one; from n = 5 up to n = 120 any ⌈0.1·n⌉ dropouts are tolerated
    # in the worst case, above that each client keeps t live neighbours except with probability 2^-20/n (Bell et
    # al.). Every threshold also keeps 2t − k above the assumed corrupt clients (the semi-malicious bound). Rounds of
    # 3 or 4 sites tolerate no dropout: security first (with 4, t = 2 would give 2t − k = 1, no margin for a
    # colluder).
    import math

    from protocols.masked.graph import CORRECTNESS_BITS, _hypergeometric_pmf

    k, t = default_parameters(n).neighbours, default_parameters(n).threshold
    dropped, corrupt = math.ceil(0.1 * n), max(1, math.ceil(0.05 * n))
    assert k // 2 < t <= k
    assert 2 * t - k >= 2  # one colluding neighbour can never complete both kinds of a site's shares
    if k == n - 1:
        assert 2 * t - k > corrupt
        assert k - t >= (dropped if n >= 5 else 0)
        return
    if n <= 120:
        assert k - t >= dropped
    else:
        assert sum(_hypergeometric_pmf(n, n - dropped, k)[:t]) < 2.0 ** -CORRECTNESS_BITS / n


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(neighbours=5), "even"),
    (dict(neighbours=6, threshold=3), "k/2 < t <= k"),
    (dict(neighbours=6, threshold=7), "k/2 < t <= k"),
])
def test_unsafe_graph_parameters_are_refused(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        resolve_parameters(20, "sparse", kwargs.get("neighbours", 0), kwargs.get("threshold", 0), 0.05, 0.1)


@pytest.mark.parametrize("options", [dict(modulus_bits=63), dict(quantization_bits=32, modulus_bits=32),
                                     dict(clip_range=float("nan")), dict(graph="ring"), dict(threshold=-1),
                                     dict(dropout_rate=0.5)])
def test_bad_options_are_configuration_errors(options):
    with pytest.raises(ConfigurationError):
        MaskedOptions(**options)


VICTIM = Harness(n=4, threshold=3)
VICTIM_ANSWERS = VICTIM.answer()


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(sorted(VICTIM_ANSWERS)), st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 80))
def test_mutated_client_messages_only_ever_raise_message_rejected_at_the_server(sender, position, value, cut):
    data = bytearray(VICTIM_ANSWERS[sender])
    data[position % len(data)] = value
    mutated = bytes(data[:len(data) - cut])
    if mutated == VICTIM_ANSWERS[sender]:
        return
    with pytest.raises(MessageRejected):
        VICTIM.server.receive(mutated)


@settings(max_examples=120, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 80))
def test_mutated_server_requests_only_ever_raise_message_rejected_at_a_client(position, value, cut):
    request = VICTIM.requests["client-0"]
    data = bytearray(request)
    data[position % len(data)] = value
    mutated = bytes(data[:len(data) - cut])
    if mutated == request:
        return
    with pytest.raises(MessageRejected):
        VICTIM.clients["client-0"].handle(mutated)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=9), inner, max_size=3),
                    max_leaves=8)
CLIENT_NAMES = st.sampled_from(["client-0", "client-1", "client-2", "client-3", "server", "x"])


def stage_harness(stages_done: int) -> Harness:
    h = Harness(n=4, threshold=3)
    for _ in range(stages_done):
        h.stage()
    return h


HARNESSES = {done: stage_harness(done) for done in range(len(STAGES))}


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(STAGES) - 1),
       st.dictionaries(st.sampled_from(["cohort", "terms", "round_context", "view", "survivors", "self_mask_of",
                                        "mask_key_of", "weight", "x"]), JSON, max_size=3),
       st.dictionaries(CLIENT_NAMES, st.binary(max_size=200), max_size=3))
def test_well_signed_nonsense_from_the_server_never_raises_anything_but_a_rejection(done, fields, blobs):
    h = HARNESSES[done]
    data = h.forge("server", "client-0", STAGES[done], fields, blobs=blobs)
    try:
        h.clients["client-0"].handle(data)
    except MessageRejected:
        pass  # the only way to refuse; anything else escaping is a bug


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(STAGES) - 1),
       st.dictionaries(st.sampled_from(["weight", "survivors", "self_mask_commitment", "view", "commitment",
                                        "bad_shares_from", "x"]), JSON, max_size=2),
       st.dictionaries(st.sampled_from(["cipher_key", "mask_key", "nonce", "client-1", "self_mask/client-1", "masked"]),
                       st.binary(max_size=80), max_size=3),
       st.sampled_from([None, "uint32", "uint64", "float64"]))
def test_well_signed_nonsense_from_a_client_never_raises_anything_but_a_rejection(done, fields, blobs, dtype):
    h = HARNESSES[done]
    arrays = {} if dtype is None else {"masked": np.zeros(h.length, dtype)}
    data = h.forge("client-3", "server", STAGES[done], fields, arrays, blobs)
    try:
        h.server.receive(data)  # a well-formed one may even be accepted
    except MessageRejected:
        pass


@pytest.mark.parametrize("modulus_bits", [8, 12, 20, 24, 32, 33, 40, 62])
@pytest.mark.parametrize("length", [1, 2, 5, 4097])
def test_packed_values_add_up_exactly_modulo_the_modulus(monkeypatch, modulus_bits, length):
    """⌈m/8⌉ bytes a value on the wire; the server adds packed bytes through strided words whose high bytes hold
    the next values: those bits lie above m, so the sum modulo 2^m is exact, for any worker count and length."""
    from protocols.masked.config import MaskedOptions
    from protocols.masked.packing import accumulate, high_bits_clear, pack, wire_width
    dtype = MaskedOptions(modulus_bits=modulus_bits, quantization_bits=4).word_dtype
    mask = (1 << modulus_bits) - 1
    rng = np.random.default_rng(modulus_bits * 10_000 + length)
    inputs = [rng.integers(0, mask, size=length, dtype=dtype, endpoint=True) for _ in range(4)]
    width = wire_width(modulus_bits)
    packed = [np.ascontiguousarray(pack(words, width)) for words in inputs]  # what wire.encode sends
    assert all(p.shape == (length, width) and p.dtype == np.uint8 and high_bits_clear(p, modulus_bits)
               for p in packed)
    expected = [sum(int(words[i]) for words in inputs) & mask for i in range(length)]
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("FEDDAT_SECURE_THREADS", threads)
        total = np.zeros(length, dtype)
        for p in packed:
            accumulate(total, p)
        assert [int(value) & mask for value in total] == expected


def test_a_packed_value_with_bits_above_the_modulus_is_detected():
    from protocols.masked.packing import high_bits_clear
    packed = np.zeros((3, 3), np.uint8)
    assert high_bits_clear(packed, 20) and high_bits_clear(packed, 24)
    packed[1, 2] = 0x10  # bit 20 of value 1
    assert not high_bits_clear(packed, 20) and high_bits_clear(packed, 21) and high_bits_clear(packed, 24)
