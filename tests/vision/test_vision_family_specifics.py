"""What only some families have: the tensors they add, and images kept at the data layer's size."""

from __future__ import annotations

import pytest
from vision_family_rows import family, image, processor, rows, single

from sftop.engine.models.vision.collator import VisionCollator


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_keeps_the_data_layers_size(name):
    fam, proc = family(name), processor(name)
    patch = fam.image_rules.patch_multiple // 2  # the ViT's patch; the grid counts patches before merging
    sizes = [(2, 3), (5, 1), (2, 2)]  # all within the default budget (at least 4 blocks)
    batch = VisionCollator(fam, proc)([single(image(name, w, h)) for w, h in sizes])
    step = fam.image_rules.patch_multiple
    assert batch["image_grid_thw"].tolist() == [[1, h * step // patch, w * step // patch] for w, h in sizes]
    assert batch["pixel_values"].shape[0] == sum(t * h * w for t, h, w in batch["image_grid_thw"].tolist())
    expected = {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    assert set(batch) >= expected


def test_gemma3_marks_image_tokens_for_bidirectional_attention():
    fam, proc = family("gemma3"), processor("gemma3")
    conv = rows("gemma3")["multi"]
    batch = VisionCollator(fam, proc)([conv])
    soft = proc.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    # token_type_ids (1 on soft tokens) is what makes Gemma 3 attend within an image both ways
    assert batch["token_type_ids"][0].tolist() == [int(t == soft) for t in batch["input_ids"][0].tolist()]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)  # every image at the tower's square input


def test_qwen_follows_a_preset_budget_larger_than_the_default():
    import dataclasses

    fam, proc = family("qwen2_vl"), family("qwen2_vl").offline_processor()
    rules = dataclasses.replace(fam.image_rules, max_pixels=600 * 28 * 28)
    img = image("qwen2_vl", 20, 30)  # 600 blocks: over the default budget of 512, within this one
    batch = VisionCollator(fam, proc, rules=rules)([single(img)])
    assert batch["image_grid_thw"].tolist() == [[1, 60, 40]]
    assert fam.image_token_count(proc, *img.size) == 600 + 2


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_tiled_families_cut_tiles_by_aspect_ratio_within_the_budget(name):
    import dataclasses

    fam = family(name)
    proc = fam.offline_processor()
    collator = VisionCollator(fam, proc)  # default budget: 2 tiles (Idefics3) / 3 tiles (SmolVLM) a side
    tiles = 2 if name == "idefics3" else 3
    tile = proc.image_processor.max_image_size["longest_edge"]
    assert proc.image_processor.size["longest_edge"] == tiles * tile
    batch = collator([single(image(name, 4, 1))])  # 4:1, so one row of tiles
    seq = proc.image_seq_len
    assert batch["pixel_values"].shape[1] == tiles + 1  # the tiles and the global view
    assert fam.image_token_count(proc, 112, 28) == tiles * (seq + 2) + seq + 3
    assert batch["pixel_attention_mask"].shape[-2:] == (tile, tile)
    # a one-tile budget leaves only the global view
    small = dataclasses.replace(fam.image_rules, max_pixels=fam.image_rules.patch_multiple**2)
    VisionCollator(fam, proc, rules=small)
    assert fam.image_token_count(proc, 112, 28) == seq + 3


def test_llava_next_counts_depend_on_size_and_the_model_gets_image_sizes():
    fam, proc = family("llava_next"), processor("llava_next")
    sizes = [(28, 84), (84, 28), (56, 56)]
    counts = {fam.image_token_count(proc, w, h) for w, h in sizes}
    assert len(counts) > 1  # anyres: the grid follows the aspect ratio
    batch = VisionCollator(fam, proc)([single(image("llava_next", w // 14, h // 14)) for w, h in sizes])
    assert batch["image_sizes"].tolist() == [[h, w] for w, h in sizes]


@pytest.mark.parametrize("name,expected", [("llava", "llama"), ("llava_next", "mistral"), ("qwen2_vl", "qwen2")])
def test_language_model_type_follows_the_checkpoints_text_model(name, expected):
    fam = family(name)
    assert fam.language_model_type_for(fam.tiny_config()) == expected


def test_mllama_images_enter_by_cross_attention_from_their_token_on():
    fam, proc = family("mllama"), processor("mllama")
    conv = rows("mllama")["multi"]
    batch = VisionCollator(fam, proc)([conv])
    ids = batch["input_ids"][0].tolist()
    image_id = proc.tokenizer.convert_tokens_to_ids("<|image|>")
    first, second = [i for i, t in enumerate(ids) if t == image_id]
    mask = batch["cross_attention_mask"][0]  # (tokens, images, tiles)
    assert mask[:first].sum() == 0  # nothing before the first image sees an image
    assert mask[first:second, 0].any(-1).all() and mask[first:second, 1].sum() == 0
    assert mask[second:, 1].any(-1).all()
    assert {"aspect_ratio_ids", "aspect_ratio_mask", "pixel_values"} <= set(batch)
