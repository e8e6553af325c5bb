"""The one exception root the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported setting).

    Subclasses (config, data, service settings, run directory) add detail lines, printed before the
    one-line summary; nothing that derives from this is ever retried or shown as a traceback."""

    def details(self) -> list[str]:
        return []


class ServiceUnavailable(UserError):
    """Too many of a stage's service calls failed (after their retries): the stage is recorded failed,
    not done, so a rerun retries exactly the calls that failed (the others come from the cache)."""
