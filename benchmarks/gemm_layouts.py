"""GEMM time per step, by projection and by how the LoRA product joins the base product.

Answers, before any change to the LoRA Functions: which of the step's matmuls run below the
machine's rate, and whether another arrangement of the same arithmetic is faster:
  * `base then adapter` (today): out = x @ W^T, then out += s * (x A^T) @ B^T.  The second addmm is
    a rank-r GEMM that reads and writes the whole [tokens, out] output: memory-bound.
  * `adapter then base`: out = s * (x A^T) @ B^T written once (beta=0), then the base GEMM adds
    into it (beta=1), the read of `out` hidden in its epilogue.
  * fused projections: q/k/v as one [q+2kv, hidden] GEMM, gate/up as one [2 inter, hidden] GEMM,
    and their input gradients as one GEMM over the concatenated output gradients.
Counts are per training step with gradient checkpointing and lean recomputation (forward, the
recomputation without the down projection, backward).

  PYTHONPATH=$PWD python benchmarks/gemm_layouts.py --json out.json   # times sftop.kernels.lora_mlp.adapter_then_base itself
"""

from __future__ import annotations

import argparse
import json

import torch

from cuda_timing import mean_cuda_ms
from sftop.kernels import lora_mlp

SHAPES = {  # tokens per step, hidden, intermediate, q width, kv width, vocab, layers
    "llama-3.2-1b 4x2048": (8192, 2048, 8192, 2048, 512, 128256, 16),
    "llama-3.1-8b 2x2048": (4096, 4096, 14336, 4096, 1024, 128256, 32),
}
R = 16


def _rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02


def _repeated(fn, n):
    return lambda: [fn() for _ in range(n)]


