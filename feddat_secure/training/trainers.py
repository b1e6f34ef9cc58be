"""Local training of one site for FedDAT and for the adapter baselines, behind one interface.

A trainer receives the global state (the travelling LoRA matrices of the shared adapter, plus the head
when heads are shared), trains on a round's mini-batches and hands back the state that may leave the site.
Anything else (FedDAT's client adapter, FedSA-LoRA's B matrices, a local head, optimizer state) stays inside.

With record-level differential privacy (a :class:`~feddat_secure.privacy.record.RecordPrivacy`),
every parameter a trainer updates from data is updated by DP-SGD on Poisson-sampled batches
(:mod:`feddat_secure.privacy.dp_sgd`); the trainer then draws its batches itself
(:meth:`LocalTrainer.train_round_on`) and records the Gaussian mechanisms it ran in
``round_events``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainingConfig
from ..data.batching import EncodedSplit
from ..model.adapters import AdapterState, check_state_matches
from ..privacy.accounting import GaussianEvent
from ..privacy.dp_sgd import PrivateOptimizer, attach_per_sample_gradients, expected_hook_warnings
from ..privacy.record import RecordPrivacy
from .adapter_names import CLIENT, FROZEN_GLOBAL, LORA_MATRICES, SHARED, is_matrix
from .local_model import LocalModel, split_head
from .losses import mkd_loss
from .schedule import learning_rate
from .weight_average import WeightAverage

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
    """A site's training. ``travels``: the LoRA matrices of the shared adapter that leave the site and are
    replaced by the global ones (``Algorithm.travels``: ``"lora_A"``, ``"lora_B"`` or both); the others stay
    the site's own."""

    def __init__(self, model: LocalModel, schedule: Schedule, *, head_travels: bool,
                 privacy: RecordPrivacy | None = None, travels: tuple[str, ...] = LORA_MATRICES) -> None:
        if not travels or not set(travels) <= set(LORA_MATRICES):
            raise ValueError(f"the travelling matrices {travels!r} must be some of {LORA_MATRICES}")
        self.model = model
        self.schedule = schedule
        self.head_travels = head_travels
        self.privacy = privacy
        self.travels = tuple(travels)
        self.round_events: list[GaussianEvent] = []  # the DP mechanisms the last round ran (empty without DP)
        self.average: WeightAverage | None = None  # the EMA of the site's own parameters (training.ema_decay)

    def averaged(self) -> contextlib.AbstractContextManager:
        """Within the block the site's own parameters hold their EMA (``training.ema_decay`` > 0), as they do
        whenever the site evaluates or saves its model; without an EMA, nothing changes."""
        return self.average.swapped_in() if self.average is not None else contextlib.nullcontext()

    def _step_taken(self) -> None:
        if self.average is not None:
            self.average.update()

    def train_round_on(self, split: EncodedSplit, rng: np.random.Generator, round_index: int) -> dict[str, float]:
        """Train one round on batches drawn from ``split``: the seeded mini-batches of
        :meth:`EncodedSplit.sample_batches` without DP, Poisson batches with record-level DP.

        With DP the returned dictionary is empty: training losses are computed from the
        records without noise, so they must not leave the site.
        """
        training = self.schedule.training
        if self.privacy is None:
            self.round_events = []
            return self.train_round(split.sample_batches(training.batch_size, training.local_steps, rng), round_index)
        if len(split) != self.privacy.dataset_size:
            raise ValueError(f"record-level DP was set up for {self.privacy.dataset_size} records, the split has "
                             f"{len(split)}")
        sampler, generator = self.privacy.generators(rng)
        batches = split.poisson_batches(self.privacy.sample_rate, self.privacy.local_steps, sampler)
        with expected_hook_warnings():
            self._train_private_round(batches, round_index, generator)
        self.round_events = self.privacy.round_events()
        return {}

    def _private(self, optimizer: torch.optim.Optimizer, generator: torch.Generator, step: int = 0
                 ) -> PrivateOptimizer:
        """``optimizer`` as the ``step``-th DP-SGD step of each batch, with that step's noise multiplier."""
        return PrivateOptimizer(optimizer, noise_multiplier=self.privacy.step_noise_multipliers[step],
                                max_grad_norm=self.privacy.max_grad_norm,
                                expected_batch_size=self.privacy.expected_batch_size, generator=generator)

    def _train_private_round(self, batches: Iterable[Mapping[str, torch.Tensor]], round_index: int,
                             generator: torch.Generator) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no record-level DP training")

    def _optimizer(self, parameters: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(parameters, lr=self.schedule.training.learning_rate,
                                 weight_decay=self.schedule.training.weight_decay)

    def shared_state(self) -> AdapterState:
        """What may leave the site: the travelling matrices of the shared adapter (PEFT key names), and the
        head when it travels."""
        state = self._travelling(self.model.adapters.get_state(SHARED))
        if self.head_travels:
            state.update(self.model.head_state())
        return state

    def load_global(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the travelling matrices of the received adapters (and a shared head) with the global state's,
        only once all of the state has passed; each receiver keeps its other matrices."""
        adapter, head = split_head(state)
        if head and not self.head_travels:
            raise ValueError("received a head although heads stay local in this run")
        check_state_matches(adapter, self._travelling(self.model.adapters.get_state(SHARED)), what="global adapter")
        if self.head_travels:
            check_state_matches(head, self.model.head_state(), what="global head")
            self.model.set_head_state(head)
        for name in self.receivers:
            self.model.adapters.set_state(name, {**self.model.adapters.get_state(name), **adapter})

    def _travelling(self, adapter: Mapping[str, np.ndarray]) -> AdapterState:
        return {key: value for key, value in adapter.items() if is_matrix(key, self.travels)}

    def state_dict(self) -> dict:
        """Everything that persists across rounds on this site (for round checkpoints): every adapter,
        the head and the optimizers that are kept between rounds. Arrays and plain values only."""
        return {
            "adapters": {name: self.model.adapters.get_state(name) for name in self.model.adapters.names},
            "head": self.model.head_state(),
            "optimizers": {name: optimizer.state_dict() for name, optimizer in self._kept_optimizers().items()},
            "average": self.average.state_dict() if self.average is not None else None,
        }

    def load_state_dict(self, state: Mapping) -> None:
        kept = self._kept_optimizers()
        if set(state["optimizers"]) != set(kept):
            raise ValueError(f"saved optimizers {sorted(state['optimizers'])} do not match this trainer's "
                             f"{sorted(kept)}")
        average = state.get("average")
        if (average is None) != (self.average is None):
            raise ValueError("the saved state and this trainer disagree on whether an EMA of the weights is kept "
                             "(training.ema_decay)")
        if self.average is not None:
            self.average.load_state_dict(average)
        for name, adapter in state["adapters"].items():
            self.model.adapters.set_state(name, adapter)
        self.model.set_head_state(state["head"])
        for name, optimizer in kept.items():
            optimizer.load_state_dict(state["optimizers"][name])

    def _kept_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

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

    def __init__(self, model: LocalModel, schedule: Schedule, *, head_travels: bool,
                 privacy: RecordPrivacy | None = None, travels: tuple[str, ...] = LORA_MATRICES) -> None:
        super().__init__(model, schedule, head_travels=head_travels, privacy=privacy, travels=travels)
        # A_c and its optimizer state persist across rounds; A_s's optimizer restarts each round
        # because A_s itself is replaced by the global adapter. The ablation head_in_dat_loss puts the head in
        # A_c's optimizer too, so that the DAT's loss also steps it: the head then takes two AdamW steps per batch
        # (A_s's optimizer on A_s's loss, A_c's on the DAT's), each with its own moments.
        training = schedule.training
        if privacy is not None and (training.client_adapter_rounds or training.head_in_dat_loss):
            raise ValueError("FedDAT's ablations (client_adapter_rounds, head_in_dat_loss) are non-private only")
        self.client_optimizer = self._optimizer(model.adapters.trainable_parameters(CLIENT)
                                                + (model.head_parameters() if training.head_in_dat_loss else []))
        if privacy is not None:  # A_s and the head, and A_c (the teacher of A_s): all DP-SGD
            attach_per_sample_gradients(model.classifier, [self._shared_parameters(), self._client_parameters()])
        if training.ema_decay:  # what never leaves the site: A_c, and the head when it is local
            own = self._client_parameters() + ([] if head_travels else model.head_parameters())
            self.average = WeightAverage(own, training.ema_decay)

    def _kept_optimizers(self):
        return {"client": self.client_optimizer}

    def _shared_parameters(self) -> list[torch.nn.Parameter]:
        return self.model.adapters.trainable_parameters(SHARED) + self.model.head_parameters()

    def _client_parameters(self) -> list[torch.nn.Parameter]:
        return self.model.adapters.trainable_parameters(CLIENT)

    receivers = (SHARED, FROZEN_GLOBAL)
    kept = (SHARED, CLIENT)

    def train_round(self, batches, round_index):
        cfg = self.schedule.training
        shared_optimizer = self._optimizer(self._shared_parameters())
        optimizers = (shared_optimizer, self.client_optimizer)
        train_client = not cfg.client_adapter_rounds or round_index < cfg.client_adapter_rounds
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
            if not train_client:  # the ablation client_adapter_rounds: A_c (and the DAT) learn no more
                losses.append((shared_loss.item(),))
                self._step_taken()
                continue
            dat = self.model.logits(batch, DUAL_ADAPTER_TEACHER)  # 3. the DAT learns from A_s
            client_loss = mkd_loss(dat, student, labels, temperature=cfg.temperature,
                                   task_weight=cfg.task_weight, distill_weight=cfg.distill_weight)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            client_loss.backward()
            self.client_optimizer.step()
            self._step_taken()
            losses.append((shared_loss.item(), client_loss.item()))
        mean = np.mean(losses, axis=0)
        return dict(zip(("shared_loss", "client_loss"), map(float, mean)))

    def _train_private_round(self, batches, round_index, generator):
        """The same three passes per batch, each optimizer step a DP-SGD step of its own.

        Both steps run on the same Poisson batch, so they are accounted as one Gaussian mechanism
        of noise multiplier (σ_s⁻² + σ_c⁻²)^-½, σ/√2 when equal (``RecordPrivacy.accounted_noise_multiplier``;
        ``client_adapter_noise_ratio`` sets σ_c/σ_s).
        Record i's soft targets (teacher logits in step 2, A_s logits in step 3) are computed
        from record i alone with parameters that are themselves DP outputs, so each record's
        loss, and hence its clipped gradient, depends on no other record.
        """
        cfg = self.schedule.training
        shared = self._private(self._optimizer(self._shared_parameters()), generator)
        client = self._private(self.client_optimizer, generator, step=1)
        head = self.model.head_parameters()  # in the DAT's forward pass too, but stepped by A_s's optimizer only
        self.model.classifier.train()
        for step, batch in enumerate(batches):
            rate = self.schedule.rate(round_index, step)
            for private in (shared, client):
                _set_rate(private.optimizer, rate)
            size = len(batch["labels"])
            if size:
                labels = batch["labels"]
                with torch.no_grad():
                    teacher = self.model.logits(batch, DUAL_ADAPTER_TEACHER)
                student = self.model.logits(batch, SHARED_ONLY)
                mkd_loss(student, teacher, labels, temperature=cfg.temperature, task_weight=cfg.task_weight,
                         distill_weight=cfg.distill_weight).backward()
                student = student.detach()
            shared.step(size)
            if size:
                dat = self.model.logits(batch, DUAL_ADAPTER_TEACHER)
                mkd_loss(dat, student, labels, temperature=cfg.temperature, task_weight=cfg.task_weight,
                         distill_weight=cfg.distill_weight).backward()
                for p in head:  # the head takes no step on this loss: drop what backward left on it
                    p.grad, p.grad_sample = None, None
            client.step(size)
            self._step_taken()

    def evaluate(self, split):
        size = self.schedule.training.eval_batch_size
        with self.averaged():
            return {
                "dat": self.model.accuracy(split, DUAL_ADAPTER_TEACHER, size),
                "shared": self.model.accuracy(split, SHARED_ONLY, size),
                "client": self.model.accuracy(split, CLIENT_ONLY, size),
            }


class AdapterTrainer(LocalTrainer):
    """One adapter trained with cross-entropy: FedAvg, FedProx (``proximal_mu`` > 0), local-only,
    FFA-LoRA (its frozen A matrices are in no optimizer: only B and the head are trained, and under
    record-level DP only they are clipped and noised), FedSA-LoRA (``travels``: A only) and centralized
    training."""

    def __init__(self, model: LocalModel, schedule: Schedule, *, head_travels: bool, proximal_mu: float = 0.0,
                 keep_optimizer: bool = False, privacy: RecordPrivacy | None = None,
                 travels: tuple[str, ...] = LORA_MATRICES) -> None:
        super().__init__(model, schedule, head_travels=head_travels, privacy=privacy, travels=travels)
        self.proximal_mu = proximal_mu
        self._parameters = model.adapters.trainable_parameters(SHARED) + model.head_parameters()
        self._persistent = self._optimizer(self._parameters) if keep_optimizer else None
        if privacy is not None:
            attach_per_sample_gradients(model.classifier, [self._parameters])

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

    def _kept_optimizers(self):
        return {"persistent": self._persistent} if self._persistent is not None else {}

    def _train_private_round(self, batches, round_index, generator):
        """DP-SGD on cross-entropy; FedProx's proximal pull is added after the noise (it depends on
        parameters only, never on records)."""
        private = self._private(self._persistent or self._optimizer(self._parameters), generator)
        anchor = [p.detach().clone() for p in self._proximal_parameters()]
        self.model.classifier.train()
        for step, batch in enumerate(batches):
            _set_rate(private.optimizer, self.schedule.rate(round_index, step))
            size = len(batch["labels"])
            if size:
                F.cross_entropy(self.model.logits(batch, SHARED_ONLY), batch["labels"]).backward()
            pull = {p: self.proximal_mu * (p.detach() - a) for p, a in zip(self._proximal_parameters(), anchor)}
            private.step(size, add_gradients=pull)

    def _proximal_parameters(self) -> list[torch.nn.Parameter]:
        """FedProx pulls towards the global model: what the server sent, not a local head."""
        if not self.proximal_mu:
            return []
        params = self.model.adapters.trainable_parameters(SHARED)
        return params + self.model.head_parameters() if self.head_travels else params

    def evaluate(self, split):
        return {"shared": self.model.accuracy(split, SHARED_ONLY, self.schedule.training.eval_batch_size)}
