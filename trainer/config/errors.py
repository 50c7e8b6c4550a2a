"""The one error type of a user's configuration mistake, and the checks every config uses."""
import math

# The longest any timeout or wait may be. Every one of them becomes a deadline or a torch
# `timedelta` (TCPStore, gloo), where inf or 1e30 does not wait forever but crashes at start; a job
# that should wait longer than a day for a worker is better suspended (exit 75) and resumed.
MAX_SECONDS = 86400.0


class ConfigError(ValueError):
    """A user configuration mistake; its message is a single line naming the key and the fix."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def choice(key: str, value: str, choices) -> None:
    check(value in choices, f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def seconds(key: str, value, allow_zero: bool = False) -> None:
    """A duration in seconds: a finite number in (0, MAX_SECONDS] ([0, ...] with `allow_zero`)."""
    low = "0" if allow_zero else "> 0"
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    check(ok and value <= MAX_SECONDS, f"{key}={value} must be a finite number of seconds, {low} and at most "
                                       f"{MAX_SECONDS:.0f} (one day)")
