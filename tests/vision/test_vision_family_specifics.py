"""What only some families have: the tensors they add, and images kept at the data layer's size."""

from __future__ import annotations

import pytest
from vision_family_rows import family, image, processor, rows, single

from sftop.engine.models.vision.collator import VisionCollator


@pytest.mark.parametrize("name", ["qwen2_vl"])
def test_qwen_keeps_the_data_layers_size(name):
    fam, proc = family(name), processor(name)
    patch = fam.image_rules.patch_multiple // 2  # the ViT's patch; the grid counts patches before merging
    sizes = [(2, 3), (5, 1), (2, 2)]  # all within the default budget (at least 4 blocks)
    batch = VisionCollator(fam, proc)([single(image(name, w, h)) for w, h in sizes])
    step = fam.image_rules.patch_multiple
    assert batch["image_grid_thw"].tolist() == [[1, h * step // patch, w * step // patch] for w, h in sizes]
    assert batch["pixel_values"].shape[0] == sum(t * h * w for t, h, w in batch["image_grid_thw"].tolist())
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids"}


def test_gemma3_marks_image_tokens_for_bidirectional_attention():
    fam, proc = family("gemma3"), processor("gemma3")
    conv = rows("gemma3")["multi"]
    batch = VisionCollator(fam, proc)([conv])
    soft = proc.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    # token_type_ids (1 on soft tokens) is what makes Gemma 3 attend within an image both ways
    assert batch["token_type_ids"][0].tolist() == [int(t == soft) for t in batch["input_ids"][0].tolist()]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)  # every image at the tower's square input
