"""The one error type ops shows as a single line (exit 2) instead of a traceback."""


class OpsError(ValueError):
    """A problem the user can fix: bad input, a refused action. Always one readable line."""
