"""Privacy ledgers: which Gaussian mechanisms a run composed, and the ε they cost.

Every DP mechanism in this package is recorded as a :class:`GaussianEvent`: ``steps``
repetitions of a Gaussian mechanism with noise multiplier σ (noise standard deviation over
L2 sensitivity) run on a Poisson subsample drawn with rate q. That triple is all Opacus's
accountants need, so anyone holding a ledger's events can recompute ε with another
accountant (the report publishes them for exactly this reason).

A :class:`PrivacyAccountant` is the ledger of one protected unit — one site's records
(record level) or the federation's sites (client level) — with its δ and budget, the events
one round is planned to spend, and the events each finished round did spend. Its state is a
plain dictionary, saved in every round's checkpoint, so a resumed run neither spends a
round twice nor forgets one.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

ACCOUNTANTS = ("rdp", "prv")
LEVELS = ("record", "client")
STATE_VERSION = 1

# Opacus's default orders, plus larger ones for tight budgets with many steps (more orders
# can only lower the RDP bound, never raise it).
RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS) + (64, 80, 96, 128, 160, 192, 256)
PRV_EPS_ERROR = 0.01  # PRV reports the upper end of its error interval, so ε is never under-stated
PRV_MAX_RDP_EPSILON = 100.0  # beyond this RDP ε, PRV's discretisation needs gigabytes; RDP is reported instead


class AccountingError(ValueError):
    """An accountant cannot bound these events (e.g. PRV outside its numerical range)."""


@dataclass(frozen=True)
class GaussianEvent:
    """``steps`` Poisson-subsampled Gaussian mechanisms: noise multiplier σ, sampling rate q."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not 0 <= self.sample_rate <= 1:
            raise ValueError(f"sample rate must lie in [0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def to_json(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GaussianEvent:
        return cls(float(data["noise_multiplier"]), float(data["sample_rate"]), int(data["steps"]))


def merge_events(events: Iterable[GaussianEvent]) -> list[GaussianEvent]:
    """Adds up the steps of events with the same (σ, q); drops events that cost nothing."""
    steps: dict[tuple[float, float], int] = {}
    for event in events:
        if event.steps and event.sample_rate:
            key = (event.noise_multiplier, event.sample_rate)
            steps[key] = steps.get(key, 0) + event.steps
    return [GaussianEvent(sigma, q, count) for (sigma, q), count in steps.items()]


def compute_epsilon(events: Iterable[GaussianEvent], delta: float, accountant: str = "rdp", *,
                    rdp_orders: Sequence[float] | None = None) -> float:
    """ε at ``delta`` of the composition of ``events`` under Opacus's RDP or PRV accountant.

    Returns ``inf`` when an event has no noise. PRV returns the upper end of its error
    interval. ``rdp_orders`` restricts the RDP orders (a ledger of RDP-dominating events,
    e.g. the Skellam mechanism, is only valid at the orders its domination was shown for).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; known: {', '.join(ACCOUNTANTS)}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    history = tuple(merge_events(events))
    if not history:
        return 0.0
    if any(e.noise_multiplier == 0 for e in history):
        return math.inf
    orders = tuple(rdp_orders) if rdp_orders is not None else None
    if accountant == "rdp":
        return _rdp_epsilon(history, delta, orders or RDP_ORDERS)
    if orders is not None:
        raise AccountingError("these events only bound the mechanism in RDP; PRV does not apply")
    return _prv_epsilon(history, delta)


@functools.lru_cache(maxsize=4096)
def _rdp_of(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one subsampled Gaussian step at every order (Opacus's analysis; T steps cost T times this)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                                   orders=list(orders)), dtype=np.float64)


@functools.lru_cache(maxsize=4096)
def _rdp_epsilon(history: tuple[GaussianEvent, ...], delta: float, orders: tuple[float, ...]) -> float:
    """What Opacus's ``RDPAccountant`` computes, with each event's per-step RDP cached."""
    rdp = sum(e.steps * _rdp_of(e.noise_multiplier, e.sample_rate, orders) for e in history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the best order is an extreme one
        epsilon, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return _not_negative(float(epsilon))


def _not_negative(epsilon: float) -> float:
    """ε clamped at 0: a bound below 0 is a conversion artefact, never a privacy statement.

    Opacus's conversions return ε < 0 for large δ and little privacy loss: the RDP → (ε, δ) conversion of
    Balle et al. 2020 (Thm. 21) is ln(1 − δ) < 0 at zero RDP and order α = 1/δ, and PRV's upper bound can
    cross 0 by its discretisation error. Privacy loss is measured from 0 (a mechanism that ignores its input
    has ε = 0; dp_accounting never reports less), and (ε, δ)-DP implies (ε', δ)-DP for every ε' ≥ ε, so 0 is
    valid wherever the negative bound is, and a budget is never credited with privacy nobody spent."""
    return max(epsilon, 0.0)


@functools.cache  # a ledger's ε is the maximum over its prefixes: each is computed once
def _prv_epsilon(history: tuple[GaussianEvent, ...], delta: float) -> float:
    rdp_epsilon = _rdp_epsilon(history, delta, RDP_ORDERS)
    if rdp_epsilon > PRV_MAX_RDP_EPSILON:
        raise AccountingError(f"ε is beyond the PRV accountant's numerical range (RDP bound: {rdp_epsilon:.1f})")
    prv = PRVAccountant()
    prv.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log(0) at q = 1 inside Opacus's PRV
        try:
            epsilon = float(prv.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
        except (ValueError, RuntimeError, OverflowError, MemoryError) as error:
            raise AccountingError(f"PRV accountant cannot bound these events: {error}") from error
    if not math.isfinite(epsilon):
        raise AccountingError(f"PRV accountant returned ε = {epsilon}")
    return _not_negative(epsilon)


def calibrate(epsilon_of: Callable[[float], float], target_epsilon: float, *, low: float = 0.05,
              high: float = 100.0, tolerance: float = 1e-3) -> float:
    """The smallest parameter x (to ``tolerance``, relative) with epsilon_of(x) <= target, by bisection.

    ``epsilon_of`` must decrease as x grows (more noise, less ε). The returned x always meets
    the target: the search keeps ``high`` on the feasible side.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    while epsilon_of(high) > target_epsilon:
        if high > 1e6:
            raise ValueError(f"no noise multiplier up to {high:g} reaches ε = {target_epsilon}")
        high *= 2
    while epsilon_of(low) <= target_epsilon and low > 1e-4:
        low /= 2
    while (high - low) > tolerance * high:
        middle = (low + high) / 2
        if epsilon_of(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


def calibrate_noise_multiplier(target_epsilon: float, delta: float, *, sample_rate: float, steps: int,
                               accountant: str = "rdp", mechanisms_per_step: int = 1,
                               step_noise_ratios: Sequence[float] | None = None) -> float:
    """σ of each DP-SGD step so that ``steps`` steps stay within ``target_epsilon``.

    ``mechanisms_per_step`` Gaussian mechanisms on the same subsample compose into one of
    noise multiplier σ/√k (see :func:`composed_noise_multiplier`), which is what is accounted. With
    ``step_noise_ratios`` (one per mechanism) the i-th mechanism's noise multiplier is σ·ratios[i] and the one
    accounted is :func:`combined_noise_multiplier` of them; the returned σ is the one the ratios scale.
    """
    ratios = tuple(step_noise_ratios) if step_noise_ratios is not None else (1.0,) * mechanisms_per_step
    if len(ratios) != mechanisms_per_step or not all(r > 0 and math.isfinite(r) for r in ratios):
        raise ValueError(f"step_noise_ratios must be {mechanisms_per_step} finite values > 0, got {ratios}")

    def epsilon_of(sigma: float, name: str = accountant) -> float:
        event = GaussianEvent(combined_noise_multiplier([sigma * r for r in ratios]), sample_rate, steps)
        try:
            return compute_epsilon([event], delta, name)
        except AccountingError:
            return math.inf  # outside PRV's range: far above any target

    sigma = calibrate(lambda s: epsilon_of(s, "rdp"), target_epsilon)
    if accountant == "rdp":
        return sigma
    # PRV's ε is below RDP's, so the RDP answer is feasible; refine below it (PRV is slower)
    return calibrate(epsilon_of, target_epsilon, low=sigma / 2, high=sigma)


def composed_noise_multiplier(noise_multiplier: float, mechanisms: int) -> float:
    """k Gaussian mechanisms, each of sensitivity C and noise σC, run adaptively on the SAME
    subsample, are exactly one Gaussian mechanism of noise multiplier σ/√k on that subsample
    (μ-GDP composes as √(Σμ²)); subsampling then amplifies once. Counting them as k
    independently subsampled steps would under-state ε (it assumes a record can be in one
    step's batch and not in the other's)."""
    if mechanisms < 1:
        raise ValueError(f"mechanisms must be >= 1, got {mechanisms}")
    return combined_noise_multiplier([noise_multiplier] * mechanisms)


def combined_noise_multiplier(noise_multipliers: Sequence[float]) -> float:
    """Gaussian mechanisms of noise multipliers σ_1 … σ_k (each of sensitivity C, noise σ_i·C), run adaptively on
    the SAME subsample, are exactly one Gaussian mechanism of noise multiplier (Σ σ_i⁻²)^-½: each is
    (1/σ_i)-GDP, and μ_i-GDP mechanisms compose to √(Σμ_i²)-GDP (Dong, Roth & Su, "Gaussian Differential
    Privacy", JRSS B 2022). With every σ_i = σ this is σ/√k; a step without noise (σ_i = 0) makes it 0, no
    privacy. Raises ``ValueError`` for an empty list or a negative σ_i."""
    if not noise_multipliers or not all(sigma >= 0 for sigma in noise_multipliers):
        raise ValueError(f"noise multipliers must be one or more values >= 0, got {list(noise_multipliers)}")
    if min(noise_multipliers) == 0:
        return 0.0
    if len(set(noise_multipliers)) == 1:  # σ/√k exactly, as ledgers written before unequal splits recorded it
        return noise_multipliers[0] / math.sqrt(len(noise_multipliers))
    return sum(sigma ** -2 for sigma in noise_multipliers) ** -0.5


class PrivacyAccountant:
    """The ledger of one protected unit at one level: its events per round, its δ and budget.

    ``accountant`` is the one that decides the budget; ε under every applicable accountant is
    available for the report. ``per_round`` are the events a round is planned to spend.
    """

    def __init__(self, *, level: str, client: str | None, accountant: str, delta: float, budget_epsilon: float,
                 per_round: Sequence[GaussianEvent], rdp_orders: Sequence[float] | None = None) -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}; known: {', '.join(LEVELS)}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; known: {', '.join(ACCOUNTANTS)}")
        if rdp_orders is not None and accountant != "rdp":
            raise ValueError("a ledger restricted to RDP orders can only be accounted with 'rdp'")
        self.level = level
        self.client = client
        self.accountant = accountant
        self.delta = delta
        self.budget_epsilon = budget_epsilon
        self.per_round = tuple(per_round)
        self.rdp_orders = tuple(rdp_orders) if rdp_orders is not None else None
        self.rounds: list[tuple[int, tuple[GaussianEvent, ...]]] = []

    @property
    def name(self) -> str:
        return f"{self.level}-level" + (f" ledger of {self.client}" if self.client else " ledger")

    @property
    def applicable_accountants(self) -> tuple[str, ...]:
        return ("rdp",) if self.rdp_orders is not None else ACCOUNTANTS

    @property
    def events(self) -> list[GaussianEvent]:
        return [event for _, events in self.rounds for event in events]

    @property
    def spent_rounds(self) -> list[int]:
        return [round_index for round_index, _ in self.rounds]

    def planned_events(self, round_index: int) -> list[GaussianEvent]:
        """What ``round_index`` will spend if it runs as planned (the same every round)."""
        del round_index  # every round has the same plan; kept so a schedule could vary it
        return list(self.per_round)

    def epsilon(self, accountant: str | None = None, *, extra: Iterable[GaussianEvent] = ()) -> float:
        """ε spent so far (plus ``extra`` events, if given) at this ledger's δ: never below an ε it reported
        after an earlier round (the running maximum, see :meth:`epsilon_history`).

        When this ledger's own accountant is PRV and PRV cannot bound the events (ε far out of
        its range), RDP's bound — also valid, only looser — is used. Asking for an accountant
        explicitly raises AccountingError instead.
        """
        now = self._epsilon([*self.events, *extra], accountant)
        return max([now, *(epsilon for _, epsilon in self.epsilon_history(accountant))])

    def epsilon_history(self, accountant: str | None = None) -> list[tuple[int, float]]:
        """(round, ε spent up to and including that round) for every spent round, never decreasing.

        The mechanism of rounds 1..k+1 contains that of rounds 1..k (composition with more mechanisms never
        costs less privacy), so its true ε is at least round k's; a bound that goes down is the accountant's
        numerical error (PRV's discretisation changes with the number of steps: measured 0.01157 → 0.01135
        for (σ 3, q 0.001, 1 step) per round at δ = 1e-5, rounds 2 → 4). The running maximum of valid bounds
        is a valid bound (it is at least the current one), and keeps every ε this ledger has reported, and a
        budget was checked against, from shrinking later."""
        history, events, highest = [], [], 0.0
        for round_index, round_events in self.rounds:
            events.extend(round_events)
            highest = max(highest, self._epsilon(events, accountant))
            history.append((round_index, highest))
        return history

    def _epsilon(self, events: list[GaussianEvent], accountant: str | None) -> float:
        if accountant is not None:
            return compute_epsilon(events, self.delta, accountant, rdp_orders=self.rdp_orders)
        try:
            return compute_epsilon(events, self.delta, self.accountant, rdp_orders=self.rdp_orders)
        except AccountingError:
            return compute_epsilon(events, self.delta, "rdp", rdp_orders=self.rdp_orders)

    def would_exceed(self, events: Sequence[GaussianEvent], round_index: int | None = None) -> str | None:
        """Why spending ``events`` would break the budget, or None when it fits (or there is no budget)."""
        if self.budget_epsilon <= 0:
            return None
        before = self.epsilon()
        after = self.epsilon(extra=events)
        if after <= self.budget_epsilon:
            return None
        which = f"round {round_index + 1}" if round_index is not None else "the next round"
        return (f"{self.name}: {which} would raise ε from {before:.3f} to {after:.3f} "
                f"({self.accountant}, δ = {self.delta:g}), over the budget ε = {self.budget_epsilon:g}")

    def spend(self, events: Sequence[GaussianEvent], round_index: int) -> float:
        """Record what an attempt at ``round_index`` spent; returns ε so far.

        Rounds are charged in order. Charging the last charged round again is a retry (a run resumed after a
        crash inside that round releases it a second time, with fresh noise), and it costs again: every
        release is a mechanism run. An earlier round is refused (a ledger never rewrites its past)."""
        if self.rounds and round_index < self.rounds[-1][0]:
            raise ValueError(f"{self.name}: round {round_index + 1} comes before round {self.rounds[-1][0] + 1}, "
                             "the last one charged; a ledger is charged in round order")
        self.rounds.append((round_index, tuple(events)))
        return self.epsilon()

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (checkpoint- and JSON-safe)."""
        return {
            "version": STATE_VERSION,
            "level": self.level,
            "client": self.client,
            "accountant": self.accountant,
            "delta": self.delta,
            "budget_epsilon": self.budget_epsilon,
            "per_round": [e.to_json() for e in self.per_round],
            "rdp_orders": list(self.rdp_orders) if self.rdp_orders is not None else None,
            "rounds": [{"round": r, "events": [e.to_json() for e in events]} for r, events in self.rounds],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the spent rounds; the state must belong to this ledger (level, client, δ)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.name}: unsupported ledger state version {state.get('version')!r}")
        for key in ("level", "client", "delta"):
            if state[key] != getattr(self, key):
                raise ValueError(f"{self.name}: saved ledger has {key} = {state[key]!r}, this run has "
                                 f"{getattr(self, key)!r}")
        self.rounds = [(int(r["round"]), tuple(GaussianEvent.from_json(e) for e in r["events"]))
                       for r in state["rounds"]]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyAccountant:
        orders = state.get("rdp_orders")
        accountant = cls(level=state["level"], client=state["client"], accountant=state["accountant"],
                         delta=float(state["delta"]), budget_epsilon=float(state["budget_epsilon"]),
                         per_round=[GaussianEvent.from_json(e) for e in state["per_round"]],
                         rdp_orders=orders)
        accountant.load_state_dict(state)
        return accountant
