"""Where a federated run meets differential privacy (feddat_secure.privacy).

Before a round: every budget is checked against what the round would spend, and a round that
would exceed one is not run. On a site, after training: the client-level step on its update
(clip; add local Gaussian noise, or draw the integer noise share the masked protocol adds
before masking). On the server, after the protocol: central Gaussian noise on the sum, and
the fixed denominator of DP-FedAvg. After the round: what was spent goes into the ledgers
(checkpointed with the round) and into the parties' audit logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from protocols.base import AggregateResult
from protocols.identity import SERVER_ID

from ..config import ConfigError, RunConfig
from ..privacy.budget import BudgetExceeded
from ..privacy.client_level import AdaptiveClipping, poisson_participants
from ..privacy.record import RecordPrivacy
from ..privacy.run_privacy import RunPrivacy, make_run_privacy
from .audit_trail import AuditTrail

# Adaptive clipping: each site's b − ½ travels as one extra coordinate of its protocol input, scaled
# into the masked protocol's value range, so the server learns only the sum of the indicators.
INDICATOR_SCALE = 0.2


class PrivacyHooks:
    def __init__(self, ledgers: RunPrivacy, per_round: int) -> None:
        self.ledgers = ledgers
        self.client = ledgers.client
        self._per_round = per_round
        self._participants = per_round
        self._spent: dict[int, dict[str, Any]] = {}

    @property
    def extra_coordinates(self) -> int:
        """Coordinates the protocol carries besides the update (the adaptive-clipping indicator)."""
        return 1 if self.ledgers.adaptive is not None else 0

    # ---------------------------------------------------------------------------- before a round

    def participants(self, ids: Sequence[str], per_round: int, sampler: np.random.Generator) -> list[str]:
        """Poisson sampling of sites when the client-level accountant counts on it; otherwise a
        fixed-size sample (the same draws as a run without DP)."""
        if self.client is not None and self.client.poisson_sampling:
            return poisson_participants(ids, self.client.sample_rate, sampler)
        return sorted(sampler.choice(ids, size=per_round, replace=False).tolist(), key=list(ids).index)

    def refuse_round(self, round_index: int, participants: Sequence[str]) -> str | None:
        """Why the round must not run (a budget it would exceed), or None. Also sizes this round's
        distributed noise shares by its number of participants."""
        self._participants = len(participants)
        try:
            self.ledgers.check_round(round_index, participants)
        except BudgetExceeded as exceeded:
            return "; ".join(exceeded.reasons)
        return None

    # ------------------------------------------------------------------------------------ on a site

    def record_settings(self, client_id: str) -> RecordPrivacy | None:
        return self.ledgers.record.get(client_id)

    def update_step(self):
        """The site's client-level step on its update, or None when client-level DP is off."""
        if self.client is None:
            return None

        def step(update: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
            clip_norm = self.ledgers.clip_norm
            clipped, norm = self.ledgers.clip(update)
            noise = None
            if self.client.placement == "local":
                clipped = clipped + self.ledgers.local_noise(len(clipped), rng)
            elif self.client.placement == "distributed":
                noise = self.client.noise_share(self._participants, self.client.noise_rng(rng))
            if self.ledgers.adaptive is not None:
                indicator = AdaptiveClipping.indicator(norm, clip_norm) * INDICATOR_SCALE
                clipped = np.append(clipped, indicator)
            return clipped, noise

        return step

    @property
    def noise_bound(self) -> int:
        """distributed: the largest |noise| a share may hold, for the masked protocol's overflow check."""
        if self.client is None or self.client.placement != "distributed":
            return 0
        return self.client.noise_bound(self._per_round)

    # ---------------------------------------------------------------------------- on the server

    def aggregate_to_apply(self, result: AggregateResult, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """(the sum of updates to apply, its denominator): without client-level DP Σ w_i·u_i / Σ w_i;
        with it, central noise and DP-FedAvg's fixed denominator, and the adaptive clip norm moves."""
        if self.client is None:
            return result.vector, result.total_weight
        summed = result.vector
        if self.ledgers.adaptive is not None:
            summed, indicators = summed[:-1], float(summed[-1]) / INDICATOR_SCALE
        if self.client.placement == "central":
            summed = summed + self.ledgers.central_noise(len(summed), rng)
        if self.ledgers.adaptive is not None:
            self.ledgers.adapt_clip_norm(indicators, rng)
        return summed, self.client.expected_participants

    # ---------------------------------------------------------------------------- after a round

    def spend(self, round_index: int, participants: Sequence[str], record_events: Mapping[str, list],
              counted: int | None, audit: AuditTrail) -> None:
        """Record-level events always count (the sites' models were trained); the client-level
        mechanism only when the round released an aggregate (``counted`` sites, None if aborted)."""
        spent: dict[str, Any] = {}
        for cid, events in record_events.items():
            epsilon = self.ledgers.spend_record(cid, events, round_index)
            spent[f"record:{cid}"] = epsilon
            audit.event(cid, "privacy_spent", round=round_index,
                        meta={"level": "record", "epsilon": epsilon, "delta": self.ledgers.record[cid].delta})
        if self.client is not None and counted is not None:
            self.ledgers.spend_client(round_index, participants, counted)
            for accountant in self.ledgers.client_accountants.values():
                if accountant.client is not None and accountant.client not in participants:
                    continue
                epsilon = accountant.epsilon()
                spent[f"client:{accountant.client or 'federation'}"] = epsilon
                audit.event(accountant.client or SERVER_ID, "privacy_spent", round=round_index,
                            meta={"level": "client", "epsilon": epsilon, "delta": accountant.delta})
        self._spent[round_index] = spent

    def round_summary(self, round_index: int) -> dict[str, Any]:
        return self._spent.get(round_index, {})

    def write(self, run_dir: Path) -> None:
        if self.ledgers.enabled:
            self.ledgers.write(run_dir)

    def state_dict(self) -> dict[str, Any]:
        return self.ledgers.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ledgers.load_state_dict(state)


def build_privacy(config: RunConfig, counts: Mapping[str, int], *, dimension: int, per_round: int) -> PrivacyHooks:
    """The run's privacy settings and ledgers (empty when DP is off)."""
    ledgers = make_run_privacy(config, counts, update_dimension=dimension, participants_per_round=per_round)
    if ledgers.adaptive is not None and config.secure_aggregation.protocol == "masked" \
            and config.secure_aggregation.masked.clip_range < INDICATOR_SCALE:
        raise ConfigError(f"key 'secure_aggregation.masked.clip_range' must be at least {INDICATOR_SCALE} with "
                          "adaptive clipping (the clipping indicator travels in the masked sum)")
    return PrivacyHooks(ledgers, per_round)
