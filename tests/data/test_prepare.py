import json

import pytest
from data_tokenizers import make_tokenizer

from sftop.engine.data import prepare_data
from sftop.engine.data.builtin import load_builtin
from sftop.engine.data.conversation import Conversation, Message
from sftop.engine.data.prepare import split_eval
from sftop.engine.data.tokenize import IGNORE_INDEX, Encoder
from sftop.engine.presets.schema import Preset


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("bpe", "chatml")


def test_prepare_arithmetic(tok):
    prepared = prepare_data(Preset(data={"source": "builtin:arithmetic", "max_length": 64}), tok)
    assert prepared.train.column_names == ["input_ids", "labels"]
    assert prepared.eval is None and len(prepared.train) == 1000 and prepared.format == "messages"
    first = prepared.train[0]
    assert len(first["input_ids"]) == len(first["labels"])
    assert tok.decode([t for t in first["labels"] if t != IGNORE_INDEX]) == "15<|im_end|>"  # "What is 6+9?"
    stats = prepared.stats
    lengths = sorted(len(ids) for ids in prepared.train["input_ids"])
    assert stats.tokens == sum(lengths) and stats.length_max == lengths[-1] <= 64
    assert stats.length_p50 == lengths[499] and stats.length_p99 == lengths[989]
    trained = sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in prepared.train["labels"])
    assert stats.trained_tokens == trained and 0 < stats.trained_share < 0.5
    summary = json.loads(json.dumps(prepared.to_dict()))
    assert summary["rows"] == 1000 and summary["format"] == "messages" and summary["rows_skipped"] == 0
    assert summary["trained_share"] == round(trained / sum(lengths), 4)


def test_eval_split_is_seeded(tok):
    def run(seed):
        preset = Preset(
            data={"source": "builtin:arithmetic", "max_length": 64, "eval_fraction": 0.1, "max_rows": 200},
            train={"seed": seed},
        )
        return prepare_data(preset, tok)

    a, b, c = run(1), run(1), run(2)
    assert len(a.train) == 180 and len(a.eval) == 20
    assert a.eval_source_rows == b.eval_source_rows != c.eval_source_rows
    assert sorted(a.train_source_rows + a.eval_source_rows) == list(range(200))
    assert a.eval["input_ids"] == b.eval["input_ids"]
    assert split_eval(2, 0.01, 0) != [] and split_eval(1, 0.4, 0) == [] and len(split_eval(10, 0.49, 0)) == 5


def test_loss_on_all_and_text_documents(tok):
    prepared = prepare_data(Preset(data={"source": "builtin:sample-sharegpt", "loss_on": "all"}), tok)
    assert all(ids == labels for ids, labels in zip(prepared.train["input_ids"], prepared.train["labels"]))
    prepared = prepare_data(Preset(data={"source": "builtin:sample-text"}), tok)
    assert prepared.format == "text" and prepared.stats.trained_share == 1.0


def test_forced_format_reads_the_text_column(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}], "text": "Q A"}) + "\n")
    prepared = prepare_data(Preset(data={"source": str(path), "format": "text"}), tok)
    assert prepared.format == "text" and tok.decode(prepared.train[0]["input_ids"]) == "Q A<|im_end|>"


def test_masks_match_the_demo_templates_generation_markers():
    # The demo tokenizer's template has {% generation %} markers: transformers' own assistant mask
    # must agree token for token with the one sftop computes without them.
    from sftop.engine.models.demo import build_tokenizer

    demo = build_tokenizer()
    encoder = Encoder(demo)
    for row in load_builtin("sample-messages"):
        msgs = [
            {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
            for m in row["messages"]
        ]
        msgs += [{"role": "user", "content": "And the next?"}, {"role": "assistant", "content": "42 and more"}]
        ref = demo.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
        conv = Conversation(messages=tuple(Message.text(m["role"], m["content"]) for m in msgs))
        encoded = encoder.encode(conv)
        assert encoded.input_ids == ref["input_ids"]
        assert [lab != IGNORE_INDEX for lab in encoded.labels] == [bool(b) for b in ref["assistant_masks"]]


@pytest.mark.parametrize("packing", [False, True])
def test_trl_sft_trainer_keeps_our_labels(tmp_path, tok, packing):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    prepared = prepare_data(
        Preset(data={"source": "builtin:arithmetic", "max_length": 64, "max_rows": 64, "eval_fraction": 0.1}), tok
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=tok.pad_token_id,
        )
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        max_length=64,
        packing=packing,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval, processing_class=tok
    )
    ds = trainer.train_dataset
    ours = sorted(zip(map(tuple, prepared.train["input_ids"]), map(tuple, prepared.train["labels"])))
    if not packing:
        assert sorted(zip(map(tuple, ds["input_ids"]), map(tuple, ds["labels"]))) == ours
    else:
        # Packed rows are concatenations of ours; every label survives.
        assert sum(len(x) for x in ds["input_ids"]) == sum(len(x) for x, _ in ours)
        assert sorted(t for labels in ds["labels"] for t in labels) == sorted(t for _, labels in ours for t in labels)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_prepare_reuses_an_early_structural_pass(tok):
    from sftop.engine.data import validate_structure

    preset = Preset(data={"source": "builtin:sample-broken", "max_bad_fraction": 0.25})
    structured = validate_structure(preset.data)  # before any model is loaded
    assert structured.report.bad_rows == 4 and len(structured.conversations) == 16
    prepared = prepare_data(preset, tok, structured=structured)
    assert len(prepared.train) == 16 and prepared.report is structured.report


def test_parallel_encoding_gives_the_same_rows(tok):
    from sftop.engine.data.prepare import encode_structured, validate_structure

    section = Preset(data={"source": "builtin:arithmetic", "max_length": 20}).data
    one = encode_structured(validate_structure(section, strict=False), section, tok, workers=1)
    two = encode_structured(validate_structure(section, strict=False), section, tok, workers=2)
    assert [(e.input_ids, e.labels, e.source_index) for e in one.encoded] == [
        (e.input_ids, e.labels, e.source_index) for e in two.encoded
    ]
    assert [p.to_dict() for p in one.report.problems] == [p.to_dict() for p in two.report.problems]
