"""The in-process federation: builds every party, moves only bytes between them, records a run.

Output folder ``<output_dir>/<name>/``: ``config.toml`` (resolved), ``metrics.jsonl`` (one
line per round), ``global_adapter/`` (PEFT format), ``clients/<id>/`` (each site's
adapters, and its head when heads stay local) and ``manifest.json`` with SHA-256 digests
of the base model, data, config and every file written. The manifest is written last:
a run folder without one did not finish.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from ..config import ConfigError, RunConfig, to_dict, to_toml
from ..data import Benchmark, ClientData, build_benchmark
from ..data.batching import EncodedSplit, encode_split
from ..model.adapters import LoraSettings, save_peft_adapter
from ..model.backbone import Foundation, load_foundation
from ..training.local_model import LocalModel, split_head
from ..training.trainers import CLIENT, FROZEN_GLOBAL, SHARED, AdapterTrainer, FedDATTrainer, Schedule
from .client import FederatedClient
from .server import FederationServer
from .transport import InProcessTransport

MODES = ("dat", "shared", "client")  # FedDAT's three ways to answer; baselines only have "shared"


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)

    @property
    def final_mean(self) -> dict[str, float]:
        return self.history[-1]["mean"]


def run(config: RunConfig, *, overwrite: bool = False, progress: bool = True,
        echo: Callable[[str], None] = tqdm.write) -> RunResult:
    foundation = load_foundation(config.model.path, random_init=config.model.random_init, seed=config.seed)
    benchmark = build_benchmark(config.data.benchmark, path=config.data.path, num_clients=config.data.num_clients,
                                train_per_client=config.data.train_per_client,
                                test_per_client=config.data.test_per_client, image_size=foundation.image_size,
                                seed=config.seed)
    per_round = config.participants_per_round(len(benchmark.clients))
    if per_round > len(benchmark.clients):
        raise ConfigError(f"key 'federation.clients_per_round' is {per_round}, more than the "
                          f"{len(benchmark.clients)} clients in {config.data.path!r}")
    label_spaces = {c.client_id: _label_space(config, benchmark, c) for c in benchmark.clients}
    splits = {c.client_id: _encode(foundation, label_spaces[c.client_id], c.train, c.test)
              for c in benchmark.clients}
    run_dir = _prepare_run_dir(Path(config.output_dir) / config.name, overwrite)
    (run_dir / "config.toml").write_text(to_toml(config))
    lora = LoraSettings(config.model.lora_rank, config.model.lora_alpha, config.model.lora_dropout,
                        config.model.target_modules)
    echo(f"feddat-secure: {config.federation.algorithm} on {benchmark.name} ({len(benchmark.clients)} clients, "
         f"{per_round} per round, {config.federation.rounds} rounds), model {foundation.path.name}, "
         f"aggregation: plain (no secure aggregation in this build)")
    if config.federation.algorithm == "centralized":
        history, global_state = _run_centralized(config, foundation, benchmark, splits, lora, run_dir, progress,
                                                 echo)
    else:
        history, global_state = _run_federated(config, foundation, benchmark, splits, label_spaces, lora, run_dir,
                                               progress, echo)
    if global_state is not None:
        adapter, head = split_head(global_state)
        save_peft_adapter(adapter, lora, foundation.path, run_dir / "global_adapter")
        if head:
            save_file(head, str(run_dir / "global_adapter" / "head.safetensors"))
            _write_answers(run_dir / "global_adapter", benchmark.answers)
    _write_manifest(run_dir, config, foundation, benchmark)
    return RunResult(run_dir, history)


def _label_space(config: RunConfig, benchmark: Benchmark, client: ClientData) -> tuple[str, ...]:
    """A local head answers over the site's own answer set (as in the paper); a head that is
    aggregated, or the one centralized model, over the benchmark's whole vocabulary."""
    local = config.model.head == "local" and config.federation.algorithm != "centralized"
    return client.answers if local else benchmark.answers


def _encode(foundation: Foundation, answers: tuple[str, ...], train, test) -> tuple[EncodedSplit, EncodedSplit]:
    index = {answer: i for i, answer in enumerate(answers)}
    return tuple(encode_split(split, foundation.tokenizer, index, foundation.max_text_length,
                              foundation.image_size) for split in (train, test))


def _prepare_run_dir(run_dir: Path, overwrite: bool) -> Path:
    if run_dir.exists():
        if not overwrite:
            raise ConfigError(f"run folder {str(run_dir)!r} already exists; choose another 'name' or pass "
                              "--overwrite")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def _head_travels(config: RunConfig) -> bool:
    return config.model.head == "shared" and config.federation.algorithm != "local"


def _make_trainer(config: RunConfig, model: LocalModel, *, pooled_steps: int = 0):
    """``pooled_steps``: centralized training, one model taking that many steps per round."""
    algorithm = config.federation.algorithm
    training = dataclasses.replace(config.training, local_steps=pooled_steps) if pooled_steps else config.training
    schedule = Schedule(training, config.federation.rounds)
    head_travels = _head_travels(config)
    if algorithm == "feddat":
        return FedDATTrainer(model, schedule, head_travels=head_travels)
    mu = config.federation.fedprox_mu if algorithm == "fedprox" else 0.0
    persistent = algorithm == "local" or bool(pooled_steps)
    return AdapterTrainer(model, schedule, head_travels=head_travels, proximal_mu=mu, keep_optimizer=persistent)