def _variants(t, h, i, q, kv, vocab):
    """name -> (calls per layer-pass, flop of one call, {variant: fn})."""
    x, xa = _rand(t, h), _rand(t, R)
    wg, wu, wd = _rand(i, h), _rand(i, h), _rand(h, i)
    wgu = torch.cat([wg, wu])
    bg, bd = _rand(i, R), _rand(h, R)
    bgu = torch.zeros(2 * i, 2 * R, device="cuda", dtype=torch.bfloat16)
    bgu[:i, :R], bgu[i:, R:] = bg, bg
    xa2 = _rand(t, 2 * R)
    hmid, ha = _rand(t, i), _rand(t, R)
    de, dg, dgu = _rand(t, i), _rand(t, i), _rand(t, 2 * i)
    ag = _rand(R, h)
    agu = _rand(2 * R, h)
    wq, wk, wv, wo = _rand(q, h), _rand(kv, h), _rand(kv, h), _rand(h, q)
    wqkv = torch.cat([wq, wk, wv])
    bq, bk = _rand(q, R), _rand(kv, R)
    bqkv = _rand(q + 2 * kv, 2 * R)
    dq, dk, dv = _rand(t, q), _rand(t, kv), _rand(t, kv)
    d2 = _rand(t, h)
    a3 = _rand(3 * R, h)
    dcat3 = _rand(t, 3 * R)

    def base_then_adapter(inp, w, ia, b):
        out = inp @ w.t()
        out.addmm_(ia, b.t())
        return out

    def adapter_then_base(inp, w, ia, b):  # the shipped order, weights given [out, in] like base_then_adapter
        return lora_mlp.adapter_then_base(inp, w.t(), ia, b.t(), 1.0)

    def qkv_separate(order):
        return lambda: [order(x, w, xa, b) for w, b in ((wq, bq), (wk, bk), (wv, bk))]

    def summed(*products):
        """sum of m1 @ m2 over the pairs, one GEMM each, accumulated with addmm_ into the first."""
        (m1, m2), rest = products[0], products[1:]
        dx = m1 @ m2
        for m1, m2 in rest:
            dx.addmm_(m1, m2)
        return dx

    def qkv_dx_separate():
        return summed((dq, wq), (dk, wk), (dv, wv), (dcat3, a3))

    def qkv_dx_fused():
        return lora_mlp.adapter_then_base(torch.cat([dq, dk, dv], dim=1), wqkv, dcat3, a3, 1.0)

    def gu_dx_separate():
        return summed((de, wg), (xa, ag), (dg, wu), (xa, ag))

    def gu_dx_fused():
        return lora_mlp.adapter_then_base(dgu, wgu, xa2, agu, 1.0)

    down_a = _rand(R, i)

    def down_dh(adapter_first):
        def run():
            if adapter_first:
                dh = lora_mlp.adapter_then_base(d2, wd, ha, down_a, 1.0)
            else:
                dh = summed((d2, wd), (ha, down_a))
            return dh

        return run

    x_o = _rand(t, q)

    def lm_head(rows):
        xc, w = _rand(rows, h), _rand(vocab, h)
        return lambda: xc @ w.t()

    def lm_head_dx(rows):
        lg, w = _rand(rows, vocab), _rand(vocab, h)
        return lambda: lg @ w

    f = 2 * t * h  # flop per output column of a [t, h] x [h, n] product
    return {
        # forward and recomputation: 2 passes per layer
        "gate+up forward (2 passes)": (
            2,
            f * 2 * i,
            {
                "separate, base then adapter": lambda: [base_then_adapter(x, w, xa, bg) for w in (wg, wu)],
                "separate, adapter then base": lambda: [adapter_then_base(x, w, xa, bg) for w in (wg, wu)],
                "fused, adapter then base": lambda: adapter_then_base(x, wgu, xa2, bgu),
            },
        ),
        "down forward (1 pass)": (
            1,
            2 * t * i * h,
            {
                "base then adapter": lambda: base_then_adapter(hmid, wd, ha, bd),
                "adapter then base": lambda: adapter_then_base(hmid, wd, ha, bd),
            },
        ),
        "q/k/v forward (2 passes)": (
            2,
            f * (q + 2 * kv),
            {
                "separate, base then adapter": qkv_separate(base_then_adapter),
                "separate, adapter then base": qkv_separate(adapter_then_base),
                "fused, adapter then base": lambda: adapter_then_base(x, wqkv, xa2, bqkv),
            },
        ),
        "o forward (2 passes)": (
            2,
            2 * t * q * h,
            {
                "base then adapter": lambda: base_then_adapter(x_o, wo, xa, bd),
                "adapter then base": lambda: adapter_then_base(x_o, wo, xa, bd),
            },
        ),
        "gate+up input gradient": (1, f * 2 * i, {"separate": gu_dx_separate, "fused": gu_dx_fused}),
        "down input gradient": (
            1,
            2 * t * i * h,
            {
                "base then adapter": down_dh(False),
                "adapter then base": down_dh(True),
            },
        ),
        "q/k/v input gradient": (1, f * (q + 2 * kv), {"separate": qkv_dx_separate, "fused (with cat)": qkv_dx_fused}),
        "lm_head forward, all tokens": (
            0,
            2 * t * h * vocab,
            {f"{rows}-row chunks": _repeated(lm_head(rows), t // rows) for rows in (1024, 2048, 4096)},
        ),
        "lm_head input gradient, all tokens": (
            0,
            2 * t * h * vocab,
            {f"{rows}-row chunks": _repeated(lm_head_dx(rows), t // rows) for rows in (1024, 2048, 4096)},
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {}
    for name, (t, h, i, q, kv, vocab, layers) in SHAPES.items():
        rows = {}
        for op, (per_layer, flop, variants) in _variants(t, h, i, q, kv, vocab).items():
            row = {}
            for label, fn in variants.items():
                ms = mean_cuda_ms(fn, iters=10, warmup=2)
                row[label] = {
                    "ms": round(ms, 3),
                    "tflops": round(flop / ms / 1e9, 1),
                    "ms_per_step": round(ms * per_layer * layers, 2) if per_layer else None,
                }
            rows[op] = row
            print(
                name,
                "|",
                op,
                "|",
                "; ".join(f"{k}: {v['ms']} ms {v['tflops']} TF/s" for k, v in row.items()),
                flush=True,
            )
        results[name] = rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, fh, indent=1
            )


if __name__ == "__main__":
    main()
