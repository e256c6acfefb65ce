"""Is padding-free packing safe for this model? Checked by running it, not by guessing.

TRL's padding-free batches concatenate documents into one row with `position_ids` restarting
at 0 and no attention mask. flash-attention reads the document boundaries from `cu_seq_lens`;
transformers' SDPA/eager paths rebuild a block-diagonal mask from the restarting `position_ids`.
Models with their own attention code (trust_remote_code) may do neither, and then documents
would attend to each other: silently wrong training. So before training we compare the logits of
two documents run separately with the same two packed by TRL's own collator.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def packing_isolated(model, vocab_size: int, pad_token_id: int, *, lengths=(11, 7)) -> tuple[bool, str]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(0)
        docs = [torch.randint(4, max(5, vocab_size - 1), (n,), generator=gen).tolist() for n in lengths]

        def logits(batch):
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
            return model(**batch, use_cache=False).logits.float()

        separate = [logits({"input_ids": torch.tensor([d])})[0] for d in docs]
        packed_batch = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)(
            [{"input_ids": d} for d in docs]
        )
        packed = logits(packed_batch)[0]
        # What cross-document attention would give: the second document read after the first.
        joined = logits({"input_ids": torch.tensor([docs[0] + docs[1]])})[0]
        second = slice(lengths[0], lengths[0] + lengths[1])
        err = (packed[second] - separate[1]).abs().max().item()
        leak = (joined[second] - separate[1]).abs().max().item()
        err0 = (packed[: lengths[0]] - separate[0]).abs().max().item()
    finally:
        model.train(was_training)
    # Numerical noise (bf16, kernels) is far below the change that attending to another document makes.
    ok = err <= 0.1 * leak + 1e-4 and err0 <= 0.1 * leak + 1e-4
    detail = f"packed-vs-separate max |dlogit| {max(err, err0):.2e}, cross-document effect {leak:.2e}"
    return ok, detail
