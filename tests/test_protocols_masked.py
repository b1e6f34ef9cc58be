"""The masked protocol end to end: exact sums, dropouts at every stage, weights, DP noise, sizes."""

from __future__ import annotations

import numpy as np
import pytest

from protocols import (
    ConfigurationError,
    Identity,
    Roster,
    RoundAborted,
    drive_round,
    make_protocol,
    new_session_id,
    simulate_round,
)
from protocols.masked import MaskedAggregate, largest_safe_weight


def run_masked(updates, weights=None, *, dropouts=None, noise=None, round_id=0, restore=False,
               **options) -> MaskedAggregate:
    """One in-process round, returning the server's full result (with the exact integer sum); with ``restore``,
    each client is rebuilt from its saved state after taking its input (a site agent restarted mid-round)."""
    protocol = make_protocol("masked", **options)
    names = [f"client-{i}" for i in range(len(updates))]
    server_identity, identities = Identity.generate("server"), [Identity.generate(name) for name in names]
    roster = Roster.from_identities(server_identity, identities)
    session = new_session_id()
    clients = {identity.party_id: protocol.client(identity, roster, session=session) for identity in identities}
    for index, name in enumerate(names):
        clients[name].set_input(round_id, updates[index], 1 if weights is None else weights[index],
                                noise=None if noise is None else noise[index])
        if restore:
            clients[name] = protocol.client(identities[index], roster, session=session,
                                            state=clients[name].state_dict())
    return drive_round(protocol.server(server_identity, roster, session=session), clients, None, round_id,
                       len(updates[0]),
                       dropouts={names[i]: stage for i, stage in (dropouts or {}).items()})


def expected_integer_sum(protocol, updates, weights, counted, round_id=0, noise=None) -> np.ndarray:
    """Σ w_i q_i (+ z_i) over the counted clients, quantizing exactly as each client does."""
    options = protocol.options
    total = np.zeros(len(updates[0]), np.int64)
    for index in counted:
        q = options.quantizer.quantize(np.asarray(updates[index], np.float64),
                                       options.rng("rounding", round_id, f"client-{index}"))
        total += weights[index] * q + (0 if noise is None else noise[index])
    return total


def random_updates(n: int, length: int, seed: int, scale: float = 0.3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-scale, scale, size=length) for _ in range(n)]


