"""How the CLI fails: a problem the user can fix is one line on stderr and exit status 2, never a traceback."""

EXIT_USAGE = 2


class CliError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""
