"""On a GPU machine, the tests that only a CPU takes run too, so that one machine runs the whole suite.

Two files test paths a GPU never takes: the tiny float32 models of the kept q/k/v tests go through
the CPU flash kernels (cuDNN's take 16-bit only), and the launch counts are taken through Triton's
interpreter. Triton picks compiler or interpreter when a kernel is decorated, so they cannot share a
process with the GPU tests: here they run in a child pytest that sees no GPU.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CPU_ONLY = ["tests/kernels/test_kept_attention.py", "tests/kernels/test_launch_counts.py"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="without a GPU these files run in the suite itself")
def test_cpu_only_tests_pass_with_the_gpu_hidden():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "not gpu",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            *CPU_ONLY,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    # every CPU-path test ran: none skipped for want of a CPU-only machine
    assert passed and int(passed.group(1)) >= 5 and "skipped" not in summary, summary
