"""Packed multimodal rows (sftop/engine/models/vision/packing.py): a packed row's summed loss and
LoRA gradients equal the per-sample ones, in float32, for the mRoPE families."""

import copy

import pytest
import torch

from sftop.engine.models.vision.packing import pack_rows

# (image grids in patches, text before, text after): several images, none, different sizes
TEXT = (40, 300)  # ordinary token ids of the tiny vocabulary, clear of the special ids below them
SAMPLES = [([[1, 4, 4]], 3, 9), ([], 7, 5), ([[1, 2, 6], [1, 4, 2]], 2, 6)]


def _model(name):
    from peft import LoraConfig, get_peft_model

    from sftop.engine.models.vision.registry import all_families

    family = all_families()[name]
    torch.manual_seed(0)
    model = family.model_class().from_config(family.tiny_config(), attn_implementation="sdpa")
    targets = r".*(language_model.*\.(q_proj|v_proj|down_proj)|visual\.blocks\.\d+\.attn\.qkv)"
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero, which would leave the A gradients zero
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(n)))
    return model


def _sample(config, grids, before, after, g):
    vis = config.vision_config
    merge = vis.spatial_merge_size
    ids = [torch.randint(TEXT[0], TEXT[1], (before,), generator=g)]
    for t, h, w in grids:
        ids += [
            torch.tensor([config.vision_start_token_id]),
            torch.full((t * h * w // merge**2,), config.image_token_id),
            torch.tensor([config.vision_end_token_id]),
        ]
    ids.append(torch.randint(TEXT[0], TEXT[1], (after,), generator=g))
    ids = torch.cat(ids)[None]
    # as the family's processor returns them: mm_token_type_ids is what makes the model use mRoPE
    sample = {
        "input_ids": ids,
        "labels": ids.where(ids >= TEXT[0], -100),
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == config.image_token_id).int(),
    }
    if grids:
        grid = torch.tensor(grids)
        values = vis.in_channels * vis.temporal_patch_size * vis.patch_size**2
        sample["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), values, generator=g)
        sample["image_grid_thw"] = grid
    return sample


def _loss_sum(model, batch):
    labels = batch.pop("labels")
    logits = model(**batch).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _per_sample(model, samples):
    """The samples' summed loss unpacked, and the gradients it leaves (cleared from the model)."""
    total = sum(_loss_sum(model, dict(s)) for s in samples)
    total.backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return total, grads


def _assert_packed_equals_per_sample(model, packed, total, per_sample, tower):
    """The packed row's summed loss and LoRA gradients (tower and language model) equal the per-sample sums."""
    loss = _loss_sum(model, copy.copy(packed))
    assert abs(loss.item() - total.item()) < 1e-4 * abs(total.item())
    loss.backward()
    packed_grads = _grads(model)
    lora = [k for k in per_sample if "lora_" in k]
    assert lora and packed_grads.keys() == per_sample.keys()
    assert any(tower in k for k in lora) and any("language_model" in k for k in lora)
    for k in lora:
        err = (packed_grads[k] - per_sample[k]).norm() / per_sample[k].norm()
        assert err < 1e-4, (k, float(err))


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_packed_loss_and_lora_gradients_equal_the_per_sample_sums(name):
    model = _model(name)
    g = torch.Generator().manual_seed(1)
    samples = [_sample(model.config, *s, g) for s in SAMPLES]
    total, per_sample = _per_sample(model, samples)
    packed = pack_rows(model, samples)
    n = sum(s["input_ids"].shape[1] for s in samples)
    assert packed["input_ids"].shape == (1, n) and packed["position_ids"].shape == (4, 1, n)
    assert "attention_mask" not in packed and packed["use_cache"] is False
    # text positions restart per sample; each sample's first label is not trained
    starts = [0, samples[0]["input_ids"].shape[1], n - samples[2]["input_ids"].shape[1]]
    assert (packed["position_ids"][0, 0] == 0).nonzero().flatten().tolist() == starts
    assert all(packed["labels"][0, s] == -100 for s in starts)
    _assert_packed_equals_per_sample(model, packed, total, per_sample, tower="visual")


def test_packing_refuses_padded_samples_and_models_without_mrope():
    model = _model("qwen2_5_vl")
    g = torch.Generator().manual_seed(2)
    sample = _sample(model.config, [[1, 4, 4]], 2, 3, g)
    sample["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="sample 0 is padded"):
        pack_rows(model, [sample])
    with pytest.raises(ValueError, match="no get_rope_index"):
        pack_rows(torch.nn.Linear(2, 2), [sample])


# LLaVA 1.5 (plain 1-D positions, sftop/engine/models/vision/packing_text_positions.py): rows with one
# image, none, and two; every image the processor's one crop size
LLAVA_SAMPLES = [(3, 9, 1), (7, 5, 0), (2, 6, 2)]


def _llava_model():
    from peft import LoraConfig, get_peft_model

    from sftop.engine.models.vision.registry import all_families

    torch.manual_seed(0)
    family = all_families()["llava"]
    model = family.model_class().from_config(family.tiny_config(), attn_implementation="sdpa")
    targets = r".*(language_model.*\.(q_proj|v_proj|down_proj)|vision_tower.*\.(q_proj|v_proj|fc1))"
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(n)))
    return model, family


def _llava_sample(config, before, after, images, g):
    vis = config.vision_config
    per_image = (vis.image_size // vis.patch_size) ** 2  # the "default" strategy drops CLS
    ids = [torch.randint(TEXT[0], TEXT[1], (before,), generator=g)]
    ids += [torch.full((per_image,), config.image_token_id) for _ in range(images)]
    ids.append(torch.randint(TEXT[0], TEXT[1], (after,), generator=g))
    ids = torch.cat(ids)[None]
    sample = {"input_ids": ids, "labels": ids.where(ids >= TEXT[0], -100), "attention_mask": torch.ones_like(ids)}
    if images:
        sample["pixel_values"] = torch.randn(images, 3, vis.image_size, vis.image_size, generator=g)
    return sample


def test_llava_packed_loss_and_lora_gradients_equal_the_per_sample_sums():
    model, family = _llava_model()
    packer = family.packer(model)
    g = torch.Generator().manual_seed(1)
    samples = [_llava_sample(model.config, *s, g) for s in LLAVA_SAMPLES]
    total, per_sample = _per_sample(model, samples)
    packed = packer.pack(samples)
    n = sum(s["input_ids"].shape[1] for s in samples)
    assert packed["input_ids"].shape == (1, n) and packed["position_ids"].shape == (1, n)
    assert packed["pixel_values"].shape[0] == 3 and "attention_mask" not in packed and packed["use_cache"] is False
    starts = [0, samples[0]["input_ids"].shape[1], n - samples[2]["input_ids"].shape[1]]
    assert (packed["position_ids"][0] == 0).nonzero().flatten().tolist() == starts
    assert all(packed["labels"][0, s] == -100 for s in starts)
    _assert_packed_equals_per_sample(model, packed, total, per_sample, tower="vision_tower")


def test_llava_packing_refuses_padding_and_what_it_cannot_keep_apart():
    import pickle

    model, family = _llava_model()
    packer = pickle.loads(pickle.dumps(family.packer(model)))  # what a data-loader worker gets
    assert len(pickle.dumps(packer)) < 100_000  # a config, not weights
    g = torch.Generator().manual_seed(2)
    sample = _llava_sample(model.config, 2, 3, 1, g)
    padded = {**sample, "attention_mask": sample["attention_mask"].clone()}
    padded["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="sample 0 is padded"):
        packer.pack([padded])
    with pytest.raises(ValueError, match="sample 1 carries image_sizes"):
        packer.pack([sample, {**sample, "image_sizes": torch.tensor([[32, 32]])}])
    # LLaVA-NeXT's tiled images keep padded batches, with the reason
    from sftop.engine.models.vision.registry import all_families

    assert "tiled images" in all_families()["llava_next"].packing_refusal
    with pytest.raises(NotImplementedError, match="not packed"):
        all_families()["llava_next"].packer(model)
