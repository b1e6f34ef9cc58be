"""Each party's own privacy ledgers and budget gate: what a site spends on its records, what the server's
client-level mechanism spends, and the ledger files the privacy report reads.

Who holds which ledger follows who runs the mechanism and whose data it protects:

- record level (DP-SGD): one ledger per site, held and enforced by that site (:class:`SitePrivacy`). The
  site refuses to train when the round would pass its own budget, whatever the server asks;
- client level, ``local`` noise: one ledger per site, held by the site (its noise protects it
  against the server, separately from the others);
- client level, ``central`` and ``distributed`` noise: one ledger for the federation, held by the server
  (:class:`ServerPrivacy`), which also samples the participants and adapts the clip norm;
- client level, ``distributed`` noise, also: one ledger per site, held and enforced by the site (its claim is
  protection against the server, so the server must not be the only party that counts the sums released).

Values a site needs from the server (the round's clip norm, the number of noise shares) reach it in the
signed train request; what a site spent reaches the server in its signed reply. Each party writes its
ledgers to ``privacy_ledger.json`` in its own folder; :func:`load_run_ledgers` merges a run's files for
the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audits import replace_durably
from protocols.masked import MaskedOptions

from ..config import INDICATOR_SCALE, RunConfig
from ..federation.algorithms import dp_steps_per_batch
from .accounting import GaussianEvent, PrivacyAccountant, merge_events
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
from .dataset_ledger import (
    DatasetLedger,
    DatasetLedgerError,
    LedgerContents,
    LevelBudget,
    projected_refusal,
    record_set,
    resolve_ledger_dir,
)
from .dp_sgd import PrivacyError
from .record import RecordPrivacy, make_record_privacy

LEDGER_FILE = "privacy_ledger.json"
LEDGER_FORMAT = "feddat-secure-privacy-ledger/2"
# What a site computes from its records outside any DP mechanism and reports when it shares its metrics: its
# training losses (exact, from the training records), how many update entries the protocol clipped (from the
# update) and its test accuracies (under FedDAT from the never-noised client adapter and local head).
TRAIN_LOSS, CLIPPED, TEST_ACCURACY = "train_loss", "clipped", "test_accuracy"


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
    """Write a ledger file atomically and durably: a crash, even of the machine, leaves the old file or the new
    one, and once this returns the new one survives a power loss. A charge written ahead of its release is only
    ahead if it is on disk before the release leaves: the file is fsynced before it replaces the old one, and
    the folder after (the rename itself lives in the folder's entry; POSIX rename(2) and fsync(2))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_durably(path, (json.dumps(content, indent=1, sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class DatasetAccount:
    """A site's dataset ledger in one run: the ledger, the budgets this run proposes for a level the ledger has
    none of yet (a ledger's budgets are fixed when first set), and the run's planned rounds."""

    ledger: DatasetLedger
    budgets: Mapping[str, LevelBudget]
    rounds: int


def dataset_account(config: RunConfig, train: Any, ledger_dir: str | Path | None, record: RecordPrivacy | None,
                    client: ClientPrivacy | None) -> DatasetAccount | None:
    """The dataset ledger of a site whose DP it accounts itself (record level; client level under local or
    distributed noise),
    in ``ledger_dir`` (default: :func:`~.dataset_ledger.default_ledger_dir`); None when the site holds no ledger.
    The record-level dataset budget is ``dataset_budget_epsilon``, by default the run's own ``budget_epsilon``
    (so a re-run on the same data cannot silently multiply the spend); the client-level one is the run's."""
    budgets = {}
    if record is not None:
        settings = config.privacy.record
        budgets["record"] = LevelBudget("record", settings.dataset_budget_epsilon or settings.budget_epsilon,
                                        record.delta, record.accountant)
    if client is not None and client.per_client_ledgers:
        budgets["client"] = LevelBudget("client", config.privacy.client.budget_epsilon, client.delta,
                                        client.accountant)
    if not budgets:
        return None
    ledger = DatasetLedger(resolve_ledger_dir(ledger_dir), record_set(train))
    return DatasetAccount(ledger, budgets, config.federation.rounds)


class SitePrivacy:
    """One site's DP: its record-level ledger and budget gate, its client-level step on its own update, and
    (local and distributed noise) its client-level ledger and budget gate; with ``dataset``, every round is
    charged first to its dataset's ledger (write-ahead: before the round trains), then to the run's ledgers.

    With any DP level on, what the site computes from its records outside an accounted mechanism stays on the
    site (``withholds_metrics``) unless the configuration opts in (``share_site_metrics``): the ledger then
    lists each such channel under ``unprotected_releases``, so the report names it. A DP guarantee covers only
    the mechanism's output (post-processing, Dwork & Roth 2014, Prop. 2.1); an exact loss or accuracy is a
    separate, unaccounted release, which under local or distributed noise would void the protection against
    the server."""

    def __init__(self, site_id: str, record: RecordPrivacy | None, client: ClientPrivacy | None,
                 dataset: DatasetAccount | None = None, *, share_site_metrics: bool = False,
                 sends_updates: bool = True) -> None:
        self.site_id = site_id
        self.record = record
        self.client = client
        self.record_accountant = record.new_accountant(site_id) if record is not None else None
        self.client_accountant = client.new_accountant(site_id) if client is not None and client.per_client_ledgers \
            else None
        self.dataset = dataset
        self.run: str | None = None  # the run's id in the dataset ledger: its first session
        self.charged: dict[str, list[GaussianEvent]] = {}  # what the round in progress was charged
        self.dataset_contents: LedgerContents | None = None  # the dataset ledger as of the last anchor signed
        self._dataset_figures: dict[str, Any] = {}  # what dataset_contents says (the anchor's figures)
        enabled = record is not None or client is not None
        self.withholds_metrics = enabled and not share_site_metrics
        releases = ([TRAIN_LOSS] if record is None else []) + ([CLIPPED] if sends_updates else []) + [TEST_ACCURACY]
        # record-level DP: training computes no losses at all (LocalTrainer.train_round_on), so none is released
        self.unprotected_releases: tuple[str, ...] = tuple(releases) if enabled and share_site_metrics else ()

    @property
    def accountants(self) -> list[PrivacyAccountant]:
        return [a for a in (self.record_accountant, self.client_accountant) if a is not None]

    @property
    def keeps_ledger(self) -> bool:
        """Whether this site writes a ledger file: it holds a ledger, or it releases something unprotected."""
        return bool(self.accountants or self.unprotected_releases)

    def refusal(self, round_index: int) -> str | None:
        """Why this site must not take part in ``round_index`` (a budget of its own it would pass), or None."""
        return _refusal(round_index, [(a, a.planned_events(round_index)) for a in self.accountants])

    def _plans(self, round_index: int) -> dict[str, list[GaussianEvent]]:
        return {a.level: a.planned_events(round_index) for a in self.accountants}

    def start_refusal(self, next_round: int) -> str | None:
        """Why a fresh run from ``next_round`` must not start: its planned rounds would overdraw the budget of
        the dataset's ledger, or of any other ledger sharing records with it (all runs' charges so far plus this
        whole plan). A resumed run is gated round by round instead (its retried round costs one round more than
        planned)."""
        if self.dataset is None:
            return None
        own, shared = self.dataset.ledger.read_with_shared()
        plans, rounds = self._plans(next_round), self.dataset.rounds - next_round
        reasons = [projected_refusal(own, plans, self.dataset.budgets, rounds),
                   *(projected_refusal(other, plans, self.dataset.budgets, rounds, shared=count)
                     for other, count in shared)]
        return "; ".join(reason for reason in reasons if reason) or None

    def charge_ahead(self, round_index: int) -> dict[str, float]:
        """Charge the round's planned mechanisms before the round trains (write-ahead): to the dataset ledger
        (fsynced; :class:`BudgetExceeded` if the dataset's budget would pass, nothing charged then), then to
        the run's ledgers. Returns ε so far of each run ledger by level. A round that then fails is charged all
        the same: a crash must never release what no ledger holds (issue 12, fault 3)."""
        plans = self._plans(round_index)
        if not plans:
            return {}
        if self.dataset is not None:
            if self.run is None:
                raise RuntimeError("the run's id is set when its session is confirmed, before any round")
            self._observe(self.dataset.ledger.charge(self.run, round_index, plans, self.dataset.budgets))
        self.charged = plans
        spent = {"record": self.charge_training(plans.get("record", []), round_index),
                 "client": self.charge_release(round_index)}
        return {level: epsilon for level, epsilon in spent.items() if epsilon is not None}

    def check_trained(self, events: Sequence[GaussianEvent]) -> None:
        """The DP-SGD mechanisms the round actually ran must be the ones charged ahead of it (never under-charge)."""
        charged = self.charged.get("record", [])
        if merge_events(events) != merge_events(charged):
            raise PrivacyError(f"{self.site_id}: local training ran {merge_events(events)}, but "
                               f"{merge_events(charged)} was charged before it; the ledgers would be wrong")

    def resume(self, run: str) -> None:
        """Continue run ``run`` after its checkpoint was loaded: the run's ledgers become exactly this run's
        charges in the dataset ledger, which hold the checkpoint's rounds and, after them, the charge of a round
        interrupted by a crash (its retry is a second release and is charged again)."""
        self.run = run
        if self.dataset is None:
            return
        contents = self.dataset.ledger.read()
        for accountant in self.accountants:
            charged = (contents.run_charges(run, accountant.level, self.dataset.ledger.dataset_sha256)
                       if contents is not None else [])
            if charged[:len(accountant.rounds)] != accountant.rounds:
                raise DatasetLedgerError(f"{self.dataset.ledger.path}: the dataset ledger does not hold the "
                                         f"{accountant.level}-level charges this run's checkpoint holds (was it cut "
                                         "or replaced?)")
            accountant.rounds = list(charged)

    def charge_training(self, events: Sequence[GaussianEvent], round_index: int) -> float | None:
        """Charge the DP-SGD mechanisms a round of local training ran; ε of the record-level ledger so far."""
        if self.record_accountant is None:
            return None
        return self.record_accountant.spend(events, round_index)

    def charge_release(self, round_index: int) -> float | None:
        """local noise: charge the noisy update this site releases; distributed noise: charge the sum its share
        goes into (the planned event, which its ``min_survivors`` enforces). ε of its client-level ledger so far."""
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
        content = {**_ledger_json(self.accountants, record, client, None),
                   "unprotected_releases": list(self.unprotected_releases)}
        if self.dataset is not None:
            content["dataset_ledger"] = self.dataset_ledger()
        return content

    def observe_dataset(self) -> None:
        """Read the dataset ledger as this run (re)starts, for the anchor the site signs then (``run_started``):
        without a charge in this session, it is what the run's summary reports."""
        if self.dataset is not None:
            self._observe(self.dataset.ledger.read())

    def _observe(self, contents: LedgerContents | None) -> None:
        self.dataset_contents = contents
        level = "record" if self.record_accountant is not None else "client"
        budget = contents.budgets.get(level, self.dataset.budgets[level]) if contents else self.dataset.budgets[level]
        if contents is None:
            entries, head, before, now = 0, None, 0.0, 0.0
        else:
            entries, head = contents.entries, contents.head_sha256
            before = contents.accountant(level, proposed=budget, exclude_run=self.run).epsilon()
            now = contents.accountant(level, proposed=budget).epsilon()
        self._dataset_figures = {"level": level, "entries": entries, "head_sha256": head, "delta": budget.delta,
                                 "budget_epsilon": None if math.isinf(budget.epsilon) else budget.epsilon,
                                 "epsilon_before_run": before, "epsilon": now}

    def dataset_anchor(self) -> dict[str, Any]:
        """The dataset ledger's figures as last observed (the last charge, else the run's start), as audit meta
        (``audits.entries.check_meta``: scalars only). The site signs them into its audit log with every
        ``privacy_spent`` and at ``run_started``; the report compares the run ledger's ``dataset_ledger`` summary
        with the last of them, so the summary cannot be edited where the dataset ledger itself is not readable.
        Empty without a dataset ledger."""
        if self.dataset is None:
            return {}
        figures = self._dataset_figures
        return {"dataset_sha256": self.dataset.ledger.dataset_sha256, "dataset_level": figures["level"],
                "dataset_delta": figures["delta"], "dataset_ledger_entries": figures["entries"],
                "dataset_ledger_head": figures["head_sha256"], "dataset_budget_epsilon": figures["budget_epsilon"],
                "dataset_epsilon_before_run": figures["epsilon_before_run"], "dataset_epsilon": figures["epsilon"]}

    def dataset_ledger(self) -> dict[str, Any]:
        """The dataset ledger as this run last observed it (its last charge, else its start), at its governing level
        (record, else client): where it is, its size and head (anchors against a cut), δ, budget, and the
        cumulative ε before and with this run. Exactly the figures of the last anchor the site signed."""
        return {"path": str(self.dataset.ledger.path), "dataset_sha256": self.dataset.ledger.dataset_sha256,
                **self._dataset_figures, "shared_ledgers": self._shared_ledgers()}

    def _shared_ledgers(self) -> list[dict[str, Any]]:
        """The other ledgers this run charged too, as they share records with this dataset: where each is, its
        dataset, the records shared, its size, head and cumulative ε at this dataset's governing level."""
        level = self._dataset_figures["level"]
        _, shared = self.dataset.ledger.read_with_shared()
        return [{"path": str(other.path), "dataset_sha256": other.dataset_sha256, "shared_records": count,
                 "entries": other.entries, "head_sha256": other.head_sha256,
                 "epsilon": other.accountant(level, proposed=self.dataset.budgets[level]).epsilon()}
                for other, count in shared if self.run in other.runs()]

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
        self.accountant = client.new_accountant(None) if client is not None and client.federation_ledger else None
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
        sample. Under client-level DP the draws come from the OS's entropy (unless ``reproducible``): from the
        run's seeded ``sampler``, anyone holding the configuration would recompute who took part, and
        amplification by sampling assumes they cannot (docs/privacy.md, "Who takes part")."""
        rng = self._secret_rng(sampler)
        if self.client is not None and self.client.poisson_sampling:
            return poisson_participants(ids, self.client.sample_rate, rng)
        return sorted(rng.choice(ids, size=per_round, replace=False).tolist(), key=list(ids).index)

    def fillers(self, ids: Sequence[str], participants: Sequence[str], minimum: int,
                sampler: np.random.Generator) -> list[str]:
        """Sites that input the zero vector so that a Poisson sample smaller than the protocol's ``minimum`` is
        still aggregated (the fewest needed, drawn like the sample, from the sites not sampled); none outside
        Poisson sampling. Skipping such a round instead would make the release depend on the sample's size,
        which is not the Poisson-subsampled Gaussian the ledger charges; with fillers every round releases
        Σ_{i∈S} clip(u_i) + N(0, σ²C²) over the sample S."""
        missing = minimum - len(participants)
        if self.client is None or not self.client.poisson_sampling or missing <= 0:
            return []
        others = [cid for cid in ids if cid not in participants]
        drawn = self._secret_rng(sampler).choice(others, size=min(missing, len(others)), replace=False).tolist()
        return sorted(drawn, key=list(ids).index)

    def _secret_rng(self, sampler: np.random.Generator) -> np.random.Generator:
        """The generator for what the server draws in secret: the OS's entropy under client-level DP (unless
        ``reproducible``), else the run's seeded ``sampler`` (draws as a run without DP)."""
        return self.client.noise_rng(sampler) if self.client is not None else sampler

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

    def charge(self, round_index: int) -> float | None:
        """Charge the round's planned client-level mechanism, before anything of it is released (the caller
        writes the ledger file durably first); ε of the federation's ledger so far, or None without one.

        Distributed noise: the planned event is what a released sum costs, because honest sites refuse to
        unmask a sum with fewer than the planned noise shares (so the guarantee holds while at most
        ``tolerated_dropouts`` sites drop out or collude with the server)."""
        if self.accountant is None:
            return None
        return self.accountant.spend(self.accountant.planned_events(round_index), round_index)

    def restore_written_ahead(self, path: Path) -> None:
        """On resume, after :meth:`load_state_dict` from the checkpoint: adopt the charges of ``path`` (this
        party's ledger file), which is ahead of the checkpoint by the charges of a round interrupted after its
        charge (write-ahead: charge, write the file, release, checkpoint). Its rounds must extend the
        checkpoint's; a missing file, or one that lost or changed a charge, raises ValueError."""
        if self.accountant is None:
            return
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"the server's privacy ledger {str(path)!r} cannot be read ({error}); it holds the "
                             "charges of an interrupted round") from None
        ledgers = {(s.get("level"), s.get("client")): s for s in saved.get("ledgers", [])}
        state = ledgers.get((self.accountant.level, self.accountant.client))
        kept = self.accountant.state_dict()["rounds"]
        if state is None or state.get("rounds", [])[:len(kept)] != kept:
            raise ValueError(f"the server's privacy ledger {str(path)!r} does not extend the charges of its "
                             f"checkpoint ({len(kept)} rounds charged); it was changed or replaced")
        self.accountant.load_state_dict(state)

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
                              "adaptive_clipping": None, "unprotected_releases": {}, "files": []}
    for path in files:
        content = json.loads(path.read_text())
        if content.get("format") != LEDGER_FORMAT:
            raise ValueError(f"{path} is not a {LEDGER_FORMAT} file")
        merged["levels"]["record"].update(content["levels"]["record"])
        merged["levels"]["client"] = merged["levels"]["client"] or content["levels"]["client"]
        merged["ledgers"].extend(content["ledgers"])
        merged["adaptive_clipping"] = merged["adaptive_clipping"] or content["adaptive_clipping"]
        if content.get("unprotected_releases"):  # a site's; the server's ledger has no such list
            merged["unprotected_releases"][path.parent.name] = list(content["unprotected_releases"])
        merged["files"].append(path.relative_to(run_dir).as_posix())
    return merged
