"""sftop's packed attention in a Qwen-VL language model (sftop/kernels/varlen_attention.py):
selected for the text config only, it keeps packed samples apart. On the CPU it runs its SDPA
fallback with the block mask rebuilt from the text positions; the flash path is checked on a GPU
(test_vlm_packing_gpu.py)."""

import copy

import pytest
import torch

from sftop.engine.models.vision.packing import pack_rows
from sftop.engine.models.vision.registry import all_families
from sftop.kernels import varlen_attention as VA
from test_vlm_packing import SAMPLES, _loss_sum, _model, _sample


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl"])
def test_text_config_only_and_packed_loss_equals_per_sample(name):
    model = _model(name)
    base = model.get_base_model()
    assert VA.packed_attention_config(base.config) is base.config.text_config
    VA.register()
    base.set_attn_implementation({"text_config": VA.NAME})
    assert base.config.text_config._attn_implementation == VA.NAME
    assert base.config.vision_config._attn_implementation == "sdpa"  # the tower keeps its own
    g = torch.Generator().manual_seed(1)
    samples = [_sample(base.config, *s, g) for s in SAMPLES]
    with torch.no_grad():
        total = sum(_loss_sum(model, dict(s)) for s in samples)
        packed = _loss_sum(model, copy.copy(pack_rows(model, samples)))
    assert abs(packed.item() - total.item()) < 1e-4 * abs(total.item())


def test_other_vision_language_models_are_not_given_packed_attention():
    for name in ("gemma3", "qwen3_vl", "llava"):
        config = all_families()[name].tiny_config()
        assert VA.packed_attention_config(config) is config
        assert not VA.config_supported(config, "bf16")[0]
    as_dict = all_families()["qwen2_5_vl"].tiny_config().to_dict()
    assert VA.packed_attention_config(as_dict) is as_dict["text_config"]


def test_boundaries_of_one_row_are_found_once():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = VA._cu_seq_lens({"position_ids": pos}, 9, pos.device)
    assert cu.tolist() == [0, 3, 5, 9] and longest == 4
    again, _ = VA._cu_seq_lens({"position_ids": pos}, 9, pos.device)
    assert again is cu  # every layer of the forward reuses them
    other = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    assert VA._cu_seq_lens({"position_ids": other}, 9, pos.device)[0].tolist() == [0, 5, 9]
    pos[0, 3] = 3  # changed in place: found again
    assert VA._cu_seq_lens({"position_ids": pos}, 9, pos.device)[0].tolist() == [0, 5, 9]
