"""Scratch buffers that ops reuse for an intermediate they write and the next op reads at once (the
NF4 dequantisation: nf4.py), and the one switch a CUDA graph capture needs on all of them.

A captured graph bakes in the addresses its kernels write to, so from the first capture on an
outgrown buffer must stay allocated.  The capture (cuda_graphs.py) calls `freeze_all` and needs to
know nothing about which ops hold scratch buffers.
"""

from __future__ import annotations

import weakref

import torch

_ALL: weakref.WeakSet = weakref.WeakSet()  # every ScratchBuffers made, for freeze_all


def freeze_all() -> None:
    """A CUDA graph is about to be captured: no scratch buffer may be freed from now on."""
    for buffers in list(_ALL):
        buffers.freeze()


class ScratchBuffers:
    """One flat buffer per (device, dtype), grown to the largest request and then reused.

    Growing replaces the buffer; the old one returns to torch's caching allocator, which keeps it
    until work already queued on its stream is done, so a pending GEMM never reads freed memory.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # buffers that a captured CUDA graph writes into: never freed once frozen
        self._frozen = False
        self._kept: list[torch.Tensor] = []
        _ALL.add(self)

    def get(self, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
        key = (torch.device(device), dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            old = self._buffers.pop(key, None)  # free the old one before allocating the larger one
            if old is not None and self._frozen:
                self._kept.append(old)
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel]

    def freeze(self) -> None:
        """From now on a buffer that is outgrown is kept, not freed (`freeze_all`)."""
        self._frozen = True

    def nbytes(self) -> int:
        """Bytes of the buffers in use (one per device and dtype)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def kept_nbytes(self) -> int:
        """Bytes of outgrown buffers kept alive because a graph may still write into them."""
        return sum(b.numel() * b.element_size() for b in self._kept)

    def clear(self) -> None:
        if self._frozen:
            return  # a captured graph may still write into them
        self._buffers.clear()
