"""Packed multimodal rows on a CUDA GPU in bf16 through sftop's kernels (language layers and the
Qwen-VL vision tower): the packed row's summed loss and LoRA gradients equal the per-sample ones
within 1e-2, as the CPU test (test_vlm_packing.py) shows in float32 for the stock model.

Run on a GPU machine:  pytest -m gpu tests/vision/test_vlm_packing_gpu.py -q
"""

import copy

import pytest
import torch

from sftop.engine.models.vision.packing import RopeIndex, pack_rows
from test_vlm_packing import SAMPLES, _loss_sum, _model, _sample

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOLERANCE = 1e-2


def _on_gpu(batch):
    out = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    if "pixel_values" in out:  # as the trainer's bf16 autocast hands them to the tower
        out["pixel_values"] = out["pixel_values"].to(torch.bfloat16)
    return out


def _grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl"])
def test_packed_bf16_through_kernels_equals_per_sample(name):
    from sftop.engine.models.vision.loading import VLM_KERNEL_PARTS
    from sftop.kernels import patch_model
    from sftop.kernels.patching.vision_tower import patch_vision_tower

    from sftop.engine.models.vision.registry import all_families

    model = _model(name).cuda().to(torch.bfloat16)
    report = patch_model(model, model_type=all_families()[name].language_model_type, only=VLM_KERNEL_PARTS)
    assert report.any_fused, report.parts
    patch_vision_tower(model)
    g = torch.Generator().manual_seed(1)
    samples = [_sample(model.config, *s, g) for s in SAMPLES]
    total = sum(_loss_sum(model, _on_gpu(dict(s))) for s in samples)
    total.backward()
    per_sample = _grads(model)
    model.zero_grad(set_to_none=True)
    # the run's collator packs on the CPU with the model's RopeIndex, then the batch moves to the GPU
    packed = _on_gpu(pack_rows(RopeIndex(model), [copy.copy(s) for s in samples]))
    loss = _loss_sum(model, packed)
    loss.backward()
    packed_grads = _grads(model)
    print(f"{name}: packed {loss.item():.4f} vs per-sample {total.item():.4f}; {report.parts}")
    assert abs(loss.item() - total.item()) <= TOLERANCE * abs(total.item())
    lora = [k for k in per_sample if "lora_" in k]
    assert lora and packed_grads.keys() == per_sample.keys()
    for k in lora:
        err = float((packed_grads[k] - per_sample[k]).norm() / per_sample[k].norm().clamp_min(1e-12))
        assert err <= TOLERANCE, (k, err)
