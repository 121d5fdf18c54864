"""The one base class of semiscale's own input errors."""


class InputError(ValueError):
    """Bad input (a config value, a file, a dataset, a run dir, a checkpoint) found by semiscale's own
    checks: the stage scripts print it as one line and exit with status 2. Any other exception is a bug
    and keeps its traceback."""
