"""TRL 1.16's SFTTrainer wraps the model's forward with its own fused LM head; the patched model
must train under it (our loss part steps aside for `fused_lm_head=True`, the rest stays fused)."""

import pytest
import torch

import sftop.kernels as K

from _tiny_models import DEVICE, VOCAB, tiny_model


def _tokenizer():
    # a word-level tokenizer over the tiny vocab, built locally (no download)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")


@pytest.mark.parametrize("patch_first", [True, False])
def test_sft_trainer_trains_patched_model(tmp_path, patch_first):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from sftop.kernels import rms_norm as rms_mod

    model = tiny_model("llama", init_lora_weights=True)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, VOCAB, (int(n),), generator=g).tolist()} for n in (9, 14, 6, 11)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=DEVICE == "cpu",
        bf16=False,
        padding_free=True,
        max_length=None,
    )
    calls = {"n": 0}
    orig_apply = rms_mod.RMSNormFunction.apply

    def counting_apply(*a):
        calls["n"] += 1
        return orig_apply(*a)

    rms_mod.RMSNormFunction.apply = counting_apply
    try:
        if patch_first:
            report = K.patch_model(model)
        trainer = trl.SFTTrainer(
            model=model, args=args, processing_class=_tokenizer(), train_dataset=datasets.Dataset.from_list(rows)
        )
        if not patch_first:
            report = K.patch_model(trainer.model)
        # every Triton part; packed attention needs a CUDA GPU and bf16 (test_varlen_attention.py)
        # packed attention and checkpoint offload need a CUDA GPU, and kept q/k/v wide layers
        # (their own tests cover them)
        skipped = ("attention", "checkpoint_offload", "kept_projections", "cuda_graphs")
        assert {v for k, v in report.parts.items() if k not in skipped} == {"fused"}
        result = trainer.train()
    finally:
        rms_mod.RMSNormFunction.apply = orig_apply
    assert calls["n"] > 0, "the patched norms must run inside SFTTrainer"
    assert torch.isfinite(torch.tensor(result.training_loss))
    logged = [h for h in trainer.state.log_history if "mean_token_accuracy" in h]
    assert logged, "TRL's token-accuracy metric still works"
