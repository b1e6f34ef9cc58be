"""Privacy accounting: ε values match independent computations; ledgers, budgets and resume."""

from __future__ import annotations

import json
import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from feddat_secure.privacy import (
    BudgetExceeded,
    GaussianEvent,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    check_budgets,
    composed_noise_multiplier,
    compute_epsilon,
)

DELTA = 1e-5
# (q, σ, steps, ε of Opacus's RDP accountant at δ = 1e-5), as stated in the issue
REFERENCE = [(0.1, 1.0, 100, 7.90), (0.1, 1.0, 500, 18.02), (0.01, 1.1, 1000, 1.71), (0.05, 0.8, 200, 8.73)]


def google_event(q: float, sigma: float, steps: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


@pytest.mark.parametrize("q, sigma, steps, expected", REFERENCE)
def test_rdp_epsilon_matches_the_reference_values(q, sigma, steps, expected):
    assert compute_epsilon([GaussianEvent(sigma, q, steps)], DELTA, "rdp") == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("q, sigma, steps, expected", REFERENCE)
def test_rdp_epsilon_agrees_with_googles_dp_accounting(q, sigma, steps, expected):
    accountant = RdpAccountant()
    accountant.compose(google_event(q, sigma, steps))
    ours = compute_epsilon([GaussianEvent(sigma, q, steps)], DELTA, "rdp")
    assert ours == pytest.approx(accountant.get_epsilon(DELTA), rel=0.01)  # the two use different RDP orders


@pytest.mark.parametrize("q, sigma, steps", [(0.1, 1.0, 100), (0.01, 1.1, 1000)])
def test_prv_epsilon_is_an_upper_bound_close_to_googles_pld(q, sigma, steps):
    pld = PLDAccountant()
    pld.compose(google_event(q, sigma, steps))
    reference = pld.get_epsilon(DELTA)
    prv = compute_epsilon([GaussianEvent(sigma, q, steps)], DELTA, "prv")
    assert reference - 0.01 <= prv <= reference * 1.02
    assert prv < compute_epsilon([GaussianEvent(sigma, q, steps)], DELTA, "rdp")  # PRV is the tighter bound


def test_two_dp_sgd_steps_on_one_poisson_batch_are_accounted_as_one_mechanism_of_sigma_over_root_two():
    """FedDAT runs two Gaussian mechanisms on each sample. Accounting them as 2T independently
    subsampled steps would under-state ε: the sound composition (σ/√2 on T samples) is larger."""
    q, sigma, steps = 0.1, 1.0, 100
    sound = compute_epsilon([GaussianEvent(composed_noise_multiplier(sigma, 2), q, steps)], DELTA, "rdp")
    naive = compute_epsilon([GaussianEvent(sigma, q, 2 * steps)], DELTA, "rdp")
    assert composed_noise_multiplier(sigma, 2) == pytest.approx(sigma / math.sqrt(2))
    assert sound > naive * 1.2
    accountant = RdpAccountant()  # independent: Google's accountant on the composed mechanism
    accountant.compose(google_event(q, sigma / math.sqrt(2), steps))
    assert sound == pytest.approx(accountant.get_epsilon(DELTA), rel=0.01)
    # without subsampling the two views coincide (Gaussian composition is exact)
    assert compute_epsilon([GaussianEvent(sigma / math.sqrt(2), 1.0, steps)], DELTA) == pytest.approx(
        compute_epsilon([GaussianEvent(sigma, 1.0, 2 * steps)], DELTA), rel=1e-6)


def test_no_events_cost_nothing_and_no_noise_costs_everything():
    assert compute_epsilon([], DELTA) == 0.0
    assert compute_epsilon([GaussianEvent(1.0, 0.0, 10)], DELTA) == 0.0
    assert compute_epsilon([GaussianEvent(0.0, 0.1, 1)], DELTA) == math.inf


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_multiplier_meets_the_target_and_is_not_wasteful(accountant):
    sigma = calibrate_noise_multiplier(3.0, DELTA, sample_rate=0.05, steps=300, accountant=accountant,
                                       mechanisms_per_step=2)
    event = GaussianEvent(sigma / math.sqrt(2), 0.05, 300)
    assert compute_epsilon([event], DELTA, accountant) <= 3.0
    looser = GaussianEvent(sigma * 0.98 / math.sqrt(2), 0.05, 300)
    assert compute_epsilon([looser], DELTA, accountant) > 3.0


def ledger(budget: float = 0.0, accountant: str = "rdp") -> PrivacyAccountant:
    return PrivacyAccountant(level="record", client="site-a", accountant=accountant, delta=DELTA,
                             budget_epsilon=budget, per_round=[GaussianEvent(1.0, 0.1, 20)])


def test_ledger_composes_every_round_it_spent():
    book = ledger()
    for round_index in range(5):
        book.spend(book.planned_events(round_index), round_index)
    assert book.epsilon() == pytest.approx(7.90, abs=0.01)  # 5 rounds × 20 steps = the 100-step reference
    history = book.epsilon_history()
    assert [r for r, _ in history] == [0, 1, 2, 3, 4]
    assert all(a < b for (_, a), (_, b) in zip(history, history[1:]))


def test_a_round_that_would_exceed_the_budget_is_refused_with_the_reason():
    book = ledger(budget=5.0)
    spent = 0
    while book.would_exceed(book.planned_events(spent), spent) is None:
        book.spend(book.planned_events(spent), spent)
        spent += 1
    assert spent > 0 and book.epsilon() <= 5.0
    assert book.epsilon(extra=book.planned_events(spent)) > 5.0
    with pytest.raises(BudgetExceeded) as raised:
        check_budgets(spent, [(book, book.planned_events(spent))])
    message = str(raised.value)
    assert f"round {spent + 1}" in message and "site-a" in message and "budget ε = 5" in message


def test_resume_restores_spent_budget_and_charges_a_retried_round_again():
    book = ledger(budget=6.0)
    for round_index in range(3):
        book.spend(book.planned_events(round_index), round_index)
    state = json.loads(json.dumps(book.state_dict()))  # survives a JSON (or checkpoint) round trip
    resumed = ledger(budget=6.0)
    resumed.load_state_dict(state)
    assert resumed.epsilon() == book.epsilon()
    assert resumed.spent_rounds == [0, 1, 2]
    with pytest.raises(ValueError, match="comes before round 3"):
        resumed.spend(resumed.planned_events(1), 1)  # the past is never rewritten
    retried = resumed.spend(resumed.planned_events(2), 2)  # round 3 released a second time: a second charge
    assert retried > book.epsilon() and resumed.spent_rounds == [0, 1, 2, 2]
    assert resumed.spend(resumed.planned_events(3), 3) > retried
    assert PrivacyAccountant.from_state_dict(resumed.state_dict()).epsilon() == resumed.epsilon()


def test_a_saved_ledger_of_another_unit_is_refused():
    book = ledger()
    other = PrivacyAccountant(level="record", client="site-b", accountant="rdp", delta=DELTA, budget_epsilon=0,
                              per_round=[])
    with pytest.raises(ValueError, match="client"):
        other.load_state_dict(book.state_dict())
