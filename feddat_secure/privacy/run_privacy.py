"""All privacy ledgers of one run, their budget gate, checkpoint state and on-disk ledger file.

Record level: one ledger per site (DP-SGD protects the records of that site; sites' data are
disjoint, so the federation's record-level ε is the largest of them). Client level: one
ledger for the federation (central, distributed), or one per site (local noise, whose
guarantee holds against the server for each site separately).

The runner keeps one :class:`RunPrivacy`, asks :meth:`RunPrivacy.check_round` before each
round, records what each round spent, saves :meth:`RunPrivacy.state_dict` in the round's
checkpoint and writes ``privacy/ledger.json`` (:meth:`RunPrivacy.write`) after each round;
``feddat-secure privacy-report`` reads that file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, RunConfig
from .accounting import GaussianEvent, PrivacyAccountant
from .budget import check_budgets
from .client_level import AdaptiveClipping, ClientPrivacy, central_noise, clip_update, local_noise, make_client_privacy
from .record import RecordPrivacy, make_record_privacy

LEDGER_FILE = Path("privacy") / "ledger.json"
LEDGER_FORMAT = "feddat-secure-privacy-ledger/1"


class RunPrivacy:
    def __init__(self, record: Mapping[str, RecordPrivacy], client: ClientPrivacy | None,
                 client_ids: Sequence[str]) -> None:
        unknown = sorted(set(record) - set(client_ids))
        if unknown:
            raise ValueError(f"record-level settings for unknown sites {unknown}")
        self.record = dict(record)
        self.client = client
        self.client_ids = tuple(client_ids)
        self.record_accountants = {cid: settings.new_accountant(cid) for cid, settings in self.record.items()}
        self.client_accountants: dict[str | None, PrivacyAccountant] = {}
        if client is not None:
            keys: Iterable[str | None] = self.client_ids if client.per_client_ledgers else [None]
            self.client_accountants = {key: client.new_accountant(key) for key in keys}
        self.adaptive: AdaptiveClipping | None = client.adaptive_clipping() if client else None

    @property
    def enabled(self) -> bool:
        return bool(self.record) or self.client is not None

    @property
    def accountants(self) -> list[PrivacyAccountant]:
        return [*self.record_accountants.values(), *self.client_accountants.values()]

    @property
    def clip_norm(self) -> float | None:
        """The client-level clip norm to use this round (it moves under adaptive clipping)."""
        if self.client is None:
            return None
        return self.adaptive.clip_norm if self.adaptive else self.client.clip_norm

    def clip(self, update: np.ndarray) -> tuple[np.ndarray, float]:
        """A site's update clipped to this round's client-level clip norm, and its norm before."""
        return clip_update(update, self.clip_norm)

    def local_noise(self, length: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """local placement: the Gaussian noise a site adds to its own clipped update."""
        return local_noise(length, clip_norm=self.clip_norm, noise_multiplier=self.client.noise_multiplier,
                           rng=self.client.noise_rng(rng))

    def central_noise(self, length: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """central placement: the noise the server adds to the sum, std z_Δ·C (z_Δ = z unless the
        adaptive clipping count takes its share)."""
        return central_noise(length, clip_norm=self.clip_norm, noise_multiplier=self.client.update_noise_multiplier,
                             rng=self.client.noise_rng(rng))

    def adapt_clip_norm(self, indicator_sum: float, rng: np.random.Generator | None = None) -> float | None:
        """Adaptive clipping, after the round: the server's noisy update of the clip norm from the
        sum of the sites' ``AdaptiveClipping.indicator`` values. None without adaptive clipping."""
        if self.adaptive is None:
            return None
        return self.adaptive.server_update(indicator_sum, self.client.noise_rng(rng))

    def check_round(self, round_index: int, participants: Sequence[str]) -> None:
        """Raise BudgetExceeded if the planned round would break any budget; otherwise nothing."""
        plans = [(self.record_accountants[cid], self.record_accountants[cid].planned_events(round_index))
                 for cid in participants if cid in self.record_accountants]
        for key, accountant in self.client_accountants.items():
            if key is None or key in participants:
                plans.append((accountant, accountant.planned_events(round_index)))
        check_budgets(round_index, plans)

    def spend_record(self, client_id: str, events: Sequence[GaussianEvent], round_index: int) -> float:
        """Record a site's DP-SGD events of the round (the trainer's ``round_events``); returns its ε."""
        return self.record_accountants[client_id].spend(events, round_index)

    def spend_client(self, round_index: int, participants: Sequence[str], surviving: int | None = None) -> None:
        """Record the round's client-level mechanism. ``surviving``: distributed only, how many
        noise shares reached the unmasked sum (the counted sites)."""
        if self.client is None:
            return
        if self.client.per_client_ledgers:
            for cid in participants:
                self.client_accountants[cid].spend(self.client.round_events(), round_index)
            return
        events = self.client.round_events(len(participants), surviving) \
            if self.client.placement == "distributed" else self.client.round_events()
        self.client_accountants[None].spend(events, round_index)

    def state_dict(self) -> dict[str, Any]:
        """Plain values for the round checkpoint."""
        return {"ledgers": [a.state_dict() for a in self.accountants],
                "adaptive_clipping": self.adaptive.state_dict() if self.adaptive else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore spent rounds on resume; every ledger of this run must be in the state."""
        saved = {(s["level"], s["client"]): s for s in state["ledgers"]}
        mine = {(a.level, a.client): a for a in self.accountants}
        if set(saved) != set(mine):
            raise ValueError(f"the checkpoint's privacy ledgers {sorted(saved, key=str)} do not match this run's "
                             f"{sorted(mine, key=str)}")
        for key, accountant in mine.items():
            accountant.load_state_dict(saved[key])
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive_clipping"])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "levels": {
                "record": {cid: settings.describe() for cid, settings in self.record.items()},
                "client": self.client.describe() if self.client else None,
            },
            **self.state_dict(),
        }

    def write(self, run_dir: Path) -> Path:
        """Write ``run_dir/privacy/ledger.json`` atomically."""
        path = Path(run_dir) / LEDGER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        os.replace(temporary, path)
        return path


def make_run_privacy(config: RunConfig, train_sizes: Mapping[str, int], *, update_dimension: int,
                     local_steps: int | None = None, participants_per_round: int | None = None) -> RunPrivacy:
    """Everything DP of a run from its config: DP-SGD settings per site (σ calibrated per site
    when a target ε is set, as q = batch / N differs between sites), client-level settings,
    and every ledger.

    ``train_sizes``: each training party's number of records (centralized: one entry for the
    pooled data, with ``local_steps`` = its steps per round). ``update_dimension``: length
    of an update vector (``StateLayout.size``).
    """
    steps = local_steps or config.training.local_steps
    record = {}
    for cid, size in train_sizes.items():
        settings = make_record_privacy(config.privacy.record, dataset_size=size, batch_size=config.training.batch_size,
                                       local_steps=steps, rounds=config.federation.rounds,
                                       algorithm=config.federation.algorithm)
        if settings is not None:
            record[cid] = settings
    placement = config.privacy.client.placement
    if placement != "off" and config.federation.algorithm in ("local", "centralized"):
        raise ConfigError(f"client-level DP protects sites' updates; algorithm {config.federation.algorithm!r} "
                          "sends none (set 'privacy.client.placement' to 'off')")
    if placement == "distributed" and config.secure_aggregation.protocol != "masked":
        raise ConfigError("the distributed placement adds its noise inside masked secure aggregation; set "
                          "'secure_aggregation.protocol' to 'masked'")
    step = 0.0
    if placement == "distributed":
        from protocols.masked.quantize import Quantizer  # the grid the masked protocol quantizes onto

        masked = config.secure_aggregation.masked
        step = Quantizer(masked.clip_range, masked.quantization_bits).scale
    per_round = participants_per_round or config.participants_per_round(len(train_sizes))
    client = make_client_privacy(config.privacy.client, num_clients=len(train_sizes), clients_per_round=per_round,
                                 rounds=config.federation.rounds, dimension=update_dimension, quantization_step=step)
    return RunPrivacy(record, client, list(train_sizes))
