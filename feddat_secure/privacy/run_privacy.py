"""Each party's own privacy ledgers and budget gate: what a site spends on its records, what the server's
client-level mechanism spends, and the ledger files the privacy report reads.

Who holds which ledger follows who runs the mechanism and whose data it protects:

- record level (DP-SGD): one ledger per site, held and enforced by that site (:class:`SitePrivacy`). The
  site refuses to train when the round would pass its own budget, whatever the server asks;
- client level, ``local`` noise: one ledger per site, held by the site (its noise protects it
  against the server, separately from the others);
- client level, ``central`` and ``distributed`` noise: one ledger for the federation, held by the server
  (:class:`ServerPrivacy`), which also samples the participants and adapts the clip norm.

Values a site needs from the server (the round's clip norm, the number of noise shares) reach it in the
signed train request; what a site spent reaches the server in its signed reply. Each party writes its
ledgers to ``privacy_ledger.json`` in its own folder; :func:`load_run_ledgers` merges a run's files for
the report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocols.masked import MaskedOptions

from ..config import INDICATOR_SCALE, RunConfig
from ..federation.algorithms import dp_steps_per_batch
from .accounting import GaussianEvent, PrivacyAccountant
from .budget import BudgetExceeded, check_budgets
from .client_level import (
    AdaptiveClipping,
    ClientPrivacy,
    central_noise,
    clip_update,
    local_noise,
    make_client_privacy,
    poisson_participants,
)
from .record import RecordPrivacy, make_record_privacy

LEDGER_FILE = "privacy_ledger.json"
LEDGER_FORMAT = "feddat-secure-privacy-ledger/2"


@dataclass(frozen=True)
class PrivacySettings:
    """A run's DP parameters, derived deterministically from its configuration (every party derives the same)."""

    record: Mapping[str, RecordPrivacy]  # per site; empty without record-level DP
    client: ClientPrivacy | None

    @property
    def enabled(self) -> bool:
        return bool(self.record) or self.client is not None

    @property
    def extra_coordinates(self) -> int:
        """Coordinates the protocol carries besides the update (the adaptive-clipping indicator)."""
        return 1 if self.client is not None and self.client.adaptive else 0

    def noise_bound(self, participants: int) -> int:
        """distributed: the largest |noise| a share may hold in rounds of at least ``participants`` sites (the
        masked protocol's ``noise_bound``); 0 otherwise."""
        if self.client is None or self.client.placement != "distributed":
            return 0
        return self.client.noise_bound(participants)


def privacy_settings(config: RunConfig, train_sizes: Mapping[str, int], *, update_dimension: int,
                     local_steps: int | None = None, participants_per_round: int | None = None) -> PrivacySettings:
    """Every DP parameter of a run from its config: DP-SGD settings per site (σ calibrated per site when a
    target ε is set, as q = batch / N differs between sites) and the client-level settings.

    ``train_sizes``: each site's number of records (centralized: one entry for the pooled data, with
    ``local_steps`` its steps per round). ``update_dimension``: length of an update vector.
    """
    steps = local_steps or config.training.local_steps
    record = {}
    for cid, size in train_sizes.items():
        settings = make_record_privacy(config.privacy.record, dataset_size=size, batch_size=config.training.batch_size,
                                       local_steps=steps, rounds=config.federation.rounds,
                                       steps_per_batch=dp_steps_per_batch(config.federation.algorithm))
        if settings is not None:
            record[cid] = settings
    step = 0.0
    if config.privacy.client.placement == "distributed":
        from protocols.masked.quantize import Quantizer  # the grid the masked protocol quantizes onto

        masked = config.secure_aggregation.masked
        step = Quantizer(masked.clip_range, masked.quantization_bits).scale
    per_round = participants_per_round or config.participants_per_round(len(train_sizes))
    rounding = central_rounding(config) if config.privacy.client.placement == "central" else 0.0
    client = make_client_privacy(config.privacy.client, num_clients=len(train_sizes), clients_per_round=per_round,
                                 rounds=config.federation.rounds, dimension=update_dimension, quantization_step=step,
                                 rounding_per_value=rounding)
    return PrivacySettings(record, client)


