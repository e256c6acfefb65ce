import os

# Triton chooses between its compiler and its CPU interpreter when a kernel is decorated, so the
# choice must be made before any test module imports a kernel. Without a CUDA GPU (CI), the
# interpreter is the only way the kernels run at all.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # noqa: BLE001 - a broken CUDA setup: test as on a CPU
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
