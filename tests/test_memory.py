"""keep_freed_memory: a freed large block is reused instead of being mapped (and faulted in) again."""

import json
import platform
import subprocess
import sys

# Allocate a 64 MiB tensor (as a forward's activations are), touch it, free it; then count the page
# faults of doing it a second time.
PROBE = """
import json, resource, sys
import torch
from m4oe.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def touch():
    block = torch.empty(64 << 20, dtype=torch.uint8)
    block.fill_(1)
    del block
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
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
    pages = (64 << 20) // 4096
    assert probe("default")["faults"] > pages // 2  # the reference: glibc unmapped the block and faults it in again
    assert kept["applied"] is True
    assert kept["faults"] < pages // 20
