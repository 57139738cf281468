"""The one error type ops shows as a single line (exit 2) instead of a traceback."""


class OpsError(ValueError):
    """A problem the user can fix: bad input, a refused action. Always one readable line."""


class PermanentError(OpsError):
    """A remote service refused for good (a GitHub 4xx: bad token, no access, invalid request):
    retrying the same request cannot help; the line says what to fix."""
