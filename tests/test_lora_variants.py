"""The LoRA variants as federated algorithms: FFA-LoRA (Sun et al., ICLR 2024) freezes every A at the run's
shared initialisation and trains, sends and aggregates B only; FedSA-LoRA (Guo et al., ICLR 2025) trains A and
B but sends and aggregates A only, each site keeping its own B. Exactly the declared matrices travel."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import simulated_federation, small_config
from safetensors.numpy import load_file

from feddat_secure.config import ConfigError, config_from_dict
from feddat_secure.federation import envelopes as E
from feddat_secure.federation.algorithms import get_algorithm
from feddat_secure.federation.server_app import RoundLog
from feddat_secure.model.adapters import AdapterSet
from feddat_secure.training.adapter_names import CLIENT, LORA_A, LORA_B, SHARED, is_matrix
from feddat_secure.training.local_model import HEAD_PREFIX

QUIET = RoundLog(write=lambda record: record, echo=lambda _: None)


def federation_of(tmp_path, foundation, algorithm: str, *, head: str = "local", **sections):
    """3 sites, 2 short rounds, plain aggregation (the sum is exact, so results compare to the last bit)."""
    sections.setdefault("secure_aggregation", {"protocol": "plain"})
    config = small_config(tmp_path, model={"head": head}, federation={"algorithm": algorithm, "rounds": 2},
                          data={"test_per_client": 8}, training={"local_steps": 2}, **sections)
    return simulated_federation(config, foundation)


def matrices(state, matrix: str) -> dict[str, np.ndarray]:
    return {key: value for key, value in state.items() if is_matrix(key, (matrix,))}


def shared_adapter(site) -> dict[str, np.ndarray]:
    return site.trainer.model.adapters.get_state(SHARED)


def train_request(federation, cid: str, round_index: int = 0) -> bytes:
    server = federation.server
    arrays = E.state_arrays(server.global_state)
    fields = {"model_sha256": E.model_digest(arrays), "send_update": True,
              **server.privacy.train_terms(len(federation.sites))}
    return server.stamp.envelope(E.TRAIN, round_index, cid, fields, arrays)


def record_protocol_inputs(federation) -> dict[str, list[np.ndarray]]:
    """Each site's inputs to its secure-aggregation session, round after round, as the site hands them over."""
    inputs = {cid: [] for cid in federation.sites}
    for cid, site in federation.sites.items():
        def set_input(round_index, vector, weight, *args, cid=cid, original=site.aggregation.set_input, **kwargs):
            inputs[cid].append(np.array(vector, copy=True))
            return original(round_index, vector, weight, *args, **kwargs)

        site.aggregation.set_input = set_input
    return inputs


def test_the_config_accepts_the_lora_variants_and_refuses_an_unknown_algorithm_in_one_line():
    for name in ("ffa-lora", "fedsa-lora"):
        assert config_from_dict({"federation": {"algorithm": name}}).federation.algorithm == name
    with pytest.raises(ConfigError) as refused:
        config_from_dict({"federation": {"algorithm": "fedsa"}})
    message = str(refused.value)
    assert "'federation.algorithm' must be one of" in message and "ffa-lora" in message and "\n" not in message


def test_the_declarations_name_what_travels_and_what_is_frozen():
    ffa, fedsa = get_algorithm("ffa-lora"), get_algorithm("fedsa-lora")
    assert (ffa.travels, ffa.frozen, ffa.global_model_whole) == ((LORA_B,), (LORA_A,), True)
    assert (fedsa.travels, fedsa.frozen, fedsa.global_model_whole) == ((LORA_A,), (), False)
    assert get_algorithm("fedavg").travels == (LORA_A, LORA_B)


def test_a_frozen_matrix_stays_frozen_and_out_of_the_trainable_parameters_after_every_adapter_switch(foundation,
                                                                                                     lora):
    import copy

    adapters = AdapterSet(copy.deepcopy(foundation.model), lora, (SHARED, CLIENT), (SHARED, CLIENT),
                          frozen=(LORA_A,))
    named = dict(adapters.peft_model.named_parameters())
    names = {id(p): n for n, p in named.items()}
    for weights in ({SHARED: 1.0, CLIENT: 1.0}, {SHARED: 1.0}, {CLIENT: 1.0}):  # PEFT marks active ones trainable
        adapters.activate(weights)
        for name in (SHARED, CLIENT):
            trainable = adapters.trainable_parameters(name)
            assert trainable and all(f".{LORA_B}." in names[id(p)] for p in trainable)
            for p in adapters.parameters(name):
                assert p.requires_grad == (f".{LORA_B}." in names[id(p)])
    with pytest.raises(ValueError, match="frozen matrices"):
        AdapterSet(copy.deepcopy(foundation.model), lora, (SHARED,), (SHARED,), frozen=("lora_C",))


