"""lvit: language-guided medical image segmentation (LViT, Li et al., IEEE TMI 2023)."""

import os as _os


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


def _openmp_wait_policy() -> None:
    """How torch's OpenMP threads wait between operations; must run before torch is first imported.

    Spinning briefly before sleeping is right on a machine of one's own; sleeping at once (PASSIVE) is right on
    a crowded one, where spinning threads steal the CPU the working ones need. `python bench/openmp_wait.py` on
    the 2-core reference machine: synth preset training step 604 ms spinning (GOMP_SPINCOUNT=100000, ~0.1 ms)
    vs 817 ms PASSIVE, tiny LViT step 100 vs 243 ms alone; four tiny steps at once on the 2 cores: 0.27-1.39 s
    each spinning vs 0.36-0.43 s PASSIVE. So: PASSIVE when other tasks already occupy half the cores or more,
    a bounded spin otherwise. Whatever the user set in the environment wins.
    """
    if "OMP_WAIT_POLICY" in _os.environ or "GOMP_SPINCOUNT" in _os.environ:
        return
    others = _other_runnable_tasks()
    if others is not None and others >= max(1, (_os.cpu_count() or 1) // 2):
        _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        _os.environ["GOMP_SPINCOUNT"] = "100000"


_openmp_wait_policy()

__version__ = "0.1.0"
