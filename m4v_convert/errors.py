"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class M4VError(Exception):
    """A problem with the user's input (paths, checkpoints, recipes, flags)."""


class CheckpointError(M4VError):
    """Missing, corrupt or mismatched checkpoint."""


class RecipeError(M4VError):
    """Invalid or inconsistent recipe YAML."""
