"""lvit: language-guided medical image segmentation (LViT, Li et al., IEEE TMI 2023)."""

import os as _os



def _other_runnable_tasks() -> int | None:
    """Tasks running or waiting for a CPU right now, besides this one (Linux ``/proc/loadavg``; the minimum of
    three reads 10 ms apart, so a passing process does not count). None where unknown."""
    import time

    counts = []
    for i in range(3):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(running - 1)
        if i < 2:
            time.sleep(0.01)
    return max(0, min(counts))


def _openmp_wait_policy() -> None:
    """How torch's OpenMP threads wait between operations; must run before torch is first imported.

    Spinning briefly before sleeping is right on a machine of one's own: the synth preset's training step took
    0.63 s with a bounded spin (GOMP_SPINCOUNT=100000, ~0.1 ms) and 1.03 s with PASSIVE (sleep at once) on the
    quiet 2-core machine; a tiny LViT step 92 vs 194 ms. On a crowded machine spinning threads steal the CPU the
    working ones need: with four such processes on 2 cores the tiny step took 1.1-1.5 s spinning and 0.4 s
    PASSIVE (and 26 s vs 0.7 s at load ~10). So: PASSIVE when other tasks already occupy half the cores or more,
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
