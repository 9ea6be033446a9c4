"""Peak resident memory of one call, in-process (Linux): reset the high-water mark through
/proc/self/clear_refs, run the call, read VmHWM. Inputs exist before the reset, so the figure is the
extra memory the call needed (its outputs included)."""
from __future__ import annotations

import gc


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_extra_bytes(fn) -> int | None:
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        out = fn()
        peak = _status("VmHWM")
        del out
        return max(0, peak - base)
    except (OSError, KeyError):
        return None
