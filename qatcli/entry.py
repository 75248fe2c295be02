"""The console entry point: a Ctrl-C while the heavy libraries load is an interruption like any other."""

from __future__ import annotations

import os
import sys

INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


def run() -> None:
    try:
        from qatcli.cli import main

        status = main()
    except KeyboardInterrupt:
        print("qatcli: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # at once: libraries interrupted halfway through their import can turn a normal exit into SIGINT's
        os._exit(INTERRUPTED)
    sys.exit(status)
