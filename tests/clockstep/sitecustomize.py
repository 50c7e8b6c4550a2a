"""Test helper, on PYTHONPATH only in tests: every process's wall clock (`time.time`) is stepped by
the number of seconds written to the file named by KINTSUGI_TEST_CLOCK_OFFSET, as an NTP step or a VM
resume does. The monotonic clock is left alone, as the kernel leaves it."""
import os
import time

_PATH = os.environ.get("KINTSUGI_TEST_CLOCK_OFFSET")
if _PATH:
    _real = time.time
    _cache = [0.0, -1.0]  # offset, when it was read (real time)

    def _stepped() -> float:
        now = _real()
        if now - _cache[1] > 0.05:
            try:
                with open(_PATH) as f:
                    _cache[0] = float(f.read().strip() or 0.0)
            except (OSError, ValueError):
                pass
            _cache[1] = now
        return now + _cache[0]

    time.time = _stepped