@pytest.mark.parametrize("case", range(8))
def test_masked_sum_equals_the_plain_sum_of_quantized_inputs_exactly(case):
    rng = np.random.default_rng(100 + case)
    n = int(rng.integers(3, 11))
    complete = bool(rng.integers(2)) or n < 5
    k = n - 1 if complete else int(rng.choice(range(2, n - 1, 2)))
    t = int(rng.integers(k // 2 + 1, k + 1))
    bits = int(rng.integers(1, 21))
    modulus = int(rng.integers(bits + int(np.ceil(np.log2(n))) + 4, 63))
    options = dict(graph="complete" if complete else "sparse", neighbours=0 if complete else k, threshold=t,
                   quantization_bits=bits, modulus_bits=modulus, clip_range=float(rng.uniform(0.05, 2)), seed=case)
    protocol = make_protocol("masked", **options)
    bound = min(largest_safe_weight(n, bits, modulus, 0), 1000)
    weights = [int(w) for w in rng.integers(1, bound + 1, size=n)]
    updates = random_updates(n, 17, case)
    result = run_masked(updates, weights, **options)
    assert result.counted == tuple(f"client-{i}" for i in range(n))
    np.testing.assert_array_equal(result.integer_sum, expected_integer_sum(protocol, updates, weights, range(n)))
    quantizer = protocol.options.quantizer
    offset = quantizer.clip_range * sum(weights)
    np.testing.assert_allclose(result.vector, result.integer_sum * quantizer.scale - offset)
    # and within quantization error of the float weighted sum (clipped)
    clipped = sum(w * np.clip(x, -options["clip_range"], options["clip_range"]) for w, x in zip(weights, updates))
    assert np.abs(result.vector - clipped).max() <= quantizer.scale * sum(weights) + 1e-9


def test_simulate_round_returns_the_weighted_sum_within_quantization():
    updates, weights = random_updates(6, 50, 1, scale=0.2), [3, 1, 4, 1, 5, 9]
    result = simulate_round("masked", updates, weights, seed=3)
    expected = sum(w * x for w, x in zip(weights, updates))
    step = make_protocol("masked").options.quantizer.scale
    assert np.abs(result - expected).max() <= step * sum(weights)


def test_the_same_seed_gives_the_same_result():
    updates = random_updates(5, 30, 2, scale=0.25)  # inside the clip range: nothing clipped, nothing warned
    np.testing.assert_array_equal(simulate_round("masked", updates, seed=7), simulate_round("masked", updates, seed=7))


COUNTED_IF_DROPPED_BEFORE = {"share_keys": False, "masked_input": False, "consistency_check": True, "unmask": True}
TOLERANT_STAGES = tuple(COUNTED_IF_DROPPED_BEFORE)  # before these, the ring is drawn and dropouts are tolerated


@pytest.mark.parametrize("stage", ["commit", "advertise_keys"])
def test_a_dropout_before_the_ring_is_drawn_aborts_the_round_so_the_server_cannot_pick_among_rings(stage):
    # every cohort member's nonce goes into the ring: a server that could drop one reveal would choose the ring
    with pytest.raises(RoundAborted, match="ring needs every member's") as caught:
        run_masked(random_updates(7, 12, 3), dropouts={1: stage}, graph="complete", threshold=4)
    assert caught.value.stage == stage


@pytest.mark.parametrize("stage", TOLERANT_STAGES)
def test_complete_graph_survives_the_largest_dropout_the_threshold_allows(stage):
    # 7 clients, t = 4 of 6 neighbours: every needed client keeps >= 4 live neighbours while <= 2 drop
    updates, weights = random_updates(7, 12, 3), [1, 2, 3, 4, 5, 6, 7]
    options = dict(graph="complete", threshold=4)
    result = run_masked(updates, weights, dropouts={1: stage, 4: stage}, **options)
    counted = [i for i in range(7) if i not in (1, 4) or COUNTED_IF_DROPPED_BEFORE[stage]]
    assert result.counted == tuple(f"client-{i}" for i in counted)
    assert result.total_weight == sum(weights[i] for i in counted)
    np.testing.assert_array_equal(result.integer_sum, expected_integer_sum(make_protocol("masked", **options),
                                                                           updates, weights, counted))


@pytest.mark.parametrize("stage", TOLERANT_STAGES)
def test_one_dropout_too_many_aborts_cleanly_naming_the_stage(stage):
    with pytest.raises(RoundAborted) as caught:
        run_masked(random_updates(7, 12, 3), dropouts={1: stage, 4: stage, 5: stage}, graph="complete", threshold=4)
    assert caught.value.stage == stage
    assert f"stage {stage!r}" in str(caught.value) and "threshold 4" in str(caught.value)


def test_dropouts_spread_over_several_stages():
    updates = random_updates(7, 9, 4)
    dropouts = {0: "share_keys", 3: "unmask"}
    result = run_masked(updates, dropouts=dropouts, graph="complete", threshold=4)
    counted = [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(result.integer_sum, expected_integer_sum(
        make_protocol("masked", graph="complete", threshold=4), updates, [1] * 7, counted))


def sorted_ring(monkeypatch) -> None:
    """Lay the graph on the sorted cohort instead of the commit–reveal ring, so that a test knows who neighbours
    whom before the round (the ring's randomness is tested in test_attacks_masked.py)."""
    for module in ("client", "server"):
        monkeypatch.setattr(f"protocols.masked.{module}.ring_order", lambda seed, cohort: tuple(sorted(cohort)))


@pytest.mark.parametrize("stage", ["share_keys", "masked_input", "unmask"])
def test_sparse_graph_tolerates_k_minus_t_dropouts_per_neighbourhood_and_no_more(stage, monkeypatch):
    from protocols.masked.graph import ring_neighbours

    sorted_ring(monkeypatch)
    n, options = 40, dict(neighbours=4, threshold=3, seed=5)
    near = ring_neighbours(tuple(sorted(f"client-{i}" for i in range(n))), 4)
    # one dropout is k - t = 1 per neighbourhood: fine
    victim = 2
    updates = random_updates(n, 8, 5)
    result = run_masked(updates, dropouts={victim: stage}, **options)
    assert len(result.counted) == (n if stage == "unmask" else n - 1)
    # two dropouts among one client's neighbours leave it 2 < t share holders: abort
    first, second = near["client-0"][:2]
    with pytest.raises(RoundAborted) as caught:
        run_masked(updates, dropouts={int(first.split("-")[1]): stage, int(second.split("-")[1]): stage}, **options)
    assert caught.value.stage == stage


def test_default_sparse_round_with_ten_percent_dropout():
    n = 30
    updates, weights = random_updates(n, 16, 6), list(range(1, n + 1))
    dropouts = {i: TOLERANT_STAGES[i % len(TOLERANT_STAGES)] for i in (0, 10, 21)}
    result = run_masked(updates, weights, dropouts=dropouts, seed=1)
    counted = [i for i in range(n) if i not in dropouts or COUNTED_IF_DROPPED_BEFORE[dropouts[i]]]
    np.testing.assert_array_equal(result.integer_sum, expected_integer_sum(make_protocol("masked", seed=1), updates,
                                                                           weights, counted))


def test_weights_must_be_integers_within_the_overflow_bound():
    updates = random_updates(3, 5, 7)
    with pytest.raises(ConfigurationError, match="integer weights"):
        simulate_round("masked", updates, [1.5, 1, 1])
    too_big = largest_safe_weight(3, 16, 32, 0) + 1
    protocol = make_protocol("masked")
    names = [f"client-{i}" for i in range(3)]
    server_identity, identities = Identity.generate("server"), [Identity.generate(name) for name in names]
    roster = Roster.from_identities(server_identity, identities)
    session = new_session_id()
    clients = {i.party_id: protocol.client(i, roster, session=session) for i in identities}
    for client, weight in zip(clients.values(), [too_big, 1, 1]):
        client.set_input(0, updates[0], weight)
    refusals = []
    with pytest.raises(RoundAborted, match="client-0"):  # the client refuses the round: it cannot take part
        drive_round(protocol.server(server_identity, roster, session=session), clients, None, 0, 5,
                    on_rejection=lambda sender, reason: refusals.append(reason))
    assert any("overflow" in reason for reason in refusals)


def test_overflowing_configuration_is_refused_before_the_round_starts():
    # 4 clients × 2^16 × (2^16 - 1) > 2^32: the classic silent overflow
    protocol = make_protocol("masked", quantization_bits=16, modulus_bits=32, max_weight=2**16)
    with pytest.raises(ConfigurationError, match="overflow: 4 clients"):
        protocol.check(4, 10)
    with pytest.raises(ConfigurationError, match="overflow"):
        simulate_round("masked", random_updates(4, 5, 8), quantization_bits=16, modulus_bits=32, max_weight=2**16)
    with pytest.raises(ConfigurationError, match="overflow"):
        make_protocol("masked", quantization_bits=31, modulus_bits=32).check(3, 10)


def test_distributed_dp_noise_is_added_before_masking_and_decodes_signed():
    n, length, bound = 5, 20, 1000
    rng = np.random.default_rng(9)
    updates = [np.full(length, -0.25) for _ in range(n)]  # q = 0 everywhere: the sum is pure noise
    noise = [rng.integers(-bound, bound + 1, size=length) for _ in range(n)]
    options = dict(noise_bound=bound, graph="complete", threshold=3)
    result = run_masked(updates, noise=noise, **options)
    np.testing.assert_array_equal(result.integer_sum, sum(noise))
    assert (result.integer_sum < 0).any()
    with pytest.raises(ConfigurationError, match="noise_bound"):
        run_masked(updates, noise=[z * 2 for z in noise], **options)


@pytest.mark.parametrize("modulus_bits", [24, 32, 40])
def test_a_client_restored_from_its_saved_state_keeps_its_weighted_noisy_input_exactly(modulus_bits):
    """A client keeps w·q + z in its word type, modulo the word size (two's complement for negative noise); saved
    and restored between its input and the round, it still adds exactly that to the sum."""
    n, length, bound = 4, 300, 50
    rng = np.random.default_rng(modulus_bits)
    updates, weights = random_updates(n, length, modulus_bits), [3, 1, 7, 2]
    noise = [rng.integers(-bound, bound + 1, size=length) for _ in range(n)]
    options = dict(noise_bound=bound, graph="complete", threshold=3, modulus_bits=modulus_bits, quantization_bits=8)
    result = run_masked(updates, weights, noise=noise, restore=True, **options)
    expected = expected_integer_sum(make_protocol("masked", **options), updates, weights, range(n), noise=noise)
    np.testing.assert_array_equal(result.integer_sum, expected)


def test_noise_bound_takes_part_in_the_overflow_check():
    largest = largest_safe_weight(10, 16, 32, 0)
    assert largest_safe_weight(10, 16, 32, 10**6) < largest
    with pytest.raises(ConfigurationError, match="overflow"):
        make_protocol("masked", modulus_bits=32, quantization_bits=16, max_weight=largest, noise_bound=10**6).check(
            10, 5)


@pytest.mark.parametrize(("modulus_bits", "width"), [(32, 4), (24, 3), (20, 3), (16, 2), (40, 5), (62, 8)])
def test_masked_vectors_travel_in_whole_bytes_holding_the_modulus(modulus_bits, width):
    """⌈m/8⌉ bytes a value (protocols/masked/packing.py): 3 at m = 24, not a 4-byte word."""
    protocol = make_protocol("masked", modulus_bits=modulus_bits, quantization_bits=4)
    assert protocol.bytes_per_parameter() == width
    length, sizes = 4096, []
    run = run_masked(random_updates(3, length, 10), modulus_bits=modulus_bits, quantization_bits=4)
    assert run.integer_sum.shape == (length,)
    server_identity, identities = Identity.generate("server"), [Identity.generate(f"c{i}") for i in range(3)]
    roster = Roster.from_identities(server_identity, identities)
    session = new_session_id()
    clients = {i.party_id: protocol.client(i, roster, session=session) for i in identities}
    for client in clients.values():
        client.set_input(0, np.zeros(length), 1)

    def record(sender, recipient, data):
        if recipient == "server":
            sizes.append(len(data))

    drive_round(protocol.server(server_identity, roster, session=session), clients, None, 0, length, deliver=record)
    assert max(sizes) <= width * length + 1024


def test_rounds_follow_one_another_with_fresh_keys():
    protocol = make_protocol("masked", graph="complete", threshold=2)
    server_identity, identities = Identity.generate("server"), [Identity.generate(f"c{i}") for i in range(3)]
    roster = Roster.from_identities(server_identity, identities)
    session = new_session_id()
    server = protocol.server(server_identity, roster, session=session)
    clients = {i.party_id: protocol.client(i, roster, session=session) for i in identities}
    for round_id in (4, 5):
        for client in clients.values():
            client.set_input(round_id, np.full(6, 0.01 * round_id), 2)
        result = drive_round(server, clients, None, round_id, 6)
        np.testing.assert_allclose(result.vector, np.full(6, 3 * 2 * 0.01 * round_id), atol=3 * 2 * 1e-5)
