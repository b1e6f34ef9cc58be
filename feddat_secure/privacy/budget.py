"""The budget gate: a round whose planned privacy cost would exceed a budget is not run."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..errors import FeddatError
from .accounting import GaussianEvent, PrivacyAccountant


class BudgetExceeded(FeddatError, RuntimeError):
    """The next round would spend more than a privacy budget allows; every reason is listed."""

    def __init__(self, round_index: int, reasons: Sequence[str], *, whole_run: bool = False) -> None:
        self.round_index = round_index
        self.reasons = tuple(reasons)
        what = "this run was not started, its planned rounds would exceed a dataset's budget" if whole_run \
            else f"round {round_index + 1} was not run, it would exceed the budget"
        super().__init__(f"privacy budget: {what}; " + "; ".join(self.reasons))


def check_budgets(round_index: int,
                  plans: Iterable[tuple[PrivacyAccountant, Sequence[GaussianEvent]]]) -> None:
    """Raise :class:`BudgetExceeded` if any ledger's planned events would break its budget."""
    reasons = [reason for accountant, events in plans
               if (reason := accountant.would_exceed(events, round_index)) is not None]
    if reasons:
        raise BudgetExceeded(round_index, reasons)
