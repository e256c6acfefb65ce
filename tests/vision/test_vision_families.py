"""Every vision family: offline processor, tiny model, LoRA targets, and the collator's labels
checked token by token, its image-token counts against the processor, and a forward's loss."""

from __future__ import annotations

import re

import pytest
import torch
from vision_family_rows import (
    ASSISTANT_PREFIX,
    END_OF_TURN,
    FAMILY_NAMES,
    family,
    image,
    model,
    processor,
    rows,
    single,
)

from sftop.engine.data.formats import RowError
from sftop.engine.data.tokenize import IGNORE_INDEX, trained_spans
from sftop.engine.models.vision.collator import VisionCollator, row_images
from sftop.engine.models.vision.family import LORA_PARTS
from sftop.engine.models.vision.registry import family_for_config
from sftop.kernels.patching.registry import FAMILIES as KERNEL_FAMILIES

ROW_KINDS = ["single", "single-system", "two-turns", "multi", "multi-system-turns"]


def _cases():
    for name in FAMILY_NAMES:
        for kind in ROW_KINDS:
            if kind in rows(name):
                yield pytest.param(name, kind, id=f"{name}-{kind}")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_declares_a_consistent_offline_model(name):
    fam = family(name)
    proc, config = processor(name), fam.tiny_config()
    tok = proc.tokenizer
    assert family_for_config(config) is fam
    assert len(tok) <= config.get_text_config().vocab_size
    for token in fam.image_token_strings:
        assert tok.convert_tokens_to_ids(token) not in (None, tok.unk_token_id), token
        assert tok.tokenize(token) == [token]  # one special token, never split
    assert fam.image_placeholder(proc) in fam.image_token_strings
    assert fam.language_model_type is None or fam.language_model_type in KERNEL_FAMILIES
    assert set(fam.default_lora_parts) <= set(LORA_PARTS)
    rules = fam.image_rules
    assert rules.min_pixels <= rules.max_pixels and rules.min_edge <= rules.patch_multiple * 64


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_lora_targets_cover_the_real_module_names(name):
    fam, m = family(name), model(name)
    linears = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    targets = fam.lora_targets
    matched = {part: [n for n in linears if re.fullmatch(targets.pattern(part), n)] for part in LORA_PARTS}
    for part in LORA_PARTS:
        # an empty pattern declares a part that has no Linear layer (Gemma 3's projector)
        assert matched[part] or targets.pattern(part) == "", f"{part}: no Linear matches {targets.pattern(part)!r}"
    where = [set(matched[p]) for p in ("language", "vision", "projector")]
    assert not (where[0] & where[1] or where[0] & where[2] or where[1] & where[2]), "parts overlap"
    assert set(linears) - set().union(*where) <= {"lm_head"}, "a Linear layer belongs to no part"
    assert "projector" not in fam.default_lora_parts or matched["projector"]
    # attention and MLP are kinds: the language layers have both
    lang = set(matched["language"])
    assert lang & set(matched["attention"]) and lang & set(matched["mlp"])
    assert not set(matched["attention"]) & set(matched["mlp"])


