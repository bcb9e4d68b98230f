"""keep_freed_memory: a freed large block is reused instead of being mapped (and faulted in) again."""

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the fast tier (pytest -m 'not slow') leaves this file out

# A forward's pattern: a few large activations allocated, touched and freed, again and again. Count
# the page faults of five such rounds after a first one.
PROBE = """
import json, resource, sys
import torch
from m4oe.memory import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def forward():
    blocks = [torch.empty(n << 20, dtype=torch.uint8) for n in (48, 24, 12)]
    for block in blocks:
        block.fill_(1)
    del blocks
forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    forward()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_freed_block_is_reused_without_page_faults():
    kept = probe("keep")
    if platform.libc_ver()[0] != "glibc":  # macOS, musl: the setting does not exist, nothing is changed
        assert kept["applied"] is False
        return
    pages = 5 * (84 << 20) // 4096
    default = probe("default")["faults"]
    assert default > pages // 2  # the reference: glibc unmapped the blocks and faults them in again
    assert kept["applied"] is True
    # Not zero: a freed block is reused only where a request fits in it after alignment padding (seen:
    # 70-83k faults by default, 12-22k kept).
    assert kept["faults"] < default // 2
