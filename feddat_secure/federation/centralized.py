"""The centralized run mode: the upper reference, one model trained on the pooled data of every site.

Not a federation (no parties, no messages, no privacy): the same steps per round as the whole federation
takes together, evaluated on every site's test split each round.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data import Benchmark
from ..data.batching import EncodedSplit
from ..model.adapters import LoraSettings
from ..model.backbone import Foundation
from ..training.adapter_names import SHARED
from ..training.local_model import LocalModel
from ..training.trainers import AdapterTrainer, Schedule
from .server_app import mean_accuracies


def run_centralized(config: RunConfig, foundation: Foundation, benchmark: Benchmark,
                    splits: Mapping[str, tuple[EncodedSplit, EncodedSplit]], lora: LoraSettings, run_dir,
                    progress: bool, write: Callable[[dict], dict]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Train and evaluate round by round (``write`` records each round); returns (history, the final state:
    the adapter and the one head)."""
    model = LocalModel(foundation, lora, (SHARED,), (SHARED,), len(benchmark.answers), seed=config.seed)
    steps = config.training.local_steps * config.participants_per_round(len(splits))
    schedule = Schedule(dataclasses.replace(config.training, local_steps=steps), config.federation.rounds)
    trainer = AdapterTrainer(model, schedule, head_travels=config.model.head == "shared", keep_optimizer=True)
    pooled = EncodedSplit.concatenate([train for train, _ in splits.values()])
    rng = np.random.default_rng(config.seed)
    history = []
    for round_index in tqdm(range(config.federation.rounds), disable=not progress, leave=False, unit="round"):
        start = time.perf_counter()
        batches = pooled.sample_batches(config.training.batch_size, steps, rng)
        loss = trainer.train_round(batches, round_index)
        metrics = {cid: trainer.evaluate(test) for cid, (_, test) in splits.items()}
        history.append(write({"round": round_index + 1, "participants": list(splits), "clients": metrics,
                              "mean": mean_accuracies(metrics), "train_loss": {"pooled": loss},
                              "seconds": round(time.perf_counter() - start, 3)}))
    state = model.adapters.get_state(SHARED)
    state.update(model.head_state())  # one model, one head: it is part of the result either way
    return history, state
