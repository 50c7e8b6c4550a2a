"""The one error type of a user's configuration mistake, and the two checks every config uses."""


class ConfigError(ValueError):
    """A user configuration mistake; its message is a single line naming the key and the fix."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def choice(key: str, value: str, choices) -> None:
    check(value in choices, f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")
