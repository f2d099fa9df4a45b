import os
import subprocess
import sys

import pytest
import torch

from capsnet.errors import CapsNetError
from capsnet.runtime import cpu_model, describe, resolve_device, resolve_precision

CHURN = """
import resource, sys, torch
from capsnet.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
size = int(sys.argv[2])
def churn():  # like a training step: several large tensors alive at once, then all freed
    blocks = [torch.ones(size) for _ in range(4)]
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

    def faults(mode, size):
        out = subprocess.run([sys.executable, "-c", CHURN, mode, str(size)], capture_output=True, text=True,
                             check=True, env=env)
        return int(out.stdout.strip())

    # 20 MB blocks, and 48 MB ones: above the largest mmap threshold glibc accepts (32 MB)
    for size in (5_000_000, 12_000_000):
        default, kept = faults("default", size), faults("keep", size)
        assert default > 10 * 4000 * size / 5_000_000  # freed blocks come back as fresh pages (~4,900 per 20 MB)
        assert kept < default / 10, (size, default, kept)


def test_precision_auto_and_explicit():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    assert resolve_precision("tf32", cpu) == "fp32"  # a GPU's matmul mode: a CPU runs (and reports) float32
    with pytest.raises(CapsNetError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", cpu)


def test_device_spellings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None, gpu=-1) == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(CapsNetError, match="unknown device"):
        resolve_device("not-a-device")


def test_the_cpu_model_names_the_machine_in_the_logs():
    intel = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n" \
            "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu\n"
    assert cpu_model(intel) == "Intel(R) Xeon(R) Processor, AMX"  # the first CPU's line
    assert cpu_model("model name\t: AMD EPYC 9B14\nflags\t\t: fpu avx512_bf16\n") == "AMD EPYC 9B14"
    assert cpu_model("flags\t\t: fpu\n") is None and cpu_model("") is None
    name = describe(torch.device("cpu"))
    assert name.startswith(f"cpu ({torch.get_num_threads()} threads, ")
    model = cpu_model()
    assert name.endswith(f"; {model})" if model else " cores)")
