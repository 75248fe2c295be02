"""The console entry point: a Ctrl-C while the heavy libraries load is an interruption like any other."""

from __future__ import annotations

import os
import signal
import sys

from qatcli.errors import INTERRUPTED


def _exit_interrupted(*_: object) -> None:
    print("qatcli: interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # at once: libraries interrupted halfway through their import can turn a normal exit into SIGINT's
    os._exit(INTERRUPTED)


def _load_libraries() -> None:
    """Import torch and transformers with Ctrl-C ending the process at once. A KeyboardInterrupt raised inside
    their import can surface in a pybind11 extension's initialisation, where C++ turns it into an abort."""
    listening = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # a background job stays deaf to Ctrl-C
    if listening:
        signal.signal(signal.SIGINT, _exit_interrupted)
    import transformers  # noqa: F401  (loads torch too)

    if listening:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run() -> None:
    from qatcli.cli import answers_without_libraries, main

    if not answers_without_libraries(sys.argv[1:]):
        _load_libraries()
    try:
        status = main()
    except KeyboardInterrupt:
        _exit_interrupted()
    sys.exit(status)
