"""The run's check that a loaded VLM keeps packed samples apart (sftop/engine/train/vision_packing.py)."""

import pickle

import torch
from torch import nn

from sftop.engine.models.vision.packing import RopeIndex
from sftop.engine.train.vision_packing import vision_packing_isolated
from test_vlm_packing import _model


class _DropsPositions(nn.Module):
    """A model whose forward ignores the packed positions (as attention code that knows nothing of
    packing would): its samples see each other."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **batch):
        batch.pop("position_ids")
        return self.inner(**batch)


def test_isolation_check_passes_the_model_and_fails_a_leaking_one():
    model = _model("qwen2_5_vl")
    rope = RopeIndex(model)
    ok, detail = vision_packing_isolated(model, rope)
    assert ok, detail
    leaky_ok, leaky_detail = vision_packing_isolated(_DropsPositions(model), rope)
    assert not leaky_ok, leaky_detail
    assert model.training  # the check leaves the model as it found it


def test_rope_index_travels_to_a_worker_without_the_model():
    model = _model("qwen2_vl")
    rope = pickle.loads(pickle.dumps(RopeIndex(model)))
    ids = torch.tensor([[50, 51, 52, 53]])
    positions, _ = rope.get_rope_index(
        input_ids=ids, mm_token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids)
    )
    assert positions.tolist() == [[[0, 1, 2, 3]]] * 3
    assert len(pickle.dumps(rope)) < 100_000  # a config, not weights


def test_isolation_check_for_a_family_with_plain_positions():
    from test_vlm_packing import _llava_model

    model, family = _llava_model()
    packer = family.packer(model)
    ok, detail = vision_packing_isolated(model, packer)
    assert ok, detail
    leaky_ok, leaky_detail = vision_packing_isolated(_DropsPositions(model), packer)
    assert not leaky_ok, leaky_detail
