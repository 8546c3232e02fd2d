"""Errors that end a command with one plain line instead of a traceback."""


class CliError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""
