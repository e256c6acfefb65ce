"""Every vision-language family end to end on the CPU: load, LoRA by part, a few training steps whose
loss falls, save, reload, generate. Tiny random-init models and offline processors: no hub."""

import pytest
import torch

from sftop.engine.data.image_check import resolve_row_images
from sftop.engine.data.prepare import validate_structure
from sftop.engine.models.vision.collator import VisionCollator
from sftop.engine.models.vision.lora_parts import target_module_names
from sftop.engine.models.vision.registry import all_families
from sftop.engine.presets.schema import DataSection

FAMILIES = sorted(all_families())
STEPS = 8


def _rows(family, n: int = 4):
    """`n` rows of builtin:shapes the family takes (single-image rows where it takes one image),
    normalised and with their images checked and resized to the family's rules."""
    import sftop.engine.data.builtin  # noqa: F401 - builtin:shapes is registered there

    section = DataSection(source="builtin:shapes")
    structured = validate_structure(section, strict=False, allow_images=True)
    picked = []
    for conv in structured.conversations:
        images = sum(1 for m in conv.messages for p in m.content if getattr(p, "type", "") == "image")
        if images == 1 or (images > 1 and family.supports_multiple_images and len(picked) % 2):
            picked.append(resolve_row_images(conv, None, family.image_rules))
        if len(picked) == n:
            return picked
    raise AssertionError("builtin:shapes has too few rows for this family")


@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_saves_reloads_and_generates(name, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    family = all_families()[name]
    processor = family.offline_processor()
    torch.manual_seed(0)
    base = family.model_class().from_config(family.tiny_config())
    base.save_pretrained(tmp_path / "base")
    names = target_module_names(base, family, None)  # the family's default parts
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=names))
    collator = VisionCollator(family, processor, max_length=4096)
    batch = collator(_rows(family))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(STEPS):  # the same batch each step: the loss must fall
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # random-init LM heads give small logits, so a few steps move the loss by about a tenth
    assert min(losses[-3:]) < 0.93 * losses[0], losses
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits.float()

    fresh = family.model_class().from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits.float(), trained, atol=1e-4, rtol=1e-4)
        prompt = _prompt(family, processor, _rows(family, 1)[0])
        out = reloaded.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] > prompt["input_ids"].shape[1]


def _prompt(family, processor, conv):
    """The processor's inputs for a row's user turn, ready for generation."""
    from sftop.engine.models.vision.collator import row_images

    message = conv.messages[0]
    user = {
        "role": message.role,
        "content": [
            {"type": "image"} if getattr(p, "type", "") == "image" else {"type": "text", "text": p.text}
            for p in message.content
        ],
    }
    text = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    images = family.processor_images([row_images(conv)])
    return processor(
        text=[text],
        images=images,
        return_tensors="pt",
        add_special_tokens=False,
        **family.processor_kwargs(family.image_rules),
    )
