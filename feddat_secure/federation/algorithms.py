"""The federated algorithms, each declared once: its adapters, which travel, which a site keeps, its trainer.

Adding an algorithm is one :func:`register_algorithm` call; the configuration's choices, the sites' models,
the run's outputs and the server's behaviour all read the declaration. (``centralized`` is not an
algorithm of a federation but a run mode of its own: :mod:`.centralized`.)

What travels of the shared adapter A_s is declared by its LoRA matrices (``Algorithm.travels``): the site's
trainer sends and receives those tensors only (:meth:`~feddat_secure.training.trainers.LocalTrainer.shared_state`,
``load_global``), so the update's layout, the secure-aggregation input, client-level DP's clipping and noise,
the server's global state, its checkpoints and the published global adapter all hold exactly them
(:func:`~feddat_secure.federation.parties.plan_run`). The LoRA variants use it: FFA-LoRA sends B only (A frozen
at the shared initialisation), FedSA-LoRA sends A only (each site keeps its own B).

Importing this module is cheap (no torch): trainers are built by the declaration's factory, which
imports them when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..training.adapter_names import CLIENT, FROZEN_GLOBAL, LORA_A, LORA_B, LORA_MATRICES, SHARED

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..privacy.record import RecordPrivacy
    from ..training.local_model import LocalModel
    from ..training.trainers import LocalTrainer


TrainerFactory = Callable[["RunConfig", "LocalModel", "RecordPrivacy | None", bool, tuple[str, ...]], "LocalTrainer"]


@dataclass(frozen=True)
class Algorithm:
    """How one federated algorithm uses a site's model.

    ``adapters``: the LoRA adapters each site's model holds; ``trainable``: those trained locally;
    ``kept``: those a site saves at the end of a run; ``sends_updates``: whether A_s (and a shared head)
    travels and is aggregated (False: local training only); ``trainer(config, model, record_privacy,
    head_travels, travels)`` builds the site's trainer; ``dp_steps_per_batch``: the DP-SGD steps its trainer
    runs on each Poisson batch under record-level DP (FedDAT's Mutual Knowledge Distillation steps A_s and A_c
    on one batch: two Gaussian mechanisms, accounted as one of multiplier σ/√2).

    ``travels``: the LoRA matrices of A_s that travel and are aggregated (``LORA_A`` = ``"lora_A"``, the
    rank × in down-projections; ``LORA_B`` = ``"lora_B"``, the out × rank up-projections); the others stay on
    the site, each site's own. ``frozen``: the LoRA matrices of the trainable adapters that are never trained
    (``requires_grad`` False, in no optimizer, neither clipped nor noised by DP-SGD): they keep the run's shared
    initialisation, which every site loads from the initial global adapter (``RunPlan.initial_adapter``).
    """

    name: str
    adapters: tuple[str, ...]
    trainable: tuple[str, ...]
    kept: tuple[str, ...]
    sends_updates: bool
    trainer: TrainerFactory
    description: str = ""
    dp_steps_per_batch: int = 1
    travels: tuple[str, ...] = LORA_MATRICES
    frozen: tuple[str, ...] = ()

    @property
    def global_model_whole(self) -> bool:
        """Whether the aggregated state and the shared initialisation make one whole adapter (every LoRA matrix
        travels or is frozen): False when a matrix is each site's own (FedSA-LoRA's B), so that the run has no
        global model, only each site's."""
        return set(self.travels) | set(self.frozen) == set(LORA_MATRICES)


_ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Make ``algorithm`` available by name (config key ``federation.algorithm``); a name is registered once."""
    if algorithm.name in _ALGORITHMS or algorithm.name == "centralized":
        raise ValueError(f"an algorithm named {algorithm.name!r} is already registered")
    if SHARED not in algorithm.adapters or not set(algorithm.kept) <= set(algorithm.adapters):
        raise ValueError(f"algorithm {algorithm.name!r}: the adapters must include {SHARED!r} and every kept one")
    matrices = (*algorithm.travels, *algorithm.frozen)
    if not algorithm.travels or not set(matrices) <= set(LORA_MATRICES) or len(set(matrices)) != len(matrices):
        raise ValueError(f"algorithm {algorithm.name!r}: 'travels' (at least one) and 'frozen' name distinct LoRA "
                         f"matrices of {LORA_MATRICES}")
    _ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(_ALGORITHMS)}") from None


def registered_algorithms() -> tuple[str, ...]:
    return tuple(_ALGORITHMS)


def dp_steps_per_batch(name: str) -> int:
    """DP-SGD steps per batch of the algorithm (or run mode) ``name``: centralized training runs one."""
    return 1 if name == "centralized" else get_algorithm(name).dp_steps_per_batch


def _schedule(config: RunConfig):
    from ..training.trainers import Schedule

    return Schedule(config.training, config.federation.rounds)


def _feddat(config, model, privacy, head_travels, travels):
    from ..training.trainers import FedDATTrainer

    return FedDATTrainer(model, _schedule(config), head_travels=head_travels, privacy=privacy, travels=travels)


def _adapter_trainer(*, proximal: bool, keep_optimizer: bool) -> TrainerFactory:
    def build(config, model, privacy, head_travels, travels):
        from ..training.trainers import AdapterTrainer

        mu = config.federation.fedprox_mu if proximal else 0.0
        return AdapterTrainer(model, _schedule(config), head_travels=head_travels, proximal_mu=mu,
                              keep_optimizer=keep_optimizer, privacy=privacy, travels=travels)

    return build


register_algorithm(Algorithm(
    "feddat", (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT), (SHARED, CLIENT), True, _feddat,
    "FedDAT (Chen et al., AAAI 2024): A_s travels; the Dual-Adapter Teacher (A_c + Â_s) and Mutual Knowledge "
    "Distillation", dp_steps_per_batch=2))
register_algorithm(Algorithm("fedavg", (SHARED,), (SHARED,), (SHARED,), True,
                             _adapter_trainer(proximal=False, keep_optimizer=False), "FedAvg of one shared adapter"))
register_algorithm(Algorithm("fedprox", (SHARED,), (SHARED,), (SHARED,), True,
                             _adapter_trainer(proximal=True, keep_optimizer=False),
                             "FedProx: FedAvg with a proximal term (federation.fedprox_mu)"))
register_algorithm(Algorithm("local", (SHARED,), (SHARED,), (SHARED,), False,
                             _adapter_trainer(proximal=False, keep_optimizer=True),
                             "local training only: nothing travels"))
register_algorithm(Algorithm(
    "ffa-lora", (SHARED,), (SHARED,), (SHARED,), True, _adapter_trainer(proximal=False, keep_optimizer=False),
    "FFA-LoRA (Sun et al., ICLR 2024): every A frozen at the shared initialisation, only B trained and "
    "aggregated (exact: mean(B)·A)", travels=(LORA_B,), frozen=(LORA_A,)))
register_algorithm(Algorithm(
    "fedsa-lora", (SHARED,), (SHARED,), (SHARED,), True, _adapter_trainer(proximal=False, keep_optimizer=False),
    "FedSA-LoRA (Guo et al., ICLR 2025): A and B trained, only A aggregated; each site keeps its own B",
    travels=(LORA_A,)))
