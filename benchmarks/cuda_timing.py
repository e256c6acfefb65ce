"""Mean CUDA time of a callable, measured with events (shared by the micro-benchmarks here)."""

import torch


def mean_cuda_ms(fn, iters: int = 20, warmup: int = 1) -> float:
    """Milliseconds per call of `fn` over `iters` calls, after `warmup` untimed ones (compiles,
    workspace allocation)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
