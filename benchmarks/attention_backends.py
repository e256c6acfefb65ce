"""Causal SDPA forward + backward time per backend, at the attention shapes of the step benchmark.

Answers one question before any attention work: which of torch's SDPA backends is fastest here,
and which one transformers' SDPA path (GQA through enable_gqa, no mask, is_causal) gets by default.

  python benchmarks/attention_backends.py --json out.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_timing import mean_cuda_ms

SHAPES = {  # batch, query heads, kv heads, tokens, head dim
    "llama-3.2-1b 4x2048": (4, 32, 8, 2048, 64),
    "llama-3.1-8b 2x2048": (2, 32, 8, 2048, 128),
}
BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {}
    for name, (b, h, hkv, t, d) in SHAPES.items():
        q = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
        flops = 4 * b * h * t * t * d / 2 * 3.5  # causal: forward 1x, backward 2.5x
        row: dict[str, dict[str, Any]] = {}
        for label, backend in BACKENDS.items():
            for gqa in (True, False):
                kk, vv = (k, v) if gqa else (k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1))

                def step():
                    out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                    torch.autograd.grad(out, (q, k, v), dout)

                key = f"{label}{'' if gqa else ' (kv expanded)'}"
                try:
                    if backend is None:
                        ms = mean_cuda_ms(step, warmup=3)
                    else:
                        with sdpa_kernel([backend]):
                            ms = mean_cuda_ms(step, warmup=3)
                    row[key] = {"ms_fwd_bwd": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}
                except RuntimeError as exc:
                    row[key] = {"error": str(exc).splitlines()[0][:160]}
                print(f"{name:22s} {key:28s} {row[key]}", flush=True)
        results[name] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