def central_rounding(config: RunConfig) -> float:
    """ρ: how far, per value, the protocol's rounding can move one site's contribution to the sum the server
    adds central noise to, beyond the site's clipped update x (value units). The neighbouring sum lacks the
    site's contribution, or holds its zero update instead (without rounding the two would be equal); ρ
    covers both.

    - ``plain``: the float64 sum itself (0).
    - ``masked`` (protocols/masked/quantize.py): each value is rounded stochastically onto the grid
      k·step − r, k = 0..L. With the site, the sum holds x + e (|e| < step per value); without it, nothing;
      with its zero update instead, a rounded zero, ±step/2 (r/step = L/2 is a half-integer, L odd), so
      the two differ by x plus less than 1.5·step per value: ρ = 1.5·step.
    - ``he`` (protocols/he/keyholder.py): the key holder rounds the decrypted sum to the nearest multiple
      of ``output_step``; the sum with the site and the one without are rounded separately (≤ step/2 each)
      and differ, besides x, by the site's own CKKS encoding and encryption error ξ (a zero update encrypts
      to 0 + ξ too): ρ = step + max|ξ|. The output grid is sized to stay at least 2^6 above the CKKS error
      (protocols/he/config.py, NOISE_MARGIN_BITS: a fresh ciphertext's measured at 2^-9.5 of the step at
      the default scale), so ρ = (1 + 2^-6)·output_step. That margin is the protocol's measured bound, not
      a worst case proven for every draw of the encryption noise.

    The masked grid is the one ``feddat_secure.federation.parties.build_protocol`` gives the protocol: under
    central noise with a fixed clip norm C, the default ``clip_range`` is narrowed to C (every value of an
    update clipped to L2 norm C lies in [−C, C]); an explicitly configured one, or any under adaptive
    clipping, is kept."""
    protocol = config.secure_aggregation.protocol
    if protocol == "masked":
        from protocols.masked.quantize import Quantizer

        masked, client = config.secure_aggregation.masked, config.privacy.client
        clip_range = masked.clip_range
        if not client.adaptive_clipping and clip_range == MaskedOptions().clip_range:
            clip_range = client.clip_norm
        return 1.5 * Quantizer(clip_range, masked.quantization_bits).scale
    if protocol == "he":
        return (1 + 2.0**-6) * config.secure_aggregation.he.output_step
    if protocol == "plain":
        return 0.0
    raise ValueError(f"no rounding bound is known for the {protocol!r} protocol under central noise")


def _refusal(round_index: int, plans: Sequence[tuple[PrivacyAccountant, list[GaussianEvent]]]) -> str | None:
    try:
        check_budgets(round_index, plans)
    except BudgetExceeded as exceeded:
        return "; ".join(exceeded.reasons)
    return None


def _ledger_json(accountants: Sequence[PrivacyAccountant], record: Mapping[str, Any], client: Any,
                 adaptive: AdaptiveClipping | None) -> dict[str, Any]:
    return {"format": LEDGER_FORMAT, "levels": {"record": dict(record), "client": client},
            "ledgers": [a.state_dict() for a in accountants],
            "adaptive_clipping": adaptive.state_dict() if adaptive else None}


