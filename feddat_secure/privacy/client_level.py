"""Client-level DP (DP-FedAvg, McMahan et al. 2018): clip each site's update, add noise.

A site's update (its travelling state after the round minus the global state it received,
as a flat float64 vector) is clipped to L2 norm C. The sum of clipped updates then changes
by at most C when one site's update is replaced by zero (the adjacency used: who takes part
is visible to the server anyway), and noise of standard deviation σ·C hides any one site. Three placements of the noise:

``central``
    the server adds N(0, σ²C²) to the sum of the clipped updates. Protects against everyone
    who sees the global models; the server itself is trusted.
``local``
    every site adds N(0, σ²C²) to its own clipped update before it leaves. Protects against
    the server too, at the price of m times the noise variance in the sum.
``distributed``
    every site quantizes its clipped update (the masked protocol's integer grid) and adds
    its share of Skellam noise (Agarwal, Kairouz, Liu 2021) inside the masked secure
    aggregation, so the unmasked sum carries the target noise and nobody sees an un-noised
    sum. Skellam is closed under addition: s shares of variance μ/s sum to exactly Sk(μ).

Every placement aggregates with weight 1 per site (a weighted sum would multiply the
sensitivity by the weight) and divides by the expected number of participants
(``ClientPrivacy.expected_participants``, McMahan et al.'s fixed denominator).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..config import INDICATOR_SCALE, ClientPrivacyConfig
from .accounting import AccountingError, GaussianEvent, PrivacyAccountant, calibrate, compute_epsilon

PLACEMENTS = ("central", "local", "distributed")
SKELLAM_RDP_ORDERS: tuple[int, ...] = tuple(range(2, 257))  # the Skellam bound holds at integer orders > 1
NOISE_BOUND_STDS = 12  # a Skellam share value lies within this many standard deviations (P < 1e-30)
# β of conditional randomized rounding: each draw exceeds the norm bound with probability at most β (Kairouz,
# Liu & Steinke 2021; e^-0.5 is the value of the authors' code, google-research/federated distributed_dp); it
# changes how often a site redraws its rounding, not ε
ROUNDING_BETA = math.exp(-0.5)


def default_rng() -> np.random.Generator:
    """Noise a party draws must be unpredictable to the others: seed from the OS's entropy."""
    return np.random.default_rng(secrets.randbits(128))


# ---------------------------------------------------------------- clipping and Gaussian noise

def clip_update(vector: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """(the update scaled to L2 norm at most ``clip_norm``, its norm before clipping)."""
    if clip_norm <= 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}")
    vector = np.asarray(vector, dtype=np.float64)
    if vector.ndim != 1 or not np.all(np.isfinite(vector)):
        raise ValueError("an update must be a finite 1-D vector")
    norm = float(np.linalg.norm(vector))
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = vector * factor
    excess = float(np.linalg.norm(clipped))
    if excess > clip_norm:  # floating-point rounding can overshoot by an ulp; never leave above the bound
        clipped *= clip_norm / excess * (1 - 1e-12)
    return clipped, norm


def gaussian_noise(length: int, std: float, rng: np.random.Generator | None = None) -> np.ndarray:
    return (rng or default_rng()).normal(0.0, std, size=length) if std > 0 else np.zeros(length)


