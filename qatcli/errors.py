"""The error type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class QatcliError(Exception):
    """A problem with the user's input or environment (not a bug): shown without a traceback."""
