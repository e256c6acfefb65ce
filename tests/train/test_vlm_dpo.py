"""Vision-language DPO on the CPU: pairs with images read in TRL's and RLAIF-V's layouts, checked
image by image, collated by the family's processor, trained by SftopDPOTrainer on the tiny Qwen2-VL;
the reference is the adapter-off policy."""

import json

import pytest
import torch

from sftop.engine.events import read_events
from sftop.engine.models.vision.loading import load_processor
from sftop.engine.models.vision.registry import all_families, family_for_model_type
from sftop.engine.train.runner import run_training
from sftop.engine.train.vision_dpo_data import answer_mask, prepare_vision_preferences
from train_helpers import in_home, of_type, reference_logps_in_loss
from vlm_helpers import COLOURS, vlm_preset, write_colour_preferences

FAMILY = family_for_model_type("qwen2_vl")


def _dpo_preset(source, **sections):
    train = {
        "task": "dpo",
        "max_steps": 12,
        "effective_batch": 8,
        "learning_rate": 3e-3,
        "save_steps": 12,
        **sections.pop("train", {}),
    }
    return vlm_preset(
        source,
        train=train,
        plan={"micro_batch": 8, "grad_accum": 1},
        data={"max_bad_fraction": 0.2, **sections.pop("data", {})},
        **sections,
    )


@pytest.fixture(scope="module")
def vlm_dpo_run(sftop_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vlm-pairs")
    source = write_colour_preferences(folder, rows=9, bad={4: "missing"})
    run_dir = tmp_path_factory.mktemp("vlm-dpo-run")
    mp = in_home(sftop_home)
    try:
        code = run_training(_dpo_preset(source), run_dir)
    finally:
        mp.undo()
    return code, run_dir


def test_vlm_dpo_learns_the_preferred_colour(vlm_dpo_run):
    code, run_dir = vlm_dpo_run
    records = read_events(run_dir / "events.jsonl")[0]
    assert code == 0, records[-1]
    started = of_type(records, "run_started")[0]
    assert started["data"]["task"] == "dpo" and started["data"]["rows"] == 8 and started["data"]["rows_skipped"] == 1
    assert "image 1: file img/4.png" in started["data"]["problems"][0]["reason"]
    assert started["data"]["images"]["images"] == 8
    assert started["kernels"]["reference"] == "adapter off"
    assert started["kernels"]["dpo_graphs"].startswith("off: "), started["kernels"]  # no GPU here: said why
    steps = of_type(records, "step")
    assert [s["step"] for s in steps] == list(range(1, 13))
    # policy == reference at the start: log 2, no margin, no pair preferred yet
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and steps[0]["reward_accuracy"] == 0.0
    last = steps[-3:]
    assert sum(s["reward_accuracy"] for s in last) / 3 >= 0.75, [s["reward_accuracy"] for s in steps]
    assert all(s["reward_margin"] > 0.2 for s in last) and all(s["reward_chosen"] > s["reward_rejected"] for s in last)
    assert sum(s["loss"] for s in last) / 3 < 0.6931 - 0.15, [s["loss"] for s in steps]
    assert records[-1]["type"] == "run_finished" and (run_dir / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("layout", ["trl", "rlaif-v"])
def test_pairs_are_read_checked_and_collated_per_side(tmp_path, layout):
    source = write_colour_preferences(tmp_path, rows=5, layout=layout, bad={1: "corrupt"})
    lines = source.read_text().splitlines()
    long = json.loads(lines[3])
    if layout == "trl":
        long["prompt"][0]["content"][1]["text"] = "What colour is the shape? " * 20
    else:
        long["question"] = "What colour is the shape? " * 20
    lines[3] = json.dumps(long)
    source.write_text("\n".join(lines) + "\n")
    preset = _dpo_preset(source, data={"max_bad_fraction": 0.5})
    processor = load_processor(preset.model, FAMILY)
    data = prepare_vision_preferences(preset, processor, FAMILY)
    assert data.format == "preference" and data.stats.rows == 3
    reasons = {p.index: p.reason for p in data.report.problems}
    assert reasons[1].startswith("image 1: file img/1.png is truncated")
    assert reasons[3].startswith("pair is too long") and "dropped, not truncated" in reasons[3]
    batch = data.collator([{"row": 0}, {"row": 2}])
    # [chosen of both pairs; rejected of both], each side with its pair's image
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape[0] == 4
    assert "labels" not in batch
    pairs = [json.loads(lines[i]) for i in (0, 4)]
    side = (lambda p, s: p[s][0]["content"][0]["text"]) if layout == "trl" else (lambda p, s: p[s])
    expected = [side(p, "chosen") for p in pairs] + [side(p, "rejected") for p in pairs]
    answers = [
        processor.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["completion_mask"])
    ]
    assert answers == [f"{colour}<|im_end|>" for colour in expected]
    assert all(colour in COLOURS for colour in expected)


def test_answer_mask_skips_the_prompts_own_answers():
    ignore = -100
    labels = [ignore, 5, 6, ignore, ignore, 7, 8, ignore, 9, ignore]
    assert answer_mask(labels, 0) == [False, True, True, False, False, True, True, False, True, False]
    assert answer_mask(labels, 2) == [False] * 8 + [True, False]


def test_reference_log_probs_are_the_adapter_off_model(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig

    from sftop.engine.models.vision.loading import load_vision_model
    from sftop.engine.train.dpo import SftopDPOTrainer
    from sftop.engine.train.trainer import UpdateGuard

    source = write_colour_preferences(tmp_path, rows=3)
    preset = _dpo_preset(source)
    data = prepare_vision_preferences(preset, load_processor(preset.model, FAMILY), FAMILY)
    model, processor, _ = load_vision_model(preset, FAMILY)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter, so adapter on and off differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        max_length=None,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    trainer = SftopDPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"row": [0, 1, 2]}),
        processing_class=processor,
        data_collator=data.collator,
        guard=UpdateGuard(3),
        save_total_limit=1,
    )
    batch = data.collator([{"row": 0}, {"row": 1}, {"row": 2}])
    got = torch.tensor(reference_logps_in_loss(trainer, batch), dtype=torch.float64)

    def sequence_logps(adapter: bool):
        inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
        with torch.no_grad():
            if adapter:
                logits = model(**inputs).logits
            else:
                with model.disable_adapter():
                    logits = model(**inputs).logits
        logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        chosen, rejected = (logp * batch["completion_mask"][:, 1:]).sum(-1).chunk(2)
        return torch.stack([chosen.mean(), rejected.mean()])

    off, on = sequence_logps(False), sequence_logps(True)
    # the loss's reference is the adapter-off model, and the adapter matters (on != off)
    assert torch.allclose(got, off, atol=1e-3), (got, off)
    assert (on - off).abs().max() > 1e-2


