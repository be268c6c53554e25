"""User-facing errors: one line that names the problem and the fix, never a traceback."""


class FeatcacheError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line."""


class FingerprintMismatch(FeatcacheError):
    """A cache exists at the target path but was built with other settings."""


class FeatcacheWarning(UserWarning):
    """Something the user asked for that featcache does differently than the words say
    (an option that does not apply, fewer samples than asked); the CLI prints it as one
    yellow line, Python shows it as a warning."""


def warn(message: str) -> None:
    import warnings

    warnings.warn(message, FeatcacheWarning, stacklevel=3)
