"""User-facing errors: one line that names the problem and the fix, never a traceback."""


class FeatcacheError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line."""


class FingerprintMismatch(FeatcacheError):
    """A cache exists at the target path but was built with other settings."""
