"""One small exception family. The CLI maps every `QloraKitError` to exit code 2 with its message and no
traceback; anything else is a bug (exit 1).

A message says what went wrong, why, and how to fix it (docs/ARCHITECTURE.md, "Errors")."""


class QloraKitError(Exception):
    """Bad input or usage: the user can fix it. Exit code 2."""


class ConfigError(QloraKitError):
    """The recipe or a `--set` override is wrong."""


class DataError(QloraKitError):
    """The data file is missing, empty or malformed."""


class ModelError(QloraKitError):
    """The model folder is missing, incomplete, corrupt or not a causal LM."""


class ExportError(QloraKitError):
    """An export cannot be done as asked (adapter does not fit the base, output exists, disk full)."""


class TrainingStopped(QloraKitError):
    """Training stopped on purpose (a non-finite loss); the message names the step and the last checkpoint."""


class TrainingInterrupted(QloraKitError):
    """Ctrl-C / SIGTERM: a checkpoint was written; the message says how to resume. Exit code 130."""

    exit_code = 130


class RankLost(QloraKitError):
    """Another process of a multi-process run died or stopped answering; the message names it. Exit code 1: not
    the user's input, but not a bug in this rank either (no traceback)."""

    exit_code = 1
