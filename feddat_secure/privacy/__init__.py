"""Differential privacy at two levels: record-level DP-SGD inside each site, and client-level
DP-FedAvg across sites; their accounting, budgets and the privacy report. See docs/privacy.md."""

from .accounting import (
    ACCOUNTANTS,
    AccountingError,
    GaussianEvent,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    combined_noise_multiplier,
    composed_noise_multiplier,
    compute_epsilon,
)
from .budget import BudgetExceeded, check_budgets
from .dp_sgd import PrivacyError
from .record import RecordPrivacy, make_record_privacy

__all__ = [
    "ACCOUNTANTS",
    "AccountingError",
    "BudgetExceeded",
    "GaussianEvent",
    "PrivacyAccountant",
    "PrivacyError",
    "RecordPrivacy",
    "calibrate_noise_multiplier",
    "check_budgets",
    "combined_noise_multiplier",
    "composed_noise_multiplier",
    "compute_epsilon",
    "make_record_privacy",
]
