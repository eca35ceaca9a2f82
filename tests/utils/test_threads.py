"""Handing back a thread's idle OpenMP workers: they leave, the next parallel region starts them again,
and `Engine.start()` does it in its caller's thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


CHILD = """
import os, time, torch
from lmlab.utils import threads
torch.set_num_threads(2)  # a pool of one worker, whatever the test process runs with
tasks = lambda: len(os.listdir("/proc/self/task"))
x = torch.randn(1 << 22)
want = float(x.sum())  # a parallel reduction: this thread's pool exists from here on
before = tasks()
released = threads.release_openmp_pool()
deadline = time.monotonic() + 5
while tasks() > before - (torch.get_num_threads() - 1) and time.monotonic() < deadline:
    time.sleep(0.01)  # (the workers exit on their own after the release returns)
after = tasks()
again = float(x.sum()) == want  # parallel work runs as before, on a new pool
print(released, torch.get_num_threads(), before, after, tasks(), again)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_released_workers_leave_and_come_back_on_the_next_parallel_region():
    """In a fresh process (no other thread comes or goes): the pool's num_threads - 1 workers exit, and
    the next parallel region starts as many again, with the same result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True).stdout
    released, n, before, after, again, same = out.split()
    assert released == "True" and same == "True"
    assert int(after) == int(before) - (int(n) - 1) and int(again) == int(before)


def test_the_engine_releases_its_callers_pool_before_its_scheduler_starts(monkeypatch):
    from lmlab.serve import engine as engine_module

    calls: list[threading.Thread] = []
    monkeypatch.setattr(engine_module, "release_openmp_pool", lambda: calls.append(threading.current_thread()))

    class Thread:  # the scheduler thread, not started for real
        def start(self):
            calls.append("scheduler started")

    eng = engine_module.Engine.__new__(engine_module.Engine)
    eng._thread = Thread()
    assert eng.start() is eng
    assert calls == [threading.current_thread(), "scheduler started"]
