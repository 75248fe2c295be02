"""The console entry point: a Ctrl-C while the heavy libraries load is an interruption like any other."""

from __future__ import annotations

import sys

INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


def run() -> None:
    try:
        from qatcli.cli import main

        status = main()
    except KeyboardInterrupt:
        print("qatcli: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    sys.exit(status)