def test_builtin_shapes_preferences_are_clean_pairs():
    from sftop.engine.data.builtin import load_builtin
    from sftop.engine.data.shapes import ANSWERS

    rows = load_builtin("builtin:shapes-preferences")
    assert len(rows) == 1000
    for row in rows[:200]:
        chosen, rejected = (row[side][0]["content"][0]["text"] for side in ("chosen", "rejected"))
        assert chosen != rejected and {chosen, rejected} <= set(ANSWERS[row["kind"]])
        placeholders = sum(1 for part in row["prompt"][0]["content"] if part["type"] == "image")
        assert placeholders == len(row["images"]) in (1, 2)
    preset = vlm_preset("builtin:shapes-preferences", train={"task": "dpo"}, data={"max_rows": 40, "max_length": 128})
    data = prepare_vision_preferences(preset, load_processor(preset.model, FAMILY), FAMILY)
    assert data.report.bad_rows == 0 and data.stats.rows == 40
    assert max(data.images_per_row) == 2  # the two-image questions come through too


def test_fused_logprob_head_scores_the_vlm_as_its_logits_do(tmp_path):
    """The head a GPU run installs on the VLM (`kernels` on): the language model's hidden states through
    the fused log-prob kernel give the logits' log-probabilities, forward and backward."""
    from sftop.kernels.patching.logprob_head import install_logprob_head

    source = write_colour_preferences(tmp_path, rows=2)
    preset = _dpo_preset(source)
    data = prepare_vision_preferences(preset, load_processor(preset.model, FAMILY), FAMILY)
    batch = data.collator([{"row": 0}, {"row": 1}])
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model = FAMILY.tiny_model(seed=0).float()
    head = model.get_output_embeddings().weight

    logits = model(**inputs).logits
    expected = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    expected = expected * (labels[:, 1:] != -100)
    (g_expected,) = torch.autograd.grad(expected.sum(), head)

    assert install_logprob_head(model) == "fused"
    got = model(**inputs, labels=labels, fused_lm_head=True).log_probs
    (g_got,) = torch.autograd.grad(got.sum(), head)
    assert torch.allclose(got.double(), expected, atol=1e-4)
    assert torch.allclose(g_got.double(), g_expected.double(), atol=1e-4, rtol=1e-3)
    assert expected.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("four_bit", [False, True], ids=["bf16", "nf4"])