@pytest.mark.parametrize("head", ["local", "shared"])
def test_ffa_lora_sends_only_b_and_every_a_keeps_the_shared_initialisation(foundation, tmp_path, head):
    federation = federation_of(tmp_path, foundation, "ffa-lora", head=head)
    server, sites, plan = federation.server, federation.sites, federation.plan
    initial = plan.initial_adapter
    assert set(server.global_state) == set(matrices(initial, LORA_B)) | {
        k for k in server.global_state if k.startswith(HEAD_PREFIX)}
    assert any(k.startswith(HEAD_PREFIX) for k in server.global_state) == (head == "shared")
    for site in sites.values():  # every site starts from the one initial A (its own seed would draw another)
        for key, value in matrices(shared_adapter(site), LORA_A).items():
            np.testing.assert_array_equal(value, initial[key])
        frozen = [p for p in site.trainer.model.adapters.parameters(SHARED) if not p.requires_grad]
        assert len(frozen) == len(matrices(initial, LORA_A))  # every A, and only A, is frozen
        assert not {id(p) for p in site.trainer._parameters} & {id(p) for p in frozen}  # in no optimizer
    inputs = record_protocol_inputs(federation)
    server.run(QUIET)
    assert all(len(updates) == 2 and all(u.shape == (server.layout.size,) for u in updates)
               for updates in inputs.values())
    b_values = sum(v.size for v in matrices(initial, LORA_B).values())
    assert server.layout.size - b_values == (sum(v.size for k, v in server.global_state.items()
                                                 if k.startswith(HEAD_PREFIX)))
    moved = matrices(server.global_state, LORA_B)
    assert all(np.any(moved[k] != initial[k]) for k in moved)  # B learnt (PEFT starts it at zero)
    for site in sites.values():
        state = shared_adapter(site)
        for key, value in matrices(state, LORA_A).items():
            np.testing.assert_array_equal(value, initial[key])  # bit-identical after two rounds of training
        for key, value in matrices(state, LORA_B).items():
            np.testing.assert_array_equal(value, server.global_state[key])  # evaluated with the global B
    adapter, _ = plan.global_adapter(server.global_state)  # the published adapter: shared A, aggregated B
    assert adapter == {**matrices(initial, LORA_A), **moved}


def test_ffa_lora_under_record_level_dp_moves_b_and_never_a(foundation, tmp_path):
    federation = federation_of(tmp_path, foundation, "ffa-lora",
                               privacy={"record": {"enabled": True, "noise_multiplier": 1.5, "budget_epsilon": 50}})
    site = federation.sites["client0"]
    private = site.trainer._parameters
    assert {id(p) for p in private} == {id(p) for p in site.trainer.model.adapters.trainable_parameters(SHARED)} \
        | {id(p) for p in site.trainer.model.head_parameters()}
    before = shared_adapter(site)
    site.handle(train_request(federation, "client0"))
    after = shared_adapter(site)
    assert site.trainer.round_events  # the round ran DP-SGD
    for key in matrices(before, LORA_A):
        np.testing.assert_array_equal(after[key], before[key])
    assert all(np.any(after[key] != before[key]) for key in matrices(before, LORA_B))


def test_fedsa_lora_sends_only_a_and_each_site_keeps_its_own_b(foundation, tmp_path):
    federation = federation_of(tmp_path, foundation, "fedsa-lora")
    server, sites, plan = federation.server, federation.sites, federation.plan
    assert set(server.global_state) == set(matrices(plan.initial_adapter, LORA_A))
    inputs = record_protocol_inputs(federation)
    server.run(QUIET)
    assert all(len(updates) == 2 and all(u.shape == (server.layout.size,) for u in updates)
               for updates in inputs.values())
    assert server.layout.size == sum(v.size for v in server.global_state.values())
    states = {cid: shared_adapter(site) for cid, site in sites.items()}
    for state in states.values():  # the evaluated (and saved) model: the global A with the site's own B
        for key, value in matrices(state, LORA_A).items():
            np.testing.assert_array_equal(value, server.global_state[key])
    own_b = [matrices(state, LORA_B) for state in states.values()]
    for i, first in enumerate(own_b):
        assert all(np.any(value != 0) for value in first.values())  # trained from PEFT's zero start
        for second in own_b[i + 1:]:
            assert all(np.any(first[key] != second[key]) for key in first)
    assert plan.global_adapter(server.global_state) == (None, {})  # no global model: B is each site's own

    site = sites["client1"]
    site.save_outputs()
    saved = load_file(str(site.folder.path / f"{SHARED}_adapter" / "adapter_model.safetensors"))
    assert saved.keys() == states["client1"].keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(value, states["client1"][key])


