"""How torch's OpenMP threads wait between operations, chosen before torch is first imported.

The ``lvit`` command calls :func:`apply_wait_policy` before it imports anything that loads torch; library users
who want the same choice call it themselves before importing torch (importing lvit changes nothing).
"""

from __future__ import annotations

import os


def _other_runnable_tasks() -> int | None:
    """Tasks running or waiting for a CPU right now, besides this one (Linux ``/proc/loadavg``; the minimum of
    up to three reads 10 ms apart, so a passing process does not count; a quiet first read ends it, so the
    usual import pays no wait). None where unknown."""
    import time

    fewest = None
    for i in range(3):
        if i:
            time.sleep(0.01)
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        fewest = running - 1 if fewest is None else min(fewest, running - 1)
        if fewest <= 0:
            break
    return max(0, fewest)


def apply_wait_policy() -> None:
    """Set how OpenMP threads wait, unless the user already did: spin briefly before sleeping on a machine of
    one's own (each operation then starts without a thread wake-up), sleep at once (PASSIVE) when other tasks
    already occupy half the cores or more (spinning threads would steal the CPU the working ones need).
    Measurements: docs/TRAINING.md, "CPU threads and OpenMP waiting"."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    others = _other_runnable_tasks()
    if others is not None and others >= max(1, (os.cpu_count() or 1) // 2):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ["GOMP_SPINCOUNT"] = "100000"
