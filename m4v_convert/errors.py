"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class M4VError(Exception):
    """A problem with the user's input (paths, checkpoints, recipes, flags)."""


class CheckpointError(M4VError):
    """Missing, corrupt or mismatched checkpoint."""


class RecipeError(M4VError):
    """Invalid or inconsistent recipe YAML."""


def error_reason(e: BaseException) -> str:
    """An OS or library error in a few words (``No space left on device``), for a one-line message."""
    text = getattr(e, "strerror", None) or next(iter(str(e).strip().splitlines()), "")
    return text or type(e).__name__


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, turned into one by the CLI) during a job, with what was kept and how to
    go on; still a ``KeyboardInterrupt``, so every cleanup on the way out runs."""

