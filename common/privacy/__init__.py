"""Differential privacy bookkeeping: mechanisms as data, dp-accounting composition, budgets, the signed ledger.

Every phase that releases anything from a site charges it to the site's `SiteLedger` first.
"""

from pmlm.common.privacy.accountant import (
    ACCOUNTANT,
    AccountantSettings,
    CalibrationError,
    Composition,
    Epsilons,
    calibrate_dpsgd,
    calibrate_gaussian,
    compose_epsilon,
)
from pmlm.common.privacy.budget import BudgetConfig, BudgetExhausted, Charge, UnknownPhase
from pmlm.common.privacy.events import PRIVACY_UNITS, DpSgd, GaussianRelease, Mechanism, MechanismError, mechanism_from_dict
from pmlm.common.privacy.ledger import (
    AlreadyReleased,
    LedgerConfigMismatch,
    LedgerCorrupted,
    LedgerError,
    LedgerTornTail,
    SiteLedger,
    verify_ledger,
)

__all__ = [
    "ACCOUNTANT", "AccountantSettings", "CalibrationError", "Composition", "Epsilons", "calibrate_dpsgd",
    "calibrate_gaussian", "compose_epsilon", "BudgetConfig", "BudgetExhausted", "Charge", "UnknownPhase",
    "PRIVACY_UNITS", "DpSgd", "GaussianRelease", "Mechanism", "MechanismError", "mechanism_from_dict",
    "AlreadyReleased", "LedgerConfigMismatch", "LedgerCorrupted", "LedgerError", "LedgerTornTail", "SiteLedger", "verify_ledger",
]
