"""Local training of one site for FedDAT and for the adapter baselines, behind one interface.

A trainer receives the global state (shared adapter, plus the head when heads are shared),
trains on a round's mini-batches and hands back the state that may leave the site.
Anything else (FedDAT's client adapter, a local head, optimizer state) stays inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainingConfig
from ..data.batching import EncodedSplit
from ..model.adapters import AdapterState, check_state_matches
from .local_model import LocalModel, split_head
from .losses import mkd_loss
from .schedule import learning_rate

SHARED = "shared"  # A_s: trained locally, the only adapter that leaves the site
FROZEN_GLOBAL = "global_frozen"  # Â_s: the received global adapter, frozen, half of the teacher
CLIENT = "client"  # A_c: trained locally, never leaves the site, kept across rounds

SHARED_ONLY = {SHARED: 1.0}
DUAL_ADAPTER_TEACHER = {CLIENT: 0.5, FROZEN_GLOBAL: 0.5}  # h + ½·A_c(h) + ½·Â_s(h)
CLIENT_ONLY = {CLIENT: 1.0}


@dataclass(frozen=True)
class Schedule:
    """Where a round sits in the run, so every method gets the same learning rate per step."""

    training: TrainingConfig
    rounds: int

    def rate(self, round_index: int, step: int) -> float:
        return learning_rate(self.training.learning_rate, self.training.schedule, round_index=round_index,
                             step=step, rounds=self.rounds, steps_per_round=self.training.local_steps)


def _set_rate(optimizer: torch.optim.Optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate


class LocalTrainer(ABC):
    def __init__(self, model: LocalModel, schedule: Schedule, *, head_travels: bool) -> None:
        self.model = model
        self.schedule = schedule
        self.head_travels = head_travels

    def _optimizer(self, parameters: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(parameters, lr=self.schedule.training.learning_rate,
                                 weight_decay=self.schedule.training.weight_decay)

    def shared_state(self) -> AdapterState:
        state = self.model.adapters.get_state(SHARED)
        if self.head_travels:
            state.update(self.model.head_state())
        return state

    def load_global(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the received adapters (and a shared head) only once all of the state has passed."""
        adapter, head = split_head(state)
        if head and not self.head_travels:
            raise ValueError("received a head although heads stay local in this run")
        check_state_matches(adapter, self.model.adapters.get_state(SHARED), what="global adapter")
        if self.head_travels:
            check_state_matches(head, self.model.head_state(), what="global head")
            self.model.set_head_state(head)
        for name in self.receivers:
            self.model.adapters.set_state(name, adapter)

    receivers: tuple[str, ...] = (SHARED,)  # adapters replaced by the global adapter each round
    kept: tuple[str, ...] = (SHARED,)  # adapters a site saves at the end of a run

    @abstractmethod
    def train_round(self, batches: Iterable[Mapping[str, torch.Tensor]], round_index: int) -> dict[str, float]:
        """Train on the batches; returns mean losses."""

    @abstractmethod
    def evaluate(self, split: EncodedSplit) -> dict[str, float]:
        """Accuracy of each inference mode on a split."""


class FedDATTrainer(LocalTrainer):
    """Dual-Adapter Teacher with Mutual Knowledge Distillation (Chen et al., AAAI 2024)."""

    def __init__(self, model: LocalModel, schedule: Schedule, *, head_travels: bool) -> None:
        super().__init__(model, schedule, head_travels=head_travels)
        # A_c and its optimizer state persist across rounds; A_s's optimizer restarts each round
        # because A_s itself is replaced by the global adapter.
        self.client_optimizer = self._optimizer(model.adapters.parameters(CLIENT))

    receivers = (SHARED, FROZEN_GLOBAL)
    kept = (SHARED, CLIENT)

    def train_round(self, batches, round_index):
        cfg = self.schedule.training
        shared_optimizer = self._optimizer(self.model.adapters.parameters(SHARED) + self.model.head_parameters())
        optimizers = (shared_optimizer, self.client_optimizer)
        self.model.classifier.train()
        losses = []
        for step, batch in enumerate(batches):
            rate = self.schedule.rate(round_index, step)
            for optimizer in optimizers:
                _set_rate(optimizer, rate)
            labels = batch["labels"]
            with torch.no_grad():  # 1. the teacher pass
                teacher = self.model.logits(batch, DUAL_ADAPTER_TEACHER)
            student = self.model.logits(batch, SHARED_ONLY)  # 2. A_s learns from labels and the DAT
            shared_loss = mkd_loss(student, teacher, labels, temperature=cfg.temperature,
                                   task_weight=cfg.task_weight, distill_weight=cfg.distill_weight)
            student = student.detach()  # taken before A_s's update
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            shared_loss.backward()
            shared_optimizer.step()
            dat = self.model.logits(batch, DUAL_ADAPTER_TEACHER)  # 3. the DAT learns from A_s
            client_loss = mkd_loss(dat, student, labels, temperature=cfg.temperature,
                                   task_weight=cfg.task_weight, distill_weight=cfg.distill_weight)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            client_loss.backward()
            self.client_optimizer.step()
            losses.append((shared_loss.item(), client_loss.item()))
        mean = np.mean(losses, axis=0)
        return {"shared_loss": float(mean[0]), "client_loss": float(mean[1])}

    def evaluate(self, split):
        size = self.schedule.training.eval_batch_size
        return {
            "dat": self.model.accuracy(split, DUAL_ADAPTER_TEACHER, size),
            "shared": self.model.accuracy(split, SHARED_ONLY, size),
            "client": self.model.accuracy(split, CLIENT_ONLY, size),
        }


class AdapterTrainer(LocalTrainer):
    """One adapter trained with cross-entropy: FedAvg, FedProx (``proximal_mu`` > 0), local-only
    and centralized training."""

    def __init__(self, model: LocalModel, schedule: Schedule, *, head_travels: bool, proximal_mu: float = 0.0,
                 keep_optimizer: bool = False) -> None:
        super().__init__(model, schedule, head_travels=head_travels)
        self.proximal_mu = proximal_mu
        self._parameters = model.adapters.parameters(SHARED) + model.head_parameters()
        self._persistent = self._optimizer(self._parameters) if keep_optimizer else None

    def train_round(self, batches, round_index):
        optimizer = self._persistent or self._optimizer(self._parameters)
        anchor = [p.detach().clone() for p in self._proximal_parameters()]
        self.model.classifier.train()
        losses = []
        for step, batch in enumerate(batches):
            _set_rate(optimizer, self.schedule.rate(round_index, step))
            loss = F.cross_entropy(self.model.logits(batch, SHARED_ONLY), batch["labels"])
            if self.proximal_mu:
                distance = sum(((p - a) ** 2).sum() for p, a in zip(self._proximal_parameters(), anchor))
                loss = loss + 0.5 * self.proximal_mu * distance
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return {"shared_loss": float(np.mean(losses))}

    def _proximal_parameters(self) -> list[torch.nn.Parameter]:
        """FedProx pulls towards the global model: what the server sent, not a local head."""
        if not self.proximal_mu:
            return []
        params = self.model.adapters.parameters(SHARED)
        return params + self.model.head_parameters() if self.head_travels else params

    def evaluate(self, split):
        return {"shared": self.model.accuracy(split, SHARED_ONLY, self.schedule.training.eval_batch_size)}
