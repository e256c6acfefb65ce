import sys
from pathlib import Path

# The fake NVML backend lives with the GPU tests; the planner tests build GPU readings with it too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "gpu"))
