"""Backward-pass estimators for rounding in QAT: ste, fourier (StableQAT) and jacobian (after JacQuant)."""

from qatcli.qat.estimators.base import (
    ESTIMATORS,
    Calibrate,
    Estimator,
    LayerEstimator,
    LayerGrid,
    check_estimator,
    make_estimator,
    register,
)
from qatcli.qat.estimators.fourier import FOURIER_C, Fourier, fourier_factor
from qatcli.qat.estimators.jacobian import Jacobian
from qatcli.qat.estimators.ste import STE

__all__ = [
    "ESTIMATORS",
    "FOURIER_C",
    "STE",
    "Calibrate",
    "Estimator",
    "Fourier",
    "Jacobian",
    "LayerEstimator",
    "LayerGrid",
    "check_estimator",
    "fourier_factor",
    "make_estimator",
    "register",
]
