"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported setting)."""
