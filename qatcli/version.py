"""The version of qatcli, in one place: the package, the exports and --version read it."""

__version__ = "0.1.0"
