"""glibc keeps freed memory after keep_freed_memory(): re-allocating it faults no pages back in."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# 50 x 8 MB allocated, freed, and allocated again: the second round's page faults
CODE = """
import resource, sys, torch
from lmlab.utils.malloc import keep_freed_memory
print(keep_freed_memory())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    start = faults()
    blocks = [torch.ones(2 << 20) for _ in range(50)]
    del blocks
print(faults() - start)
"""


def _second_round_faults(tune: bool) -> tuple[str, int]:
    env = {**os.environ, "LMLAB_TUNE_MALLOC": "1" if tune else "0"}
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


def test_freed_blocks_are_reused_without_page_faults():
    applied, tuned = _second_round_faults(True)
    assert applied == "True"
    default_applied, default = _second_round_faults(False)
    assert default_applied == "False"
    # 400 MB is 100k pages: glibc by default returns and re-faults nearly all of them
    assert default > 50_000
    assert tuned < default / 4


def test_a_trim_threshold_beyond_a_c_int_is_refused():
    from lmlab.utils.malloc import keep_freed_memory

    with pytest.raises(ValueError, match="trim"):
        keep_freed_memory(trim=4 << 30)
