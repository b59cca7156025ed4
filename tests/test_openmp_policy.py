"""The lvit command picks how OpenMP threads wait (bounded spin alone, PASSIVE on a crowded machine) before torch
loads; importing lvit changes nothing."""

from __future__ import annotations

import os

from lvit.core import openmp


def _decide(monkeypatch, others, env=None):
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(openmp, "_other_runnable_tasks", lambda: others)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    openmp.apply_wait_policy()
    return os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")


def test_quiet_machine_spins_briefly(monkeypatch):
    assert _decide(monkeypatch, 0) == (None, "100000")
    assert _decide(monkeypatch, None) == (None, "100000")  # unknown load: the quiet-machine choice


def test_busy_machine_sleeps_at_once(monkeypatch):
    assert _decide(monkeypatch, 1) == ("PASSIVE", None)  # one other busy task occupies half of 2 cores
    assert _decide(monkeypatch, 5) == ("PASSIVE", None)


def test_the_users_setting_wins(monkeypatch):
    assert _decide(monkeypatch, 5, {"OMP_WAIT_POLICY": "ACTIVE"}) == ("ACTIVE", None)
    assert _decide(monkeypatch, 0, {"GOMP_SPINCOUNT": "0"}) == (None, "0")


def test_runnable_task_count_reads_proc():
    others = openmp._other_runnable_tasks()
    assert others is None or others >= 0


def test_importing_lvit_sets_nothing():
    import subprocess
    import sys

    code = ("import os; before = dict(os.environ); import lvit, lvit.data, lvit.models, lvit.train; "
            "print(sorted(k for k in os.environ if os.environ.get(k) != before.get(k)))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
