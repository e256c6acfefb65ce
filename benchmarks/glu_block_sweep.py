"""Memory bandwidth of the GLU kernels per launch configuration (GPU only).

The in-place GLU backward reads dh, gate, up and writes h, d_gate, d_up: 6 x tokens x intermediate
x 2 bytes.  This times it (and the forward) for a few block sizes and warp counts at the
Llama-3.2-1B MLP shape, so the launch configuration in sftop/kernels/glu.py is a measured choice.

  python benchmarks/glu_block_sweep.py --tokens 8192 --inter 8192
"""

from __future__ import annotations

import argparse
import json

import torch

from cuda_timing import mean_cuda_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import triton

    from sftop.kernels import glu

    n = args.tokens * args.inter
    g = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    u = torch.randn_like(g)
    dh = torch.randn_like(g)
    h = torch.empty_like(g)
    rows = []
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            if block // (32 * warps) < 1:
                continue
            grid = (triton.cdiv(n, block),)
            bwd = mean_cuda_ms(lambda: glu._glu_bwd_inplace[grid](dh, g, u, n, KIND=0, BLOCK=block, num_warps=warps))
            fwd = mean_cuda_ms(lambda: glu._glu_fwd[grid](g, u, h, n, KIND=0, BLOCK=block, num_warps=warps))
            rows.append(
                dict(
                    block=block,
                    warps=warps,
                    bwd_ms=round(bwd, 4),
                    bwd_tb_s=round(6 * n * 2 / bwd / 1e9, 2),
                    fwd_ms=round(fwd, 4),
                    fwd_tb_s=round(3 * n * 2 / fwd / 1e9, 2),
                )
            )
            print(rows[-1], flush=True)
    best = max(rows, key=lambda r: r["bwd_tb_s"])
    print("best backward:", best)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=args.tokens, inter=args.inter, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
