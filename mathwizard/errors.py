"""Our exceptions: permanent ones stop a stage with one line saying what to do; transient ones are retried."""


class MathWizardError(Exception):
    """Base class; the CLI prints its message as one red line and exits with code 1."""


class ConfigError(MathWizardError):
    """A setting is invalid or missing (the message names the field and how to fix it)."""


class DataError(MathWizardError):
    """An input artifact is missing, empty or malformed (the message names the path)."""


class TeacherError(MathWizardError):
    """The teacher API refused the work (wrong key, unknown model) or too many items failed."""


class ModelError(MathWizardError):
    """A model cannot be loaded or trained as configured (missing path, no CUDA for Unsloth)."""


class PublishError(MathWizardError):
    """The Hub refused an upload or the publish gate rejected the model."""


class TransientError(MathWizardError):
    """A failure that a later attempt can fix: network, Hub or API 5xx, storage hiccups."""


class BatchPending(TransientError):
    """Teacher batches still run at the end of an attempt's wait; a re-run collects them (nothing is re-sent)."""


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying; our permanent errors and programming errors are not."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, MathWizardError):
        return False
    return isinstance(exc, ConnectionError | TimeoutError | OSError) and not isinstance(
        exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError
    )
