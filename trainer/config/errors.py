"""The one error type of a user's configuration mistake."""


class ConfigError(ValueError):
    """A user configuration mistake; its message is a single line naming the key and the fix."""
