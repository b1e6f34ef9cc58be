"""Building the parties of a federated run from its config: trainers, sites, server, protocol, logs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from protocols.identity import KEYHOLDER_ID, SERVER_ID

from ..config import RunConfig
from ..data import Benchmark
from ..model.adapters import LoraSettings
from ..model.backbone import Foundation
from ..training.local_model import LocalModel
from ..training.trainers import CLIENT, FROZEN_GLOBAL, SHARED, AdapterTrainer, FedDATTrainer, Schedule
from .audit_trail import AuditTrail
from .client import FederatedClient
from .identities import run_identities
from .privacy_hooks import build_privacy
from .rounds import FederatedRun
from .secure_aggregation import SecureAggregation
from .server import FederationServer
from .transport import InProcessTransport
from .updates import StateLayout


def head_travels(config: RunConfig) -> bool:
    return config.model.head == "shared" and config.federation.algorithm != "local"


def make_trainer(config: RunConfig, model: LocalModel, *, pooled_steps: int = 0, privacy=None):
    """``pooled_steps``: centralized training, one model taking that many steps per round."""
    algorithm = config.federation.algorithm
    training = dataclasses.replace(config.training, local_steps=pooled_steps) if pooled_steps else config.training
    schedule = Schedule(training, config.federation.rounds)
    travels = head_travels(config)
    if algorithm == "feddat":
        return FedDATTrainer(model, schedule, head_travels=travels, privacy=privacy)
    mu = config.federation.fedprox_mu if algorithm == "fedprox" else 0.0
    persistent = algorithm == "local" or bool(pooled_steps)
    return AdapterTrainer(model, schedule, head_travels=travels, proximal_mu=mu, keep_optimizer=persistent,
                          privacy=privacy)


def adapter_names(algorithm: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if algorithm == "feddat":
        return (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT)
    return (SHARED,), (SHARED,)


def build_federated_run(config: RunConfig, foundation: Foundation, benchmark: Benchmark, splits, label_spaces,
                        lora: LoraSettings, run_dir: Path, *, resume: bool) -> FederatedRun:
    """Every party of the run, wired together; on ``resume`` restored from the run's checkpoint."""
    algorithm = config.federation.algorithm
    names, trainable = adapter_names(algorithm)
    ids = [c.client_id for c in benchmark.clients]
    per_round = config.participants_per_round(len(ids))
    # The initial global state comes from one seeded model; every site starts from it.
    initial = LocalModel(foundation, lora, (SHARED,), (SHARED,), len(benchmark.answers), seed=config.seed)
    initial_state = initial.adapters.get_state(SHARED)
    if head_travels(config):
        initial_state.update(initial.head_state())
    del initial
    layout = StateLayout.of(initial_state)
    sends_updates = algorithm != "local"
    counts = {cid: len(splits[cid][0]) for cid in ids}
    weights = {cid: counts[cid] if config.federation.aggregation == "examples" else 1 for cid in ids}

    identities, roster = run_identities(config.secure_aggregation.keys, run_dir, ids, resume=resume)
    parties = [SERVER_ID, *([KEYHOLDER_ID] if config.secure_aggregation.protocol == "he" else []), *ids]
    audit = AuditTrail(run_dir, {party: identities[party] for party in parties}, enabled=config.audit.enabled,
                       tree_head_every=config.audit.tree_head_every, resume=resume, run_id=config.digest()[:16])
    privacy = build_privacy(config, counts, dimension=layout.size, per_round=per_round)
    transport = InProcessTransport()
    aggregation = None
    if sends_updates:
        largest_round = len(ids) if privacy.client is not None and privacy.client.poisson_sampling else per_round
        aggregation = SecureAggregation(config.secure_aggregation, identities, roster, ids, per_round=largest_round,
                                        vector_length=layout.size + privacy.extra_coordinates, seed=config.seed,
                                        max_weight=max(weights.values()), audit=audit,
                                        count_bytes=transport.account, noise_bound=privacy.noise_bound)
    clients = {}
    for index, cid in enumerate(ids):
        model = LocalModel(foundation, lora, names, trainable, len(label_spaces[cid]),
                           seed=config.seed * 1000 + index + 1)
        clients[cid] = FederatedClient(
            cid, make_trainer(config, model, privacy=privacy.record_settings(cid)), *splits[cid],
            batch_size=config.training.batch_size, local_steps=config.training.local_steps,
            seed=config.seed * 1000 + index, weight=weights[cid],
            aggregation=aggregation.client_session(cid) if aggregation else None, layout=layout,
            update_privacy=privacy.update_step())
    run = FederatedRun(config, run_dir, clients, FederationServer(initial_state, aggregate=sends_updates), layout,
                       aggregation, audit, privacy, transport)
    if resume:
        run.restore()
    else:
        audit.events(run.audit_parties(), "run_started", meta={"protocol": config.secure_aggregation.protocol})
    if aggregation is not None:
        aggregation.setup()
    return run
