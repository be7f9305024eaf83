"""The error every user mistake becomes (the CLI prints it as one line and exits with code 2)."""


class ConfigError(ValueError):
    """A mistake in the user's configuration (reported as one line, exit code 2)."""
