"""The error types the CLI shows as one line, without a traceback, and the exit status of each."""

INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


class QatcliError(Exception):
    """A problem with the user's input or environment (not a bug): exit status 2."""

    exit_code = 2


class TrainingDiverged(QatcliError):
    """Training met a loss or gradient that is not finite and stopped, its last good state kept: exit status 1."""

    exit_code = 1


class Interrupted(QatcliError):
    """Ctrl-C (SIGINT) ended the command; the message says what was kept: exit status 130, the shell's."""

    exit_code = INTERRUPTED