@pytest.mark.parametrize("algorithm", ["ffa-lora", "fedsa-lora"])
def test_a_run_publishes_the_global_adapter_only_when_the_aggregate_makes_a_whole_one(tmp_path, algorithm):
    """Masked aggregation (SecAgg+), shared heads: FFA-LoRA's global adapter is the shared A with the aggregated B;
    FedSA-LoRA has none (only the global head), and each site's saved adapter is the global A with its own B."""
    from feddat_secure.federation.runner import run
    from feddat_secure.predictor import Predictor, ResultError

    config = small_config(tmp_path, federation={"algorithm": algorithm}, model={"head": "shared"})
    result = run(config, progress=False, echo=lambda _: None)
    run_dir, parties = result.run_dir, result.run_dir / "parties"
    aggregated = load_file(str(parties / "server" / "global_state.safetensors"))
    sites = {cid: load_file(str(parties / cid / f"{SHARED}_adapter" / "adapter_model.safetensors"))
             for cid in ("client0", "client1", "client2")}
    exported = run_dir / "global_adapter" / "adapter_model.safetensors"
    if algorithm == "ffa-lora":
        assert set(matrices(aggregated, LORA_A)) == set()
        published = load_file(str(exported))
        for state in sites.values():  # every site ends with the one shared A and the global B
            assert all(np.array_equal(state[k], published[k]) for k in state)
        assert all(np.array_equal(published[k], v) for k, v in matrices(aggregated, LORA_B).items())
        Predictor.from_run(run_dir)  # the global model is whole
    else:
        assert set(matrices(aggregated, LORA_B)) == set()
        assert not exported.exists() and (run_dir / "global_adapter" / "head.safetensors").is_file()
        for state in sites.values():
            assert all(np.array_equal(state[k], v) for k, v in matrices(aggregated, LORA_A).items())
        assert not np.array_equal(*(list(matrices(sites[c], LORA_B).values())[0] for c in ("client0", "client1")))
        with pytest.raises(ResultError, match="has no global model"):
            Predictor.from_run(run_dir)
        Predictor.from_run(run_dir, site="client0")


def test_a_resumed_fedsa_lora_run_ends_with_the_sites_own_b_of_an_uninterrupted_run(tmp_path):
    """Each site's own B is in its checkpoint (it never travels): a run interrupted in round 2 and resumed ends
    with every site's adapter (the global A, its own B) bit-identical to an uninterrupted run's."""
    from feddat_secure.federation.runner import run

    def config(folder):
        return small_config(tmp_path / folder, federation={"algorithm": "fedsa-lora"})

    def crash_in_round_2(text: str) -> None:
        if text.startswith("round   2"):  # round 2 is logged, not yet checkpointed; round 1 is
            raise KeyboardInterrupt

    whole = run(config("whole"), progress=False, echo=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        run(config("parts"), progress=False, echo=crash_in_round_2)
    resumed = run(config("parts"), resume=True, progress=False, echo=lambda _: None)
    for cid in ("client0", "client1", "client2"):
        name = f"parties/{cid}/{SHARED}_adapter/adapter_model.safetensors"
        a, b = load_file(str(whole.run_dir / name)), load_file(str(resumed.run_dir / name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_every_party_binds_the_session_to_the_initial_adapter_it_built_and_a_site_with_another_a_never_opens(
        foundation, tmp_path, monkeypatch):
    import dataclasses

    from feddat_secure.federation import simulation

    federation = federation_of(tmp_path / "agreeing", foundation, "ffa-lora")
    plan = federation.plan
    assert federation.server.plan.config_digest == plan.opening_digest()
    assert all(site.config_digest == plan.opening_digest() for site in federation.sites.values())
    assert plan.opening_digest("a" * 64) != plan.opening_digest("b" * 64)  # a deployment's agreement is bound too

    build_site = simulation.build_site

    def build_with_another_a(plan, folder, *args, **kwargs):  # as a site whose torch or PEFT initialised A otherwise
        if folder.party_id == "client0":
            key = next(key for key in plan.initial_adapter if is_matrix(key, (LORA_A,)))
            nudged = np.nextafter(plan.initial_adapter[key], np.float32(1))  # the last bit of a matrix never sent
            plan = dataclasses.replace(plan, initial_adapter={**plan.initial_adapter, key: nudged})
        return build_site(plan, folder, *args, **kwargs)

    monkeypatch.setattr(simulation, "build_site", build_with_another_a)
    with pytest.raises(Exception, match="no acceptable answer to 'open' from client0; "):
        federation_of(tmp_path / "disagreeing", foundation, "ffa-lora")
