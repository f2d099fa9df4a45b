import os
import subprocess
import sys

import pytest
import torch

from capsnet.errors import CapsNetError
from capsnet.runtime import resolve_device, resolve_precision

CHURN = """
import resource, sys, torch
from capsnet.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def churn():  # like a training step: several 20 MB tensors alive at once, then all freed
    blocks = [torch.ones(5_000_000) for _ in range(4)]
    del blocks
for _ in range(3):
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keeping_freed_memory_avoids_page_faults():
    # glibc's default policy, pinned: without the pin its threshold adapts to the process's
    # history and the baseline would sometimes happen to keep the blocks too.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True,
                             env=env)
        return int(out.stdout.strip())

    default, kept = faults("default"), faults("keep")
    assert default > 10 * 4000  # freed blocks come back as fresh pages (~4,900 per 20 MB block)
    assert kept < default / 10


def test_precision_auto_and_explicit():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(CapsNetError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", cpu)


def test_device_spellings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None, gpu=-1) == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(CapsNetError, match="unknown device"):
        resolve_device("not-a-device")
