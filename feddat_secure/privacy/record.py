"""Record-level DP settings of one site: noise, clipping, Poisson sampling rate, and what a round spends."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from ..config import RecordPrivacyConfig
from .accounting import GaussianEvent, PrivacyAccountant, calibrate_noise_multiplier, combined_noise_multiplier


@dataclass(frozen=True)
class RecordPrivacy:
    """DP-SGD parameters of one site's local training, fixed for the whole run."""

    noise_multiplier: float  # σ of a batch's first DP-SGD step: noise std = σ · max_grad_norm
    max_grad_norm: float  # C: each record's gradient (per optimizer) is clipped to this L2 norm
    sample_rate: float  # q: each record joins a batch independently with this probability
    dataset_size: int  # N (treated as public: it is also the aggregation weight the server sees)
    local_steps: int  # DP-SGD batches per round
    mechanisms_per_batch: int  # Gaussian mechanisms composed on each batch (2 under FedDAT)
    delta: float
    accountant: str
    budget_epsilon: float  # 0: no budget (the configuration's "unbounded")
    target_epsilon: float  # > 0: noise_multiplier was calibrated to reach it over the planned rounds
    reproducible: bool = False  # sampling and noise from the caller's seeded generator (tests, benchmarks)
    # σ of each of a batch's DP-SGD steps over ``noise_multiplier`` (FedDAT: A_s with the head, then A_c); empty:
    # every step at σ
    step_noise_ratios: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.step_noise_ratios and len(self.step_noise_ratios) != self.mechanisms_per_batch:
            raise ValueError(f"{len(self.step_noise_ratios)} step noise ratios for {self.mechanisms_per_batch} "
                             "DP-SGD steps per batch")

    @property
    def step_noise_multipliers(self) -> tuple[float, ...]:
        """σ of each DP-SGD step of a batch, in the order the trainer takes them."""
        ratios = self.step_noise_ratios or (1.0,) * self.mechanisms_per_batch
        return tuple(self.noise_multiplier * ratio for ratio in ratios)

    def generators(self, rng: np.random.Generator) -> tuple[np.random.Generator, torch.Generator]:
        """(batch sampler, noise generator) for a round. Both must stay secret: knowing which
        records were sampled voids the amplification, knowing the noise voids everything. So they
        come from the OS's entropy, unless ``reproducible`` (then from ``rng``, seeded by the run)."""
        source = rng if self.reproducible else np.random.default_rng(secrets.randbits(128))
        return source, torch.Generator().manual_seed(int(source.integers(2**63 - 1)))

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.dataset_size

    @property
    def accounted_noise_multiplier(self) -> float:
        """The noise multiplier of the one Gaussian mechanism a batch amounts to: (Σ σ_i⁻²)^-½ over its steps
        (σ/√k when they are equal)."""
        return combined_noise_multiplier(self.step_noise_multipliers)

    def round_events(self, steps: int | None = None) -> list[GaussianEvent]:
        """What a round of ``steps`` batches (default: ``local_steps``) spends."""
        count = self.local_steps if steps is None else steps
        return [GaussianEvent(self.accounted_noise_multiplier, self.sample_rate, count)]

    def new_accountant(self, client: str | None) -> PrivacyAccountant:
        return PrivacyAccountant(level="record", client=client, accountant=self.accountant, delta=self.delta,
                                 budget_epsilon=self.budget_epsilon, per_round=self.round_events())

    def describe(self) -> dict:
        return {"mechanism": "DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise)",
                "noise_multiplier": self.noise_multiplier,
                "step_noise_multipliers": list(self.step_noise_multipliers), "accounted_noise_multiplier":
                self.accounted_noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate, "dataset_size": self.dataset_size,
                "expected_batch_size": self.expected_batch_size, "local_steps": self.local_steps,
                "mechanisms_per_batch": self.mechanisms_per_batch, "delta": self.delta,
                "accountant": self.accountant, "budget_epsilon": self.budget_epsilon,
                "target_epsilon": self.target_epsilon, "reproducible": self.reproducible}


def make_record_privacy(config: RecordPrivacyConfig, *, dataset_size: int, batch_size: int, local_steps: int,
                        rounds: int, steps_per_batch: int = 1) -> RecordPrivacy | None:
    """The site's DP-SGD settings, or None when record-level DP is off.

    q = batch_size / dataset_size (at most 1). With ``target_epsilon`` > 0 the noise
    multiplier is calibrated so that ``rounds`` rounds of ``local_steps`` batches (a site
    that takes part in every round) stay within it under the configured accountant. The configuration was
    checked when it loaded (feddat_secure.config); impossible arguments here raise ``ValueError``, and so does a
    target ε no noise multiplier reaches.
    """
    if not config.enabled:
        return None
    if dataset_size < 1:
        raise ValueError("record-level DP needs a non-empty local dataset")
    sample_rate = min(1.0, batch_size / dataset_size)
    mechanisms = steps_per_batch
    ratio = config.client_adapter_noise_ratio
    if ratio != 1.0 and mechanisms < 2:
        raise ValueError(f"client_adapter_noise_ratio {ratio:g} needs a second DP-SGD step per batch (FedDAT's "
                         "client adapter); this algorithm takes one")
    ratios = (1.0,) + (ratio,) * (mechanisms - 1)
    sigma = config.noise_multiplier
    if config.target_epsilon > 0:
        sigma = calibrate_noise_multiplier(config.target_epsilon, config.delta, sample_rate=sample_rate,
                                           steps=rounds * local_steps, accountant=config.accountant,
                                           mechanisms_per_step=mechanisms, step_noise_ratios=ratios)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"record-level DP needs a finite noise multiplier > 0, got {sigma}")
    return RecordPrivacy(noise_multiplier=sigma, max_grad_norm=config.max_grad_norm, sample_rate=sample_rate,
                         dataset_size=dataset_size, local_steps=local_steps, mechanisms_per_batch=mechanisms,
                         delta=config.delta, accountant=config.accountant,
                         budget_epsilon=config.budget_epsilon if math.isfinite(config.budget_epsilon) else 0.0,
                         target_epsilon=config.target_epsilon, reproducible=config.reproducible,
                         step_noise_ratios=ratios)
