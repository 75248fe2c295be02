"""Backward-pass estimators for rounding in QAT: ste, fourier (StableQAT) and jacobian (after JacQuant)."""

from qatcli.qat.estimators.base import ESTIMATORS, Estimator, check_estimator, make_estimator, register
from qatcli.qat.estimators.fourier import FOURIER_C, Fourier
from qatcli.qat.estimators.jacobian import Jacobian
from qatcli.qat.estimators.ste import STE

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
