"""OpenMP thread pools: one per thread that runs parallel work, and why a process wants only one.

ATen's CPU kernels and lmlab's own (`at::parallel_for`) run as OpenMP parallel regions, and a decode
step of a small model runs a few hundred short ones. Between regions, GNU OpenMP's (libgomp) workers
spin for a while before they sleep, so the next region starts at once; but it spins only while the
process has no more OpenMP threads than CPUs. Each thread that runs a parallel region keeps a pool
of its own (num_threads - 1 workers) for as long as it lives, so once a second thread (a server's
scheduler, a script's `Engine`) runs steps beside the main thread's idle pool, the process is over
that count and every region waits for its workers to wake: measured 2.5x slower compiled SmolLM2
steps from a second thread (`benchmarks/thread_steps.py`). Releasing the idle pool
(`omp_pause_resource_all`, OpenMP 5.0) brings them back to the main thread's speed.
"""

from __future__ import annotations

import ctypes
import functools

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what is cheap to keep


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (libgomp in Linux wheels; libomp or libiomp5 elsewhere), found
    among the process's mapped libraries; None where there is none or it is not found."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:  # not Linux
        return None
    for name in ("libgomp", "libomp", "libiomp5"):
        for path in sorted(paths):
            if path.rsplit("/", 1)[-1].startswith(name):
                try:
                    lib = ctypes.CDLL(path)  # already loaded: the same copy torch uses
                    lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
                    return lib
                except (OSError, AttributeError):
                    continue
    return None


def release_openmp_pool() -> bool:
    """Hand back the calling thread's OpenMP worker threads; its next parallel region starts them
    again. Call it in a thread that is done with parallel work while another thread runs steps (the
    `Engine.start()` caller). False where the runtime was not found or refused."""
    import torch  # noqa: F401 (loads the runtime: it must be mapped before it can be found)

    lib = _openmp_runtime()
    return lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
