"""4-bit base weights through bitsandbytes' own kernels into a reused scratch buffer (sftop/kernels/nf4.py).

On the GPU the direct path must give bitsandbytes' `dequantize_4bit` bit for bit, for NF4 and FP4,
with and without double quantisation, in every compute dtype, for sizes that are not multiples of
the block size.  On the CPU the bitsandbytes API path is taken, and must equal it too.
"""

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from sftop.kernels import nf4  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _quantised(rows, cols, quant_type="nf4", nested=True, blocksize=64, device="cpu", seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    dense = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype).to(device)  # the weight's own dtype
    packed, qs = bnbf.quantize_4bit(dense, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    packed.quant_state = qs  # what bitsandbytes' Params4bit carries
    return packed


def _reference(weight, dtype):
    return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


def test_scratch_buffer_is_reused_and_grows():
    s = nf4.ScratchBuffers()
    a = s.get("cpu", torch.bfloat16, 100)
    b = s.get("cpu", torch.bfloat16, 60)
    assert a.numel() == 100 and b.numel() == 60
    assert a.data_ptr() == b.data_ptr()  # the same memory, handed out again
    c = s.get("cpu", torch.bfloat16, 300)
    assert c.numel() == 300 and s.nbytes() == 600  # grown, and the smaller buffer dropped
    assert s.get("cpu", torch.float32, 10).data_ptr() != c.data_ptr()  # one buffer per dtype
    s.clear()
    assert s.nbytes() == 0


def test_frozen_scratch_keeps_outgrown_buffers():
    """A captured CUDA graph writes into the buffer it saw: once frozen, growing must not free it."""
    s = nf4.ScratchBuffers()
    old = s.get("cpu", torch.bfloat16, 100)
    s.freeze()
    new = s.get("cpu", torch.bfloat16, 300)
    assert new.data_ptr() != old.data_ptr()
    assert s.nbytes() == 600 and s.kept_nbytes() == 200
    assert s._kept[0].data_ptr() == old.data_ptr()
    s.clear()  # a no-op once frozen
    assert s.nbytes() == 600


def test_cpu_weights_use_bitsandbytes_api_and_match_it():
    w = _quantised(96, 130)
    assert nf4._plan_for(w) is None  # no CUDA C call for a CPU tensor
    got = nf4.dequantize_4bit_weight(w, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (96, 130)
    assert torch.equal(got, _reference(w, torch.float32))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,cols,blocksize", [(2048, 2048, 64), (512, 2048, 64), (1000, 1536, 128), (37, 71, 64)])
def test_direct_path_is_bitsandbytes_bit_for_bit(quant_type, nested, dtype, rows, cols, blocksize):
    w = _quantised(rows, cols, quant_type, nested, blocksize, device="cuda", seed=rows + cols, dtype=dtype)
    assert nf4._plan_for(w) is not None, "the direct C call was not taken"
    nf4.SCRATCH.get(w.device, dtype, rows * cols).fill_(float("nan"))  # unwritten elements would fail
    nf4.ABSMAX_SCRATCH.clear()
    got = nf4.dequantize_4bit_weight(w, dtype)
    want = _reference(w, dtype)
    assert got.dtype == dtype and got.shape == (rows, cols)
    assert not got.isnan().any()
    assert torch.equal(got, want)


@gpu
@pytest.mark.gpu
def test_other_compute_dtype_rounds_through_the_weights_own_dtype_as_bitsandbytes_does():
    w = _quantised(300, 512, device="cuda")  # bf16 weight, fp32 compute
    got = nf4.dequantize_4bit_weight(w, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, _reference(w, torch.float32))


@gpu
@pytest.mark.gpu
def test_consecutive_weights_share_one_buffer_and_each_is_right_when_used():
    ws = [_quantised(r, 2048, device="cuda", seed=r) for r in (2048, 512, 8192)]
    outs, ptrs = [], []
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    for w in ws:  # consumed at once, as every caller does
        d = nf4.dequantize_4bit_weight(w, torch.bfloat16)
        ptrs.append(d.data_ptr())
        outs.append(x @ d.t())
    assert len(set(ptrs)) <= 2  # one buffer (a second only when it had to grow)
    assert nf4.SCRATCH.nbytes() <= 2 * 8192 * 2048 * 2
    for w, o in zip(ws, outs):
        assert torch.equal(o, x @ _reference(w, torch.bfloat16).t())