def test_vlm_dpo_on_a_gpu_learns_through_the_fused_head(sftop_home, tmp_path, four_bit):
    """A GPU run with the kernels on: the log-prob head on the VLM is sftop's fused one, in bf16 and
    4-bit (QLoRA on the language model), and the pairs are still learned."""
    source = write_colour_preferences(tmp_path / "data", rows=8)  # one batch of 8 pairs, every step
    # bf16 moves in coarser steps than the CPU tests' fp32: 24 steps (seconds on a GPU)
    preset = _dpo_preset(source, train={"kernels": "auto", "max_steps": 24, "save_steps": 24})
    preset = preset.model_copy(
        update={"model": preset.model.model_copy(update={"load_in_4bit": four_bit, "dtype": "bf16"})}
    )
    mp = in_home(sftop_home)
    try:
        code = run_training(preset, tmp_path / "run")
    finally:
        mp.undo()
    records = read_events(tmp_path / "run" / "events.jsonl")[0]
    assert code == 0, records[-1]
    started = of_type(records, "run_started")[0]
    assert started["kernels"]["logprob_head"] == "fused" and started["kernels"]["reference"] == "adapter off"
    steps = of_type(records, "step")
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-2)
    assert sum(s["reward_accuracy"] for s in steps[-3:]) / 3 >= 0.75, [s["reward_accuracy"] for s in steps]
    assert sum(s["loss"] for s in steps[-3:]) / 3 < 0.6931 - 0.1, [s["loss"] for s in steps]


@pytest.mark.parametrize("name", sorted(all_families()))
def test_every_family_collates_pairs_and_takes_a_dpo_step(name, tmp_path):
    """Each family's template and processor: the answer mask holds exactly each side's answer, and
    TRL's DPO loss on the tiny model starts at log 2 (policy = reference) with LoRA gradients."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig

    from sftop.engine.models.tokenizer import ensure_pad_token
    from sftop.engine.models.vision.lora_parts import target_module_names
    from sftop.engine.train.dpo import SftopDPOTrainer
    from sftop.engine.train.trainer import UpdateGuard

    family = all_families()[name]
    processor = family.offline_processor()
    ensure_pad_token(processor.tokenizer)
    source = write_colour_preferences(tmp_path, rows=2)
    data = prepare_vision_preferences(_dpo_preset(source, data={"max_length": 4096}), processor, family)
    assert data.stats.rows == 2 and data.report.bad_rows == 0, data.report.problems
    batch = data.collator([{"row": 0}, {"row": 1}])
    pairs = [json.loads(line) for line in source.read_text().splitlines()]
    expected = [p[side][0]["content"][0]["text"] for side in ("chosen", "rejected") for p in pairs]
    for ids, mask, answer in zip(batch["input_ids"], batch["completion_mask"], expected):
        assert processor.tokenizer.decode(ids[mask.bool()]).strip().startswith(answer), name

    torch.manual_seed(0)
    base = family.tiny_model(seed=0).float()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=target_module_names(base, family, None)))
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        max_length=None,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    trainer = SftopDPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"row": [0, 1]}),
        processing_class=processor,
        data_collator=data.collator,
        guard=UpdateGuard(3),
        save_total_limit=1,
    )
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(0.6931, abs=1e-4)
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max().item() for g in grads) > 0  # the preference reaches the adapter


def test_a_vlm_run_continues_an_earlier_adapter(tmp_path):
    """model.adapter on a VLM (DPO after VLM SFT): the adapter is loaded, trainable, not a fresh one."""
    from sftop.engine.models.vision.loading import load_vision_model

    source = write_colour_preferences(tmp_path, rows=2)
    first, _, _ = load_vision_model(_dpo_preset(source), FAMILY)
    with torch.no_grad():
        for name, param in first.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    first.save_pretrained(tmp_path / "sft-adapter")
    saved = {n: p.detach().clone() for n, p in first.named_parameters() if "lora_" in n}
    preset = _dpo_preset(source, lora={"r": 16})
    preset = preset.model_copy(
        update={"model": preset.model.model_copy(update={"adapter": str(tmp_path / "sft-adapter")})}
    )
    model, _, info = load_vision_model(preset, FAMILY)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[n].detach(), saved[n]) and loaded[n].requires_grad for n in saved)
    assert info.params_trainable == sum(p.numel() for p in saved.values())  # its own r (8), not lora.r = 16


def test_data_check_decodes_the_images_and_names_bad_pairs(tmp_path):
    from sftop.engine.data.check import check_data, render_check
    from sftop.engine.train.vision_data import image_tokens_for_plan, vision_check_kwargs

    source = write_colour_preferences(tmp_path, rows=6, layout="rlaif-v", bad={2: "corrupt", 5: "missing"})
    preset = _dpo_preset(source, data={"max_bad_fraction": 0.5})
    result = check_data(preset, **vision_check_kwargs(preset))
    assert (result.rows_read, result.bad_rows, result.usable_rows) == (6, 2, 4)
    assert [p.index for p in result.problems] == [2, 5]
    assert result.problems[0].reason == "image 1: file img/2.png is truncated (the file ends before the image does)"
    assert result.images["images"] == 4 and result.images["image_tokens_max"] == 6
    assert result.stats.chosen.max == 4 and result.stats.prompt.max == 48  # image tokens counted in the prompt
    text = render_check(result)
    assert "images    4 in 4 pairs" in text and "row 5: image 1:" in text
    assert "<|image_pad|>×4" in text  # the sample's image shown as its token count, not 4 tokens
    # `sftop plan` sizes the image terms from the same pairs
    assert image_tokens_for_plan(preset) == [6, 6, 6, 6]
