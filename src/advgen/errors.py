"""The exception types for mistakes the user can fix (exit code 2 in the CLI)."""


class UserError(Exception):
    """Bad argument, missing or corrupt data or checkpoint: shown as one line, exit code 2."""


class ConfigError(UserError):
    """A configuration value is out of range. `field` is its path in the config ("attack.eps"), so a
    front end can name its own spelling of it (the CLI: --attack-eps)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


class DataError(UserError):
    """A data file is missing, truncated, corrupt or not what it claims to be."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or for another architecture."""


class RunDirError(UserError):
    """--out names a folder that already holds a run (and neither --resume nor --force was given)."""


class TrainingDiverged(UserError):
    """The loss or the weights became non-finite; the run stopped and the last good state was kept."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped a run; `saved` says whether the state of the last step was written.

    Not a UserError: the CLI exits with 128 + signum (130 for SIGINT, 143 for SIGTERM). A BaseException,
    as KeyboardInterrupt is, so that no `except Exception` on the way (a fallback around BatchNorm
    folding, a loader's error translation) swallows a stop.
    """

    def __init__(self, signum: int, message: str, saved: bool = False):
        super().__init__(message)
        self.signum, self.saved = signum, saved


def check(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds; for validating values where they enter."""
    if not condition:
        raise UserError(message)


def check_field(condition: bool, field: str, problem: str) -> None:
    """Raise ConfigError(field, problem) unless condition holds."""
    if not condition:
        raise ConfigError(field, problem)


class WorkersFailed(Exception):
    """Jobs of a parallel command failed (parallel.run_jobs); the others ran to the end and their
    results are kept. `failures`: one line per failed job, naming it, why and its log; `done`: how
    many jobs finished. Not a UserError: a job may have failed for any reason (its log says); the CLI
    shows the lines and exits with 1."""

    def __init__(self, failures: list[str], done: int):
        super().__init__(f"{len(failures)} job(s) failed, {done} finished: " + "; ".join(failures))
        self.failures, self.done = failures, done
