"""The one exception type for mistakes the user can fix (exit code 2 in the CLI)."""


class UserError(Exception):
    """Bad argument, missing or corrupt data or checkpoint: shown as one line, exit code 2."""


class DataError(UserError):
    """A data file is missing, truncated, corrupt or not what it claims to be."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or for another architecture."""


def check(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds; for validating values where they enter."""
    if not condition:
        raise UserError(message)
