"""Differential privacy for values revealed from MPC: joint integer noise, accounting, budgets."""

from mpcfl.dp.accountant import ACCOUNTANTS, Accountant, Charge, calibrate_noise_multiplier, create_accountant
from mpcfl.dp.budget import Budget, BudgetExceeded

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "Budget",
    "BudgetExceeded",
    "Charge",
    "calibrate_noise_multiplier",
    "create_accountant",
]