def central_noise(length: int, *, clip_norm: float, noise_multiplier: float, rounding_l2: float = 0.0,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """What the server adds to the SUM of the clipped updates: N(0, (σ(C + r))²) per value, with r the L2 bound
    of the rounding the protocol applied before (:attr:`ClientPrivacy.rounding_l2`): one site moves that sum
    by at most C + r, the sensitivity the noise multiplier σ is relative to."""
    return gaussian_noise(length, noise_multiplier * (clip_norm + rounding_l2), rng)


def local_noise(length: int, *, clip_norm: float, noise_multiplier: float,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """What each site adds to its OWN clipped update: the full N(0, (σC)²) per value."""
    return gaussian_noise(length, noise_multiplier * clip_norm, rng)


def poisson_participants(client_ids: Sequence[str], sample_rate: float, rng: np.random.Generator) -> list[str]:
    """Each site takes part independently with probability ``sample_rate`` (the sampling whose
    amplification the client-level accountant counts). May return no site at all."""
    if sample_rate >= 1:
        return list(client_ids)
    return [cid for cid, u in zip(client_ids, rng.random(len(client_ids))) if u < sample_rate]


# ---------------------------------------------------------------- distributed: Skellam shares

def conditional_rounding_bound(clip_norm: float, quantization_step: float, dimension: int) -> float:
    """B: the L2 norm, in grid steps from the grid's centre, that the masked protocol's conditional randomized
    rounding keeps every quantized update within (its ``rounding_norm_bound``).

    Kairouz, Liu & Steinke 2021 (ICML, Theorem 1): for u ∈ R^d with ‖u‖₂ ≤ c, the randomized rounding ũ of u
    satisfies ‖ũ‖₂² ≤ c² + d/4 + √(2 ln(1/β))·(c + √d/2) with probability at least 1 − β, and always
    ‖ũ‖₂ ≤ c + √d. The proof holds on this code's grid too: in grid steps from the centre L/2 (where 0 lies)
    an update is u = x/step, rounded to one of the two neighbouring half-integers (L is odd), each
    coordinate independently; E‖ũ‖² = ‖u‖² + Σ p_i(1 − p_i) ≤ ‖u‖² + d/4, and ũ_i² takes two values
    |2⌊u_i⌋ + 1| ≤ 2|u_i| + 1 apart, so Hoeffding's inequality with Σ(2|u_i| + 1)² ≤ (2‖u‖ + √d)² gives the
    tail. Per-value clipping to [−r, r] only shrinks u, so c = C/step. The site redraws the rounding until
    it is within B (at most MAX_ROUNDING_DRAWS draws, each failing with probability ≤ β): the bound holds
    for every vector that leaves, and β only sets how often a draw is repeated — no δ term.
    """
    c = clip_norm / quantization_step
    root_d = math.sqrt(dimension)
    tail = math.sqrt(2 * math.log(1 / ROUNDING_BETA))
    return min(c + root_d, math.sqrt(c**2 + dimension / 4 + tail * (c + root_d / 2)))


def quantized_sensitivity(clip_norm: float, quantization_step: float, dimension: int) -> tuple[float, float]:
    """(L2, L1) sensitivity, in grid steps, of one site's quantized clipped update.

    The masked protocol maps a value x to the grid (x + r)/step, rounded stochastically, and
    conditionally (:func:`conditional_rounding_bound`): measured from the grid's centre L/2, a
    site's rounded update a has ‖a‖₂ ≤ B whatever the draws. Neighbouring runs differ in one site's
    update: its clipped update x (‖x‖ ≤ C) against the zero update (who takes part is visible, so a
    site is "removed" by zeroing its update). Zero sits halfway between two grid points (r/step = L/2
    is a half-integer as L = 2^bits − 1 is odd), so its rounding b has every coordinate ±½. Hence
    ‖a − b‖₂² = ‖a‖² − 2⟨a, b⟩ + d/4 ≤ B² + ‖a‖₁ + d/4 ≤ (B + √d/2)², and L1 ≤ √d · L2. A
    deterministic bound over the rounding outcomes: no failure probability to add to δ. (The output
    is a mixture over both roundings; the Rényi divergence of mixtures with common weights is at most
    the largest over the pairs, so the worst pair bounds it.)
    """
    l2 = conditional_rounding_bound(clip_norm, quantization_step, dimension) + math.sqrt(dimension) / 2
    return l2, math.sqrt(dimension) * l2


def skellam_share(length: int, variance: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Sk(variance): Poisson(variance/2) − Poisson(variance/2) per value, as int64."""
    rng = rng or default_rng()
    if variance <= 0:
        return np.zeros(length, dtype=np.int64)
    half = variance / 2
    return rng.poisson(half, size=length).astype(np.int64) - rng.poisson(half, size=length).astype(np.int64)


def skellam_gaussian_equivalent(variance: float, l2_sensitivity: float, l1_sensitivity: float) -> float:
    """A Gaussian noise multiplier whose RDP bounds the Skellam mechanism's at every integer order ≥ 2.

    Agarwal et al. 2021 (Thm 3.5): the Skellam mechanism of per-value variance μ is
    (α, ε(α))-RDP with ε(α) ≤ αΔ2²/(2μ) + min(((2α−1)Δ2² + 6Δ1)/(4μ²), 3Δ1/(2μ)) for integer
    α > 1. For α ≥ 2, ε(α)/α ≤ Δ2²/(2μ) + min((2Δ2² + 3Δ1)/(4μ²), 3Δ1/(4μ)) =: 1/(2s²),
    so a Gaussian of noise multiplier s (RDP α/(2s²)) dominates it order by order. Without
    subsampling, RDP composes by addition, so events of multiplier s accounted at integer
    orders bound the composed Skellam rounds.
    """
    if variance <= 0:
        return 0.0
    rate = l2_sensitivity**2 / (2 * variance) + min((2 * l2_sensitivity**2 + 3 * l1_sensitivity) / (4 * variance**2),
                                                    3 * l1_sensitivity / (4 * variance))
    return math.sqrt(l2_sensitivity**2 / (2 * rate)) / l2_sensitivity


def distributed_noise_share(length: int, *, noise_multiplier: float, clip_norm: float, quantization_step: float,
                            planned_shares: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One site's int64 Skellam noise share, in the masked protocol's quantized grid.

    ``planned_shares`` sites' shares add up to Sk((σ·Δ2)²) with Δ2 the quantized L2
    sensitivity: the target noise multiplier σ on the quantized sum. Give it as the number
    of participants minus the dropouts to tolerate, so the sum stays at or above the target
    when up to that many sites vanish.
    """
    if planned_shares < 1:
        raise ValueError("at least one noise share is needed")
    l2, _ = quantized_sensitivity(clip_norm, quantization_step, length)
    return skellam_share(length, (noise_multiplier * l2) ** 2 / planned_shares, rng)


def epsilon_for_surviving_shares(*, noise_multiplier: float, clip_norm: float, quantization_step: float,
                                 dimension: int, planned_shares: int, surviving_shares: int) -> GaussianEvent:
    """The event one distributed round really spent, from the noise present in the sum.

    ``surviving_shares`` sites' shares reached the unmasked sum (dropped sites' shares did
    not): the noise variance is surviving/planned of the target. Accounted with q = 1: the
    server knows who took part, so no amplification by client sampling is claimed.
    """
    if surviving_shares < 1:
        raise ValueError("a sum without any noise share is not differentially private")
    l2, l1 = quantized_sensitivity(clip_norm, quantization_step, dimension)
    variance = surviving_shares * (noise_multiplier * l2) ** 2 / planned_shares
    return GaussianEvent(skellam_gaussian_equivalent(variance, l2, l1), 1.0, 1)


# ---------------------------------------------------------------- adaptive clipping

def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """z_Δ of the update when the count query takes its share of the privacy (Andrew et al. 2021):
    1/z² = 1/z_Δ² + 1/(2σ_b)², so the pair (update sum, centred count) is one Gaussian of multiplier z."""
    if 2 * count_noise_std <= noise_multiplier:
        raise ValueError(f"adaptive clipping: the count noise std {count_noise_std:g} must exceed half the noise "
                         f"multiplier {noise_multiplier:g}")
    return (noise_multiplier**-2 - (2 * count_noise_std) ** -2) ** -0.5


@dataclass
class AdaptiveClipping:
    """Geometric clip-norm update towards a quantile of the update norms (Andrew et al. 2021).

    Each site sends b_i − ½, with b_i = 1 if its update norm was at most the current clip
    norm (sensitivity ½); the server adds N(0, σ_b²) to their sum, estimates the fraction
    b̄ = noisy sum / m + ½ and sets C ← C·exp(−η(b̄ − γ)). The count's privacy is part of
    the round's one Gaussian event (see :func:`update_noise_multiplier`).
    """

    clip_norm: float
    target_quantile: float
    learning_rate: float
    count_noise_std: float
    expected_participants: float
    history: list[float] = field(default_factory=list)

    @staticmethod
    def indicator(norm: float, clip_norm: float) -> float:
        """What a site adds to the count: b_i − ½."""
        return (1.0 if norm <= clip_norm else 0.0) - 0.5

    def server_update(self, indicator_sum: float, rng: np.random.Generator | None = None) -> float:
        noisy = indicator_sum + (rng or default_rng()).normal(0.0, self.count_noise_std)
        fraction = noisy / self.expected_participants + 0.5
        self.history.append(self.clip_norm)
        self.clip_norm *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.clip_norm

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clip_norm = float(state["clip_norm"])
        self.history = [float(v) for v in state["history"]]


# ---------------------------------------------------------------- the run's client-level settings

@dataclass(frozen=True)
class ClientPrivacy:
    """Client-level DP settings of a run and what each round spends."""

    placement: str
    clip_norm: float  # the initial clip norm under adaptive clipping
    noise_multiplier: float  # z: the one Gaussian event per round has this multiplier
    sample_rate: float  # q: expected participants / sites (1: every site every round)
    num_clients: int
    rounds: int
    delta: float
    accountant: str
    budget_epsilon: float  # 0: no budget (the configuration's "unbounded")
    target_epsilon: float
    dimension: int  # length of an update vector
    quantization_step: float = 0.0  # distributed: the value of one step of the masked protocol's grid
    tolerated_dropouts: int = 0  # distributed: shares are sized for participants − tolerated_dropouts
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_noise_std: float = 0.0
    reproducible: bool = False  # noise from the caller's seeded generator (tests, benchmarks)
    # central: how far the protocol's rounding moves one value of a site's contribution to the sum the server
    # noises, at most (value units; 0 for an exact sum); see feddat_secure.privacy.run_privacy.central_rounding
    rounding_per_value: float = 0.0

    def noise_rng(self, rng: np.random.Generator | None = None) -> np.random.Generator:
        """The generator to draw this party's noise (and Poisson participation) from: the OS's entropy,
        unless ``reproducible`` (then ``rng``, seeded by the run: no privacy against whoever knows the seed)."""
        if self.reproducible:
            if rng is None:
                raise ValueError("reproducible client-level noise needs the run's seeded generator")
            return rng
        return default_rng()

    @property
    def poisson_sampling(self) -> bool:
        """Whether participants must be drawn by :func:`poisson_participants`: only the central
        placement counts on sampling amplification (local and distributed are accounted with q = 1,
        as the server knows who took part, so a fixed-size sample is fine for them)."""
        return self.placement == "central" and self.sample_rate < 1

    @property
    def expected_participants(self) -> float:
        """The fixed denominator of the noisy mean (McMahan et al. 2018)."""
        return self.sample_rate * self.num_clients

    @property
    def rounding_l2(self) -> float:
        """central: r, the L2 bound of the rounding between a site's clipped update and what it adds to the
        sum the server noises. The sum's sensitivity is C + r (the triangle inequality: rounding every value
        by up to ρ moves a vector by up to ρ·√d), so the central noise is σ·(C + r)."""
        return self.rounding_per_value * math.sqrt(self.dimension)

    @property
    def count_rounding(self) -> float:
        """central, adaptive clipping: the rounding bound of the clipping indicator in count units (it travels
        as one more value of the protocol's input, scaled by INDICATOR_SCALE): the count's sensitivity is
        ½ + this, and the count noise grows with it (:meth:`adaptive_clipping`)."""
        return self.rounding_per_value / INDICATOR_SCALE

    @property
    def update_noise_multiplier(self) -> float:
        """Noise multiplier of the update sum (below z when the count query takes its share)."""
        if self.adaptive:
            return update_noise_multiplier(self.noise_multiplier, self.count_noise_std)
        return self.noise_multiplier

    def planned_shares(self, participants: int) -> int:
        """distributed: how many of a round's noise shares must reach the sum for the target noise."""
        shares = participants - self.tolerated_dropouts
        if shares < 1:
            raise ValueError(f"a round of {participants} participants cannot tolerate {self.tolerated_dropouts} "
                             f"dropouts")
        return shares

    def round_events(self, participants: int | None = None) -> list[GaussianEvent]:
        """What one round spends. ``distributed``: a sum that holds exactly the planned shares of a round of
        ``participants`` (the fewest an honest site lets be unmasked: ``min_survivors``), i.e. the target noise;
        the event does not depend on ``participants``."""
        if self.placement == "distributed":
            planned = self.planned_shares(participants or self.tolerated_dropouts + 1)
            return [epsilon_for_surviving_shares(
                noise_multiplier=self.noise_multiplier, clip_norm=self.clip_norm,
                quantization_step=self.quantization_step, dimension=self.dimension, planned_shares=planned,
                surviving_shares=planned)]
        if self.placement == "local":  # against the server, who sees each noised update and who sent it
            return [GaussianEvent(self.noise_multiplier, 1.0, 1)]
        return [GaussianEvent(self.noise_multiplier, self.sample_rate, 1)]  # central

    @property
    def per_client_ledgers(self) -> bool:
        """Whether each site holds a client-level ledger of its own, with its own budget gate: the placements whose
        claim is protection against the server. Local noise protects each site separately. Distributed noise
        protects the sum, but a ledger only the server keeps would let the server alone decide how many sums are
        released: each site charges the round's planned event (the target noise, which it enforces itself with
        ``min_survivors``) before it adds its share, and refuses a round that would pass the budget."""
        return self.placement in ("local", "distributed")

    @property
    def federation_ledger(self) -> bool:
        """Whether the server keeps the federation's client-level ledger: the placements that noise the sum."""
        return self.placement in ("central", "distributed")

    def new_accountant(self, client: str | None = None) -> PrivacyAccountant:
        orders = SKELLAM_RDP_ORDERS if self.placement == "distributed" else None
        return PrivacyAccountant(level="client", client=client, accountant=self.accountant, delta=self.delta,
                                 budget_epsilon=self.budget_epsilon, per_round=self.round_events(),
                                 rdp_orders=orders)

    def noise_share(self, participants: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """distributed: this site's int64 Skellam share for the masked protocol's ``noise`` input,
        in a round of ``participants`` sites."""
        if self.placement != "distributed":
            raise ValueError(f"noise shares belong to the distributed placement, not {self.placement!r}")
        return distributed_noise_share(self.dimension, noise_multiplier=self.noise_multiplier,
                                       clip_norm=self.clip_norm, quantization_step=self.quantization_step,
                                       planned_shares=self.planned_shares(participants), rng=rng)

    @property
    def rounding_norm_bound(self) -> float:
        """distributed: the masked protocol's ``rounding_norm_bound`` (conditional randomized rounding) that the
        quantized sensitivity counts on (:func:`conditional_rounding_bound`)."""
        if self.placement != "distributed":
            raise ValueError(f"conditional rounding belongs to the distributed placement, not {self.placement!r}")
        return conditional_rounding_bound(self.clip_norm, self.quantization_step, self.dimension)

    def noise_bound(self, participants: int) -> int:
        """distributed: the masked protocol's ``noise_bound`` (largest |share value|) for rounds of
        at least ``participants`` sites: NOISE_BOUND_STDS share standard deviations. A share beyond
        it (probability below 1e-30 per value) is refused by the masked client, never clamped."""
        l2, _ = quantized_sensitivity(self.clip_norm, self.quantization_step, self.dimension)
        return math.ceil(NOISE_BOUND_STDS * self.noise_multiplier * l2 / math.sqrt(self.planned_shares(participants)))

    def adaptive_clipping(self) -> AdaptiveClipping | None:
        """The server's clip-norm state. Its count noise is σ_b·(1 + 2·count_rounding): σ_b relative to the
        count's sensitivity ½ + count_rounding, as :func:`update_noise_multiplier` assumes for ½."""
        if not self.adaptive:
            return None
        return AdaptiveClipping(self.clip_norm, self.target_quantile, self.clip_learning_rate,
                                self.count_noise_std * (1 + 2 * self.count_rounding), self.expected_participants)

    def describe(self) -> dict[str, Any]:
        mechanism = {
            "central": "DP-FedAvg, Gaussian noise added by the server to the sum of clipped updates",
            "local": "DP-FedAvg, Gaussian noise added by every site to its own clipped update",
            "distributed": "DP-FedAvg, Skellam noise shares added by the sites inside masked secure aggregation",
        }[self.placement]
        description = {"mechanism": mechanism, "placement": self.placement, "noise_multiplier": self.noise_multiplier,
                       "clip_norm": self.clip_norm, "sample_rate": self.sample_rate, "num_clients": self.num_clients,
                       "expected_participants": self.expected_participants, "rounds": self.rounds,
                       "delta": self.delta, "accountant": self.accountant, "budget_epsilon": self.budget_epsilon,
                       "target_epsilon": self.target_epsilon, "update_dimension": self.dimension,
                       "reproducible": self.reproducible}
        if self.placement == "distributed":
            l2, l1 = quantized_sensitivity(self.clip_norm, self.quantization_step, self.dimension)
            description.update(quantization_step=self.quantization_step, tolerated_dropouts=self.tolerated_dropouts,
                               quantized_l2_sensitivity=l2, quantized_l1_sensitivity=l1)
        if self.placement == "central":
            description.update(rounding_l2_sensitivity=self.rounding_l2,
                               effective_l2_sensitivity=self.clip_norm + self.rounding_l2)
        if self.adaptive:
            description.update(adaptive_clipping=True, target_quantile=self.target_quantile,
                               clip_learning_rate=self.clip_learning_rate, count_noise_std=self.count_noise_std,
                               update_noise_multiplier=self.update_noise_multiplier,
                               count_sensitivity=0.5 + self.count_rounding)
        return description


def make_client_privacy(config: ClientPrivacyConfig, *, num_clients: int, clients_per_round: int, rounds: int,
                        dimension: int, quantization_step: float = 0.0,
                        rounding_per_value: float = 0.0) -> ClientPrivacy | None:
    """The run's client-level DP settings, or None when ``placement`` is ``off``.

    q = clients_per_round / num_clients (participants drawn by :func:`poisson_participants`).
    ``quantization_step`` (the masked protocol's ``Quantizer.scale``) is needed with
    ``distributed``; ``rounding_per_value`` (:attr:`ClientPrivacy.rounding_per_value`) is the protocol's
    rounding under ``central``. With ``target_epsilon`` > 0 the noise multiplier is calibrated for
    ``rounds`` rounds. The configuration was checked when it loaded (feddat_secure.config); impossible
    arguments here raise ``ValueError``, and so does a target ε no noise multiplier reaches.
    """
    if config.placement == "off":
        return None
    sample_rate = min(1.0, clients_per_round / num_clients)
    if config.adaptive_clipping and config.placement != "central":
        raise ValueError(f"adaptive clipping needs the central placement, not {config.placement!r}")
    if not 0 < config.target_quantile < 1:
        raise ValueError(f"the target quantile must lie in (0, 1), got {config.target_quantile}")
    if config.placement == "distributed":
        if config.accountant != "rdp":
            raise ValueError(f"the distributed placement (Skellam noise) is accounted with RDP only, not "
                             f"{config.accountant!r}")
        if quantization_step <= 0:
            raise ValueError("the distributed placement needs the masked protocol's quantization step")
        if clients_per_round - config.tolerated_dropouts < 1:
            raise ValueError(f"{config.tolerated_dropouts} tolerated dropouts leave none of the {clients_per_round} "
                             "participants")
    expected = sample_rate * num_clients
    count_std = config.count_noise_std or max(expected / 20, config.noise_multiplier)
    settings = ClientPrivacy(placement=config.placement, clip_norm=config.clip_norm,
                             noise_multiplier=config.noise_multiplier, sample_rate=sample_rate,
                             num_clients=num_clients, rounds=rounds, delta=config.delta, accountant=config.accountant,
                             budget_epsilon=config.budget_epsilon if math.isfinite(config.budget_epsilon) else 0.0,
                             target_epsilon=config.target_epsilon,
                             dimension=dimension, quantization_step=quantization_step,
                             tolerated_dropouts=config.tolerated_dropouts,
                             adaptive=config.adaptive_clipping, target_quantile=config.target_quantile,
                             clip_learning_rate=config.clip_learning_rate, count_noise_std=count_std,
                             reproducible=config.reproducible, rounding_per_value=rounding_per_value)
    if config.target_epsilon > 0:
        def epsilon_of(sigma: float) -> float:
            trial = replace(settings, noise_multiplier=sigma)
            orders = SKELLAM_RDP_ORDERS if trial.placement == "distributed" else None
            events = trial.round_events(participants=clients_per_round) * rounds
            try:
                return compute_epsilon(events, config.delta, config.accountant, rdp_orders=orders)
            except AccountingError:
                return math.inf  # outside PRV's numerical range: far above any target

        settings = replace(settings, noise_multiplier=calibrate(epsilon_of, config.target_epsilon))
        if settings.adaptive:
            settings = replace(settings, count_noise_std=config.count_noise_std or max(
                expected / 20, settings.noise_multiplier))
    if not (settings.noise_multiplier > 0 and math.isfinite(settings.noise_multiplier)):
        raise ValueError(f"client-level DP needs a finite noise multiplier > 0, got {settings.noise_multiplier}")
    if settings.adaptive:  # raises ValueError if the count noise leaves nothing for the update
        update_noise_multiplier(settings.noise_multiplier, settings.count_noise_std)
    return settings
