"""Sizes and rules the kernels use that the planner must predict, in one torch-free module.

The kernels import these and so does `sftop.engine.planner`, which must size a run without
importing torch or triton (`sftop plan` on a laptop); one definition means the two cannot drift.
"""

from __future__ import annotations

from .env import env_choice

# One chunk's logits in the fused linear+cross-entropy (overwritten in place by their gradient)
# stay under this many bytes.  The loss is the step's memory peak when checkpointing is on
# (docs/benchmarks.md, 2026-12-02): at 256 MiB the matmuls still have 1024+ rows for a 128K vocabulary.
FUSED_CE_CHUNK_BYTES = 256 * 1024 * 1024
# The smaller chunk a plan takes where the default one leaves no room for CUDA graphs' pool (a tight
# GPU or memory cap): 256 rows for a 128K vocabulary in bf16, still a GEMM the tensor cores fill, and
# 192 MiB less at the loss's peak, which the pool would otherwise hold a second time.
SMALL_FUSED_CE_CHUNK_BYTES = 64 * 1024 * 1024
# The chunk of DPO's log-prob head inside its CUDA graphs (logprob_graphs.py).  A replayed graph
# launches its chunks at no host cost, so the default chunk's one reason (fewer launches) is gone,
# while its cost stays: the graphs' shared pool keeps the largest contiguous block any capture asked
# for, and the reference forward, captured into the blocks the policy step left free, finds the
# 256 MiB chunk's block split by its layers' smaller requests and needs another one beside it.
GRAPH_LOGPROB_CHUNK_BYTES = SMALL_FUSED_CE_CHUNK_BYTES

# DPO's CUDA graphs pad each batch length up to a multiple of this on the GPU (logprob_graphs.py):
# tensor-core friendly, and few enough shapes that they repeat; the planner sizes the graphs' memory
# pool at the padded length
DPO_GRAPH_LENGTH_MULTIPLE = 256

# Packed micro-batches are captured once per token-length bucket, at most this many per model
# (packed_graphs.py): the data's buckets are cut to this many (engine/train/buckets.py)
MAX_BUCKET_GRAPHS = 8

# Turns sftop's CUDA graphs (SFT and DPO steps) off when set to 0 (docs/configuration.md)
CUDA_GRAPHS_ENV = "SFTOP_CUDA_GRAPHS"
# a Qwen2.5-VL model's tower and language graphs (patching/vision_graphs.py, language_graphs.py):
# on unless set to 0
VISION_GRAPHS_ENV = "SFTOP_VISION_GRAPHS"
# their one shared memory pool (nested_graphs.py): on unless set to 0, which keeps a pool per stack
SHARED_GRAPH_POOL_ENV = "SFTOP_SHARED_GRAPH_POOL"

# dh ([tokens, intermediate]) is the one intermediate-sized buffer the one-Function LoRA MLP's
# backward allocates next to the saved gate and up.  Above this size it is computed in token chunks,
# which takes most of it off the layer's backward peak (84 of 112 MiB at Llama-3.1-8B, 2 x 2048
# tokens: the peak of a checkpointed step).  Each chunk's GEMM still has at least a thousand rows.
MLP_DH_CHUNK_BYTES = 32 << 20
# Under checkpointing the LoRA MLP saves neither gate nor up for backward (the two largest tensors a
# layer saves, [tokens, intermediate] each): its first run computes the layer a token chunk at a
# time, and backward rebuilds gate and up a chunk at a time, so the layer's forward and backward
# peaks hold three chunk buffers of at most this size instead of two or three whole
# intermediate-sized tensors.  The recomputation, whose gate and up GEMMs this moves into backward,
# then computes no GEMM of the MLP at all: the same FLOPs.  Chunks keep at least 128 rows.
MLP_REGATE_CHUNK_BYTES = 16 << 20
# Off unless set to 1: on Qwen2.5-VL-3B NF4 it took 0.035 GiB off the step's peak at 13 % of its
# speed on an H100 (docs/benchmarks.md, 2026-12-07); it launches more, smaller GEMMs.
CHUNKED_MLP_ENV = "SFTOP_CHUNKED_MLP"


def dh_chunk_rows(n_tok: int, width: int, elem: int, chunk_bytes: int = MLP_DH_CHUNK_BYTES) -> int:
    """Rows per dh chunk: equal chunks of at most `chunk_bytes`, in whole 128-row GEMM tiles where
    the batch is that large."""
    chunks = -(-n_tok * width * elem // chunk_bytes)
    if chunks <= 1:
        return n_tok
    rows = -(-n_tok // chunks)
    return min(n_tok, -(-rows // 128) * 128) if rows > 128 else rows


# Keeping the attention's q, k and v too (recompute.KeptProjections) spares the recomputation the
# q/k/v projections and RoPE, but moves q + 2 kv more values per token to host memory during the
# forward, where the copies must hide under the layer's compute.  An H200's host link moved a
# 32 MiB layer input in 0.6 ms (55 GB/s) while its GEMMs ran at about 700 TFLOP/s, about 12,700
# FLOP per byte (docs/benchmarks.md).  Layers whose forward FLOPs per kept byte (input, q, k, v,
# attention output) fall below this would wait on their copies: Llama-3.1-8B has 15,200,
# Llama-3.2-1B 8,500.
MIN_FLOP_PER_KEPT_BYTE = 12_000
KEEP_PROJECTIONS_ENV = "SFTOP_KEEP_PROJECTIONS"  # off: never keep q/k/v, on: always (where the path applies)


def projections_worth_keeping(hidden: int, intermediate: int, q_dim: int, kv_dim: int, elem: int = 2) -> bool:
    """Whether a decoder layer of this shape (gated MLP) has the compute to hide keeping q/k/v."""
    forced = env_choice(KEEP_PROJECTIONS_ENV)
    if forced is not None:
        return forced
    flops = 2 * (hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * intermediate)
    kept_bytes = elem * (hidden + 2 * q_dim + 2 * kv_dim)
    return flops >= MIN_FLOP_PER_KEPT_BYTE * kept_bytes