@pytest.mark.parametrize("name,kind", list(_cases()))
def test_labels_are_exactly_the_assistant_turns(name, kind):
    fam, proc = family(name), processor(name)
    tok = proc.tokenizer
    conv = rows(name)[kind]
    row = VisionCollator(fam, proc).encode_row(conv)
    assert len(row.input_ids) == len(row.labels)
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(row.input_ids, row.labels))
    eot = END_OF_TURN[name]
    trained = [text for text, is_trained in trained_spans(tok, row.input_ids, row.labels) if is_trained]
    prefix = ASSISTANT_PREFIX.get(name, "")
    answers = [prefix + m.text_content for m in conv.messages if m.role == "assistant"]
    assert trained == [answer + eot for answer in answers]
    # token by token: each answer's own tokens, then the end-of-turn token, and nothing else
    eot_id = tok.convert_tokens_to_ids(eot)
    expected_ids = [t for answer in answers for t in tok(answer, add_special_tokens=False)["input_ids"] + [eot_id]]
    assert [label for label in row.labels if label != IGNORE_INDEX] == expected_ids
    # no image token is ever trained, and the prompts are all in the untrained part
    image_ids = VisionCollator.image_token_ids(fam, proc)
    assert not image_ids & {label for label in row.labels if label != IGNORE_INDEX}
    context = "".join(text for text, is_trained in trained_spans(tok, row.input_ids, row.labels) if not is_trained)
    for m in conv.messages:
        if m.role != "assistant":
            assert all(part.text in context for part in m.content if hasattr(part, "text"))
    # every image is in the row with exactly the family's token count for its size
    expected = sum(fam.image_token_count(proc, *img.size) for img in row_images(conv))
    assert row.image_tokens == expected


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_image_token_count_equals_what_the_processor_emits(name):
    fam, proc = family(name), processor(name)
    collator = VisionCollator(fam, proc)
    image_ids = torch.tensor(sorted(collator.image_ids))
    for blocks in [(1, 1), (2, 3), (4, 1), (3, 3)]:
        img = image(name, *blocks)
        batch = collator([single(img)])
        emitted = int(torch.isin(batch["input_ids"][0], image_ids).sum())
        assert emitted == fam.image_token_count(proc, *img.size), blocks


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_collated_batch_gives_the_models_loss_and_reaches_the_vision_tower(name):
    fam, proc, m = family(name), processor(name), model(name)
    convs = list(rows(name).values())
    batch = VisionCollator(fam, proc)(convs)
    input_ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert input_ids.shape == labels.shape == attention.shape and input_ids.shape[0] == len(convs)
    assert (labels[attention == 0] == IGNORE_INDEX).all()  # padding never trained
    for i, conv in enumerate(convs):  # each row's labels equal its per-row encoding
        row = VisionCollator(fam, proc).encode_row(conv)
        assert labels[i][attention[i].bool()].tolist() == row.labels
    out = m(**batch)
    assert torch.isfinite(out.loss)
    logits = out.logits[:, :-1].double()
    by_hand = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-4)
    # the pixels reach the loss: every layer of the vision tower gets a gradient
    m.zero_grad(set_to_none=True)
    out.loss.backward()
    tower = {n: p.grad for n, p in m.named_parameters() if re.fullmatch(fam.lora_targets.vision, n.rsplit(".", 1)[0])}
    assert tower and all(g is not None and torch.isfinite(g).all() for g in tower.values())
    assert all(g.abs().sum() > 0 for n, g in tower.items() if n.endswith(".weight")), "a tower weight got no gradient"
    m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_loss_on_all_keeps_every_text_token(name):
    fam, proc = family(name), processor(name)
    collator = VisionCollator(fam, proc, loss_on="all")
    row = collator.encode_row(rows(name)["single-system"])
    assert row.labels == [IGNORE_INDEX if t in collator.image_ids else t for t in row.input_ids]
    assert row.trained_tokens == row.length - row.image_tokens


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_rows_over_max_length_are_dropped_not_truncated(name):
    fam, proc = family(name), processor(name)
    conv = rows(name)["single"]
    length = VisionCollator(fam, proc).encode_row(conv).length
    assert VisionCollator(fam, proc, max_length=length).encode_row(conv).length == length
    with pytest.raises(RowError, match=rf"{length} tokens .*dropped"):
        VisionCollator(fam, proc, max_length=length - 1).encode_row(conv)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_text_only_rows_batch_with_image_rows(name):
    from sftop.engine.data.conversation import Conversation, Message

    fam, proc = family(name), processor(name)
    text_only = Conversation((Message.text("user", "Say yes."), Message.text("assistant", "yes")), source_index=7)
    collator = VisionCollator(fam, proc)
    if not fam.mixes_text_only_rows:
        with pytest.raises(ValueError, match=r"rows \[7\]"):
            collator([rows(name)["single"], text_only])
        return
    batch = collator([text_only, rows(name)["single"]])
    assert batch["labels"][0][batch["attention_mask"][0].bool()].tolist() == collator.encode_row(text_only).labels
    assert torch.isfinite(model(name)(**batch).loss)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_saved_processor_loads_back_and_collates_the_same(name, tmp_path):
    fam, proc = family(name), processor(name)
    proc.save_pretrained(tmp_path)
    loaded = fam.load_processor(str(tmp_path))  # without torchvision where CI has none
    assert type(loaded).__name__ == type(proc).__name__ and loaded.chat_template == proc.chat_template
    conv = rows(name)["multi" if fam.supports_multiple_images else "single"]
    a, b = VisionCollator(fam, proc)([conv]), VisionCollator(fam, loaded)([conv])
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _tower_positions(name, batch, config):
    """What the vision tower really computes for a collated batch, read from its pixel tensors."""
    pv = batch["pixel_values"]
    patch = config.vision_config.patch_size
    if name.startswith("qwen"):
        return pv.shape[0]
    if name == "gemma3":
        return pv.shape[0] * (pv.shape[-1] // patch) ** 2
    if name in ("idefics3", "smolvlm"):
        real_tiles = int(batch["pixel_attention_mask"].flatten(2).any(-1).sum())
        return real_tiles * (pv.shape[-1] // patch) ** 2
    if name == "llava":
        return pv.shape[0] * ((pv.shape[-1] // patch) ** 2 + 1)
    if name == "llava_next":
        real_crops = int(pv.flatten(2).ne(0).any(-1).sum())
        return real_crops * ((pv.shape[-1] // patch) ** 2 + 1)
    if name == "mllama":
        per_tile = (pv.shape[-1] // patch) ** 2 + 1
        return pv.shape[0] * pv.shape[1] * pv.shape[2] * (per_tile + (-per_tile) % 8)
    raise AssertionError(f"no reading of {name}'s pixel tensors")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_vision_patches_equal_what_the_tower_computes(name):
    fam, proc, config = family(name), processor(name), family(name).tiny_config()
    convs = [single(image(name, w, h)) for w, h in [(2, 3), (4, 1), (2, 2)]]
    batch = VisionCollator(fam, proc)(convs)
    expected = sum(fam.vision_patches(proc, config, *img.size) for conv in convs for img in row_images(conv))
    assert expected == _tower_positions(name, batch, config)


def test_bos_added_where_the_tokenizer_adds_it_and_the_template_does_not():
    from tokenizers import processors

    from sftop.engine.models.vision.families.llava import FAMILY as LLAVA

    proc = LLAVA.offline_processor()
    tok = proc.tokenizer
    # LLaVA 1.5's hub template writes no BOS: its tokenizer adds one
    proc.chat_template = tok.chat_template = proc.chat_template.replace("{{ bos_token }}", "")
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tok("a")["input_ids"][0] == bos
    conv = rows("llava")["two-turns"]
    collator = VisionCollator(LLAVA, proc)
    row = collator.encode_row(conv)
    assert row.input_ids[0] == bos and row.input_ids.count(bos) == 1 and row.labels[0] == IGNORE_INDEX
    trained = [text for text, is_trained in trained_spans(tok, row.input_ids, row.labels) if is_trained]
    assert trained == [" " + m.text_content + "</s>" for m in conv.messages if m.role == "assistant"]
    batch = collator([conv])
    assert batch["input_ids"][0].tolist() == row.input_ids


def test_a_processor_without_the_image_placeholder_is_refused():
    fam = family("qwen2_vl")
    proc = fam.offline_processor()
    proc.image_token = "<|not_a_token|>"
    with pytest.raises(ValueError, match=re.escape("no token '<|not_a_token|>'")):
        VisionCollator(fam, proc)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_tiny_model_sees_its_images(name):
    fam, proc, m = family(name), processor(name), model(name)
    collator = VisionCollator(fam, proc)
    red, blue = (collator([single(image(name, 2, 2, colour))]) for colour in [(220, 20, 20), (20, 20, 220)])
    with torch.no_grad():
        last_red, last_blue = m(**red).logits[0, -1], m(**blue).logits[0, -1]
    assert (last_red - last_blue).abs().max() > 1e-4  # the answer position depends on the pixels


def test_a_checkpoint_without_its_video_processor_loads_where_torchvision_is(tmp_path, monkeypatch):
    # Saved where torchvision was missing, a Qwen-VL processor has no video processor, and where
    # torchvision is installed AutoProcessor refuses it (transformers 5.17's OSError, reproduced
    # here): the family then assembles the processor from the checkpoint's parts, images only.
    import importlib.util

    import transformers

    fam, proc = family("qwen2_5_vl"), processor("qwen2_5_vl")
    proc.save_pretrained(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "torchvision" else real_find_spec(n, *a)
    )

    def refuse(source, **kwargs):
        raise OSError(f"Can't load video processor for '{source}'. ... a video_preprocessor_config.json file.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)
    loaded = fam.load_processor(str(tmp_path))
    assert type(loaded).__name__ == type(proc).__name__ and loaded.chat_template == proc.chat_template
    conv = rows("qwen2_5_vl")["single"]
    a, b = VisionCollator(fam, proc)([conv]), VisionCollator(fam, loaded)([conv])
    assert all(torch.equal(a[k], b[k]) for k in a)

    def broken(source, **kwargs):
        raise OSError("config.json is not valid JSON")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", broken)
    with pytest.raises(OSError, match="not valid JSON"):  # any other failure is the user's to see
        fam.load_processor(str(tmp_path))
