"""The in-process federation: builds every party, moves only bytes between them, records a run.

Output folder ``<output_dir>/<name>/``: ``config.toml`` (resolved), ``metrics.jsonl`` (one
line per round), ``global_adapter/`` (PEFT format), ``clients/<id>/`` (each site's
adapters, and its head when heads stay local), ``roster.json`` and ``audit/`` (every
party's signed audit log), ``privacy/ledger.json`` when DP is on, ``checkpoint.safetensors``
(the last finished round) and ``manifest.json`` with SHA-256 digests of the base model,
data, config and every file written. The manifest is written last: a run folder without one
did not finish, and ``resume=True`` continues it from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from ..config import ConfigError, RunConfig, load_config, to_dict, to_toml
from ..data import Benchmark, ClientData, build_benchmark
from ..data.batching import EncodedSplit, encode_split
from ..model.adapters import LoraSettings, save_peft_adapter
from ..model.backbone import Foundation, load_foundation
from ..privacy.report import write_privacy_report
from ..privacy.run_privacy import LEDGER_FILE
from ..training.local_model import LocalModel, split_head
from ..training.trainers import SHARED
from .checkpoint import CHECKPOINT_FILE
from .rounds import RoundLog, round_record
from .secure_aggregation import LABELS
from .sites import build_federated_run, make_trainer


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    stopped: str | None = None  # why the run ended before its last round (a privacy budget), if it did

    @property
    def final_mean(self) -> dict[str, float]:
        return self.history[-1]["mean"]


def run(config: RunConfig, *, overwrite: bool = False, resume: bool = False, progress: bool = True,
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
    run_dir = Path(config.output_dir) / config.name
    if resume:
        _check_resumable(run_dir, config)
    else:
        _prepare_run_dir(run_dir, overwrite)
        (run_dir / "config.toml").write_text(to_toml(config))
    lora = LoraSettings(config.model.lora_rank, config.model.lora_alpha, config.model.lora_dropout,
                        config.model.target_modules)
    protocol = "none (pooled data)" if config.federation.algorithm == "centralized" else \
        LABELS[config.secure_aggregation.protocol]
    echo(f"feddat-secure: {config.federation.algorithm} on {benchmark.name} ({len(benchmark.clients)} clients, "
         f"{per_round} per round, {config.federation.rounds} rounds), model {foundation.path.name}, "
         f"aggregation: {protocol}")
    stopped = None
    if config.federation.algorithm == "centralized":
        history, global_state = _run_centralized(config, foundation, benchmark, splits, lora, run_dir, progress,
                                                 echo)
    else:
        try:
            federation = build_federated_run(config, foundation, benchmark, splits, label_spaces, lora, run_dir,
                                             resume=resume)
        except ConfigError:
            if not resume:  # refused before any round: leave no half-made run folder behind
                shutil.rmtree(run_dir)
            raise
        if resume:
            _keep_metrics_until(run_dir, federation.next_round)
            echo(f"feddat-secure: resuming {run_dir} after round {federation.next_round}")
        federation.run(RoundLog(write=lambda record: _log_round(run_dir, record, echo), echo=echo), progress)
        for cid, client in federation.clients.items():
            client.save(run_dir / "clients" / cid, foundation.path)
            _write_answers(run_dir / "clients" / cid, label_spaces[cid])
        history, stopped = federation.history, federation.stopped
        global_state = federation.server.global_state if federation.server.aggregate else None
        federation.finish()
    if global_state is not None:
        adapter, head = split_head(global_state)
        save_peft_adapter(adapter, lora, foundation.path, run_dir / "global_adapter")
        if head:
            save_file(head, str(run_dir / "global_adapter" / "head.safetensors"))
            _write_answers(run_dir / "global_adapter", benchmark.answers)
    _write_manifest(run_dir, config, foundation, benchmark, stopped)
    if (run_dir / LEDGER_FILE).exists():
        report = write_privacy_report(run_dir)
        echo(f"feddat-secure: privacy budget report: {report[0]}")
    return RunResult(run_dir, history, stopped)


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
            raise ConfigError(f"run folder {str(run_dir)!r} already exists; choose another 'name', pass "
                              "--overwrite, or --resume an interrupted run")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def _check_resumable(run_dir: Path, config: RunConfig) -> None:
    """Only an interrupted run of exactly this configuration continues; a finished run is sealed."""
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"cannot resume {str(run_dir)!r}: it holds no run (no config.toml)")
    if (run_dir / "manifest.json").exists():
        raise ConfigError(f"cannot resume {str(run_dir)!r}: the run finished (manifest.json is written); "
                          "start a new run instead")
    if config.federation.algorithm == "centralized":
        raise ConfigError("cannot resume a centralized run (it keeps no checkpoint); run it again")
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise ConfigError(f"cannot resume {str(run_dir)!r}: it stopped before finishing its first round; "
                          "run it again with --overwrite")
    recorded = load_config(run_dir / "config.toml")
    if recorded.digest() != config.digest():
        raise ConfigError(f"cannot resume {str(run_dir)!r} with a different configuration than the one it started "
                          "with (its config.toml)")


def _keep_metrics_until(run_dir: Path, rounds: int) -> None:
    """Drop metrics of rounds after the checkpoint (a crash between logging and checkpointing)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["round"] <= rounds]
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)


def _run_centralized(config, foundation, benchmark, splits, lora, run_dir, progress, echo):
    """The upper reference: one model on the pooled data, the same steps as the whole federation."""
    model = LocalModel(foundation, lora, (SHARED,), (SHARED,), len(benchmark.answers), seed=config.seed)
    steps = config.training.local_steps * config.participants_per_round(len(splits))
    trainer = make_trainer(config, model, pooled_steps=steps)
    pooled = EncodedSplit.concatenate([train for train, _ in splits.values()])
    rng = np.random.default_rng(config.seed)
    history = []
    for round_index in tqdm(range(config.federation.rounds), disable=not progress, leave=False, unit="round"):
        start = time.perf_counter()
        batches = pooled.sample_batches(config.training.batch_size, steps, rng)
        loss = trainer.train_round(batches, round_index)
        metrics = {cid: trainer.evaluate(test) for cid, (_, test) in splits.items()}
        record = round_record(round_index, list(splits), metrics, {"pooled": loss}, time.perf_counter() - start)
        history.append(_log_round(run_dir, record, echo))
    (run_dir / "clients").mkdir()
    state = model.adapters.get_state(SHARED)
    state.update(model.head_state())  # one model, one head: it is part of the result either way
    return history, state


def _write_answers(folder: Path, answers: tuple[str, ...]) -> None:
    """The answer behind each output of a saved head, in order."""
    (folder / "answers.json").write_text(json.dumps(list(answers), indent=1) + "\n")


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


def _write_manifest(run_dir: Path, config: RunConfig, foundation: Foundation, benchmark: Benchmark,
                    stopped: str | None) -> None:
    files = {p.relative_to(run_dir).as_posix(): _sha256(p) for p in sorted(run_dir.rglob("*")) if p.is_file()}
    manifest = {
        "base_model": {"path": str(foundation.path), "sha256": foundation.digest},
        "data": {"benchmark": benchmark.name, "sha256": benchmark.digest()},
        "config": {"sha256": config.digest(), "resolved": to_dict(config)},
        "files": files,
        "finished": "stopped early: " + stopped if stopped else "all rounds",
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