def write_ledger(path: Path, content: Mapping[str, Any]) -> Path:
    """Write a ledger file atomically (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)
    return path


class SitePrivacy:
    """One site's DP: its record-level ledger and budget gate, its client-level step on its own update, and
    (local noise) its client-level ledger."""

    def __init__(self, site_id: str, record: RecordPrivacy | None, client: ClientPrivacy | None) -> None:
        self.site_id = site_id
        self.record = record
        self.client = client
        self.record_accountant = record.new_accountant(site_id) if record is not None else None
        self.client_accountant = client.new_accountant(site_id) if client is not None and client.per_client_ledgers \
            else None

    @property
    def accountants(self) -> list[PrivacyAccountant]:
        return [a for a in (self.record_accountant, self.client_accountant) if a is not None]

    def refusal(self, round_index: int) -> str | None:
        """Why this site must not take part in ``round_index`` (a budget of its own it would pass), or None."""
        return _refusal(round_index, [(a, a.planned_events(round_index)) for a in self.accountants])

    def charge_training(self, events: Sequence[GaussianEvent], round_index: int) -> float | None:
        """Charge the DP-SGD mechanisms a round of local training ran; ε of the record-level ledger so far."""
        if self.record_accountant is None:
            return None
        return self.record_accountant.spend(events, round_index)

    def charge_release(self, round_index: int) -> float | None:
        """local noise: charge the noisy update this site releases; ε of its client-level ledger so far."""
        if self.client_accountant is None:
            return None
        return self.client_accountant.spend(self.client.round_events(), round_index)

    def update_step(self, update: np.ndarray, *, clip_norm: float | None, noise_shares: int | None,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """The client-level step on this site's update: (what the protocol adds up, the integer noise share
        the masked protocol adds before masking, or None). ``clip_norm`` and ``noise_shares`` come from the
        server's signed train request."""
        if self.client is None:
            return update, None
        clipped, norm = clip_update(update, clip_norm)
        noise = None
        if self.client.placement == "local":
            clipped = clipped + local_noise(len(clipped), clip_norm=clip_norm,
                                            noise_multiplier=self.client.noise_multiplier,
                                            rng=self.client.noise_rng(rng))
        elif self.client.placement == "distributed":
            noise = self.client.noise_share(noise_shares, self.client.noise_rng(rng))
        if self.client.adaptive:
            clipped = np.append(clipped, AdaptiveClipping.indicator(norm, clip_norm) * INDICATOR_SCALE)
        return clipped, noise

    def ledger(self) -> dict[str, Any]:
        record = {self.site_id: self.record.describe()} if self.record is not None else {}
        client = self.client.describe() if self.client_accountant is not None else None
        return _ledger_json(self.accountants, record, client, None)

    def state_dict(self) -> dict[str, Any]:
        return {"ledgers": [a.state_dict() for a in self.accountants]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _load_ledgers(self.accountants, state["ledgers"])


class ServerPrivacy:
    """The server's DP: participant sampling, the client-level terms it sends (clip norm, noise shares), the
    central noise and DP-FedAvg's fixed denominator, adaptive clipping, and the federation's client-level
    ledger (central and distributed noise)."""

    def __init__(self, client: ClientPrivacy | None) -> None:
        self.client = client
        self.accountant = client.new_accountant(None) if client is not None and not client.per_client_ledgers \
            else None
        self.adaptive: AdaptiveClipping | None = client.adaptive_clipping() if client is not None else None

    @property
    def accountants(self) -> list[PrivacyAccountant]:
        return [self.accountant] if self.accountant is not None else []

    @property
    def clip_norm(self) -> float | None:
        """The client-level clip norm of the next round (it moves under adaptive clipping)."""
        if self.client is None:
            return None
        return self.adaptive.clip_norm if self.adaptive else self.client.clip_norm

    def participants(self, ids: Sequence[str], per_round: int, sampler: np.random.Generator) -> list[str]:
        """Poisson sampling of sites when the client-level accountant counts on it; otherwise a fixed-size
        sample (the same draws as a run without DP)."""
        if self.client is not None and self.client.poisson_sampling:
            return poisson_participants(ids, self.client.sample_rate, sampler)
        return sorted(sampler.choice(ids, size=per_round, replace=False).tolist(), key=list(ids).index)

    def refusal(self, round_index: int) -> str | None:
        """Why the round must not run (the federation's client-level budget it would pass), or None."""
        return _refusal(round_index, [(a, a.planned_events(round_index)) for a in self.accountants])

    def train_terms(self, participants: int) -> dict[str, Any]:
        """What the sites' client-level step needs from the server this round (carried in the train request)."""
        if self.client is None:
            return {"clip_norm": None, "noise_shares": None}
        shares = participants if self.client.placement == "distributed" else None
        return {"clip_norm": self.clip_norm, "noise_shares": shares}

    def aggregate_to_apply(self, vector: np.ndarray, total_weight: float,
                           rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """(the sum of updates to apply, its denominator): without client-level DP Σ w_i·u_i and Σ w_i; with it,
        central noise and DP-FedAvg's fixed denominator, and the adaptive clip norm moves."""
        if self.client is None:
            return vector, total_weight
        summed = vector
        if self.adaptive is not None:
            summed, indicators = summed[:-1], float(summed[-1]) / INDICATOR_SCALE
        if self.client.placement == "central":
            summed = summed + central_noise(len(summed), clip_norm=self.clip_norm,
                                            noise_multiplier=self.client.update_noise_multiplier,
                                            rounding_l2=self.client.rounding_l2, rng=self.client.noise_rng(rng))
        if self.adaptive is not None:
            self.adaptive.server_update(indicators, self.client.noise_rng(rng))
        return summed, self.client.expected_participants

    def charge(self, round_index: int, participants: int, counted: int) -> float | None:
        """Charge the round's client-level mechanism once an aggregate was released (``counted`` noise shares
        reached it, for distributed noise); ε of the federation's ledger so far."""
        if self.accountant is None:
            return None
        events = self.client.round_events(participants, counted) if self.client.placement == "distributed" \
            else self.client.round_events()
        return self.accountant.spend(events, round_index)

    def ledger(self) -> dict[str, Any]:
        return _ledger_json(self.accountants, {}, self.client.describe() if self.client else None, self.adaptive)

    def state_dict(self) -> dict[str, Any]:
        return {"ledgers": [a.state_dict() for a in self.accountants],
                "adaptive_clipping": self.adaptive.state_dict() if self.adaptive else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _load_ledgers(self.accountants, state["ledgers"])
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive_clipping"])


def _load_ledgers(accountants: Sequence[PrivacyAccountant], saved: Sequence[Mapping[str, Any]]) -> None:
    by_key = {(s["level"], s["client"]): s for s in saved}
    mine = {(a.level, a.client): a for a in accountants}
    if set(by_key) != set(mine):
        raise ValueError(f"the checkpoint's privacy ledgers {sorted(by_key, key=str)} do not match this party's "
                         f"{sorted(mine, key=str)}")
    for key, accountant in mine.items():
        accountant.load_state_dict(by_key[key])


def load_run_ledgers(run_dir: Path) -> dict[str, Any] | None:
    """Every party's ``privacy_ledger.json`` under ``run_dir/parties/`` merged into one view (record-level
    settings of every site, the client-level settings, every ledger), or None when no party kept one."""
    files = sorted(Path(run_dir).glob(f"parties/*/{LEDGER_FILE}"))
    if not files:
        return None
    merged: dict[str, Any] = {"format": LEDGER_FORMAT, "levels": {"record": {}, "client": None}, "ledgers": [],
                              "adaptive_clipping": None, "files": []}
    for path in files:
        content = json.loads(path.read_text())
        if content.get("format") != LEDGER_FORMAT:
            raise ValueError(f"{path} is not a {LEDGER_FORMAT} file")
        merged["levels"]["record"].update(content["levels"]["record"])
        merged["levels"]["client"] = merged["levels"]["client"] or content["levels"]["client"]
        merged["ledgers"].extend(content["ledgers"])
        merged["adaptive_clipping"] = merged["adaptive_clipping"] or content["adaptive_clipping"]
        merged["files"].append(path.relative_to(run_dir).as_posix())
    return merged
