"""Backward-pass estimators for rounding in QAT: ste, fourier (StableQAT) and jacobian (after JacQuant)."""

from qatcli.estimators.base import ESTIMATORS, Estimator, check_estimator, make_estimator, register
from qatcli.estimators.fourier import FOURIER_C, Fourier
from qatcli.estimators.jacobian import Jacobian
from qatcli.estimators.ste import STE

__all__ = [
    "ESTIMATORS",
    "FOURIER_C",
    "STE",
    "Estimator",
    "Fourier",
    "Jacobian",
    "check_estimator",
    "make_estimator",
    "register",
]