def _adapter_names(algorithm: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if algorithm == "feddat":
        return (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT)
    return (SHARED,), (SHARED,)


def _run_federated(config, foundation, benchmark, splits, label_spaces, lora, run_dir, progress, echo):
    algorithm = config.federation.algorithm
    names, trainable = _adapter_names(algorithm)
    num_answers = len(benchmark.answers)
    ids = [c.client_id for c in benchmark.clients]
    # The initial global state comes from one seeded model; every site starts from it.
    initial = LocalModel(foundation, lora, (SHARED,), (SHARED,), num_answers, seed=config.seed)
    initial_state = initial.adapters.get_state(SHARED)
    if _head_travels(config):
        initial_state.update(initial.head_state())
    del initial
    server = FederationServer(initial_state, aggregation=config.federation.aggregation,
                              aggregate=algorithm != "local")
    clients = {}
    for index, cid in enumerate(ids):
        model = LocalModel(foundation, lora, names, trainable, len(label_spaces[cid]),
                           seed=config.seed * 1000 + index + 1)
        clients[cid] = FederatedClient(cid, _make_trainer(config, model), *splits[cid],
                                       batch_size=config.training.batch_size,
                                       local_steps=config.training.local_steps, seed=config.seed * 1000 + index)
    transport = InProcessTransport()
    sampler = np.random.default_rng([config.seed, 7])
    per_round = config.participants_per_round(len(ids))
    history = []
    bar = tqdm(total=config.federation.rounds * per_round, disable=not progress, unit="client", leave=False)
    for round_index in range(config.federation.rounds):
        start = time.perf_counter()
        participants = sorted(sampler.choice(ids, size=per_round, replace=False).tolist(), key=ids.index)
        for cid, data in server.train_messages(round_index, participants):
            transport.send(cid, data)
        for cid in participants:
            bar.set_description(f"round {round_index + 1}/{config.federation.rounds} {cid}")
            for data in transport.receive(cid):
                transport.send("server", clients[cid].handle(data))
            bar.update(1)
        losses = server.receive_updates(round_index, participants, transport.receive("server"))
        for cid, data in server.evaluation_messages(round_index, ids):
            transport.send(cid, data)
        for cid in ids:
            for data in transport.receive(cid):
                transport.send("server", clients[cid].handle(data))
        metrics = server.receive_metrics(round_index, ids, transport.receive("server"))
        record = _round_record(round_index, participants, metrics, losses, time.perf_counter() - start)
        record["bytes_to_server_total"] = transport.bytes_received["server"]
        record["bytes_to_clients_total"] = sum(v for k, v in transport.bytes_received.items() if k != "server")
        history.append(_log_round(run_dir, record, echo))
    bar.close()
    for cid, client in clients.items():
        client.save(run_dir / "clients" / cid, foundation.path)
        _write_answers(run_dir / "clients" / cid, label_spaces[cid])
    return history, server.global_state if server.aggregate else None


def _run_centralized(config, foundation, benchmark, splits, lora, run_dir, progress, echo):
    """The upper reference: one model on the pooled data, the same steps as the whole federation."""
    model = LocalModel(foundation, lora, (SHARED,), (SHARED,), len(benchmark.answers), seed=config.seed)
    steps = config.training.local_steps * config.participants_per_round(len(splits))
    trainer = _make_trainer(config, model, pooled_steps=steps)
    pooled = EncodedSplit.concatenate([train for train, _ in splits.values()])
    rng = np.random.default_rng(config.seed)
    history = []
    for round_index in tqdm(range(config.federation.rounds), disable=not progress, leave=False, unit="round"):
        start = time.perf_counter()
        batches = pooled.sample_batches(config.training.batch_size, steps, rng)
        loss = trainer.train_round(batches, round_index)
        metrics = {cid: trainer.evaluate(test) for cid, (_, test) in splits.items()}
        record = _round_record(round_index, list(splits), metrics, {"pooled": loss}, time.perf_counter() - start)
        history.append(_log_round(run_dir, record, echo))
    (run_dir / "clients").mkdir()
    state = model.adapters.get_state(SHARED)
    state.update(model.head_state())  # one model, one head: it is part of the result either way
    return history, state


def _write_answers(folder: Path, answers: tuple[str, ...]) -> None:
    """The answer behind each output of a saved head, in order."""
    (folder / "answers.json").write_text(json.dumps(list(answers), indent=1) + "\n")


def _round_record(round_index, participants, metrics, losses, seconds) -> dict:
    modes = [m for m in MODES if all(m in v for v in metrics.values())]
    mean = {m: float(np.mean([v[m] for v in metrics.values()])) for m in modes}
    return {"round": round_index + 1, "participants": participants, "clients": metrics, "mean": mean,
            "train_loss": losses, "seconds": round(seconds, 3)}


def _log_round(run_dir: Path, record: dict, echo) -> dict:
    with open(run_dir / "metrics.jsonl", "a") as stream:
        stream.write(json.dumps(record, sort_keys=True) + "\n")
    echo(format_round_table(record))
    return record


def format_round_table(record: dict) -> str:
    modes = list(record["mean"])
    header = f"round {record['round']:>3}  " + "".join(f"{m:>8}" for m in modes)
    rows = [header]
    for cid, values in record["clients"].items():
        rows.append(f"{cid:>11}" + "".join(f"{values[m]:8.3f}" for m in modes))
    rows.append(f"{'mean':>11}" + "".join(f"{record['mean'][m]:8.3f}" for m in modes))
    return "\n".join(rows)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(run_dir: Path, config: RunConfig, foundation: Foundation, benchmark: Benchmark) -> None:
    files = {p.relative_to(run_dir).as_posix(): _sha256(p) for p in sorted(run_dir.rglob("*")) if p.is_file()}
    manifest = {
        "base_model": {"path": str(foundation.path), "sha256": foundation.digest},
        "data": {"benchmark": benchmark.name, "sha256": benchmark.digest()},
        "config": {"sha256": config.digest(), "resolved": to_dict(config)},
        "files": files,
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
