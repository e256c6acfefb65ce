"""On a GPU, the allocator settings sftop gives its trainers are the ones torch runs with."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sftop.engine.allocator import allocator_env

PROBE = """
import json, torch
torch.zeros(1, device="cuda")
settings = torch.cuda.memory._snapshot().get("allocator_settings", {})
# freeing 64 MiB and asking for 128 MiB grows one expandable segment; fixed segments add a new one
a = torch.empty(64 << 20, dtype=torch.uint8, device="cuda"); del a
b = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
print(json.dumps({"expandable": settings.get("expandable_segments"), "reserved": torch.cuda.memory_reserved()}))
"""


def _probe(env):
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_trainer_environment_turns_on_expandable_segments():
    bare = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    default = _probe(bare)
    ours = _probe({**bare, **allocator_env(bare)})
    assert ours["expandable"] is True, ours
    assert default["expandable"] in (False, None), default
    # the behaviour, not just the flag: one grown segment holds less than two fixed ones
    assert ours["reserved"] < default["reserved"], (ours, default)
