"""The planner's packing choice for vision-language models, and a packed micro-batch's image terms."""

import pytest

from sftop.engine.models.vision.registry import all_families
from sftop.engine.planner import plan_run
from sftop.engine.planner.solve import size_for_data
from sftop.engine.presets.schema import Preset

PIXELS_PER_IMAGE_TOKEN = 4 * 1176 * 6  # 2x2 patches of 1,176 fp32 values, and their bf16 copy


def _preset(**plan):
    return Preset.model_validate(
        {"model": {"name": "local/vlm"}, "data": {"max_length": 1024}, "plan": plan, "train": {"effective_batch": 8}}
    )


@pytest.mark.parametrize("name", sorted(all_families()))
def test_packing_is_planned_only_for_families_that_pack(name):
    family = all_families()[name]
    plan = plan_run(_preset(), family.tiny_config(), gpu_memory_gib=24, image_tokens_per_row=[6] * 16)
    packs = name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")
    assert plan.packing is packs
    refusals = [n for n in plan.notes if "not packed" in n]
    assert (refusals == []) is packs
    if not packs:
        assert family.packing_refusal in refusals[0]
    # the effective batch is kept exactly, packed or not
    assert plan.micro_batch * plan.grad_accum == 8


def test_packing_off_in_the_preset_stays_off():
    preset = _preset().model_copy(update={"data": _preset().data.model_copy(update={"packing": False})})
    plan = plan_run(
        preset, all_families()["qwen2_5_vl"].tiny_config(), gpu_memory_gib=24, image_tokens_per_row=[6] * 16
    )
    assert plan.packing is False


def test_packed_micro_batch_counts_the_images_of_all_its_rows():
    """Sized for the data, a packed micro-batch of 4 short rows holds fewer tokens than one
    max_length row, yet its pixels, tower and projector are those of its 4 rows' images."""
    from test_planner_vision import QWEN25_VL_3B

    image_tokens = [256, 192, 128, 64] + [16] * 12
    plan = plan_run(
        _preset(micro_batch=4, gradient_checkpointing="on"),
        QWEN25_VL_3B,
        gpu_memory_gib=80,
        image_tokens_per_row=image_tokens,
    )
    assert plan.packing and plan.micro_batch == 4
    sized = size_for_data(plan, [300] * 16)
    assert sized.tokens_per_micro_batch == 4 * 300 < plan.max_length + 300
    expected = (256 + 192 + 128 + 64) * PIXELS_PER_IMAGE_TOKEN
    assert sized.breakdown["pixel_values"] == pytest.approx(expected / 1024**3, abs=1e-4)
    # the image load sets memory beside the text: a bigger micro-batch sees more of it
    two = size_for_data(
        plan_run(
            _preset(micro_batch=2, gradient_checkpointing="on"),
            QWEN25_VL_3B,
            gpu_memory_gib=80,
            image_tokens_per_row=image_tokens,
        ),
        [300] * 16,
    )
    assert two.breakdown["pixel_values"] == pytest.approx((256 + 192) * PIXELS_PER_IMAGE_TOKEN / 1024**3, abs=1e-4)
