"""Exceptions that reach the user.  The CLI prints them without a traceback."""


class VistuneError(Exception):
    """A problem the user can fix: bad config, missing file, unusable plugin.

    ``hint`` says how to fix it; the CLI prints it on its own line.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(VistuneError):
    """The run configuration is invalid (names the file, line and field)."""


class PluginError(VistuneError):
    """A plugin failed to load or registered something invalid (names the plugin)."""


class RegistryError(VistuneError):
    """A name is unknown, or registered by two distributions."""


class DataError(VistuneError):
    """A dataset record is malformed (names the file and line)."""
