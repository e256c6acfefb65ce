"""Part image_merge (sftop/kernels/patching/image_merge.py): a Qwen-VL model's image features written
into its token embeddings by row gives transformers' masked_scatter merge exactly, forward and
backward, without calling masked_scatter."""

from __future__ import annotations

import copy

import pytest
import torch
from vision_family_rows import family, image, processor, rows, single

from sftop.engine.models.vision.collator import VisionCollator
from sftop.engine.models.vision.lora_parts import target_module_names
from sftop.kernels.patching import image_merge as IM
from sftop.kernels.patching import markers

QWEN_VL = ["qwen2_vl", "qwen2_5_vl"]


def _grads_of(*tensors):
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("batch,tokens,hidden,n_features", [(3, 17, 5, 9), (1, 31, 12, 31), (2, 7, 3, 0)])
def test_merge_rows_equals_masked_scatter_forward_and_backward(batch, tokens, hidden, n_features):
    g = torch.Generator().manual_seed(batch * 100 + tokens)
    embeds = torch.randn(batch, tokens, hidden, dtype=torch.float64, generator=g)
    flat = torch.zeros(batch * tokens, dtype=torch.bool)
    flat[torch.randperm(batch * tokens, generator=g)[:n_features]] = True
    placeholders = flat.view(batch, tokens)
    features = torch.randn(n_features, hidden, dtype=torch.float64, generator=g)
    upstream = torch.randn(batch, tokens, hidden, dtype=torch.float64, generator=g)

    e1, f1 = embeds.clone().requires_grad_(), features.clone().requires_grad_()
    ours = IM.merge_rows(e1, placeholders, f1, "pixel_values")
    (ours * upstream).sum().backward()
    e2, f2 = embeds.clone().requires_grad_(), features.clone().requires_grad_()
    stock = e2.masked_scatter(placeholders[..., None], f2)
    (stock * upstream).sum().backward()

    assert torch.equal(ours, stock)
    assert torch.equal(e1.grad, e2.grad) and torch.equal(f1.grad, f2.grad)
    # the placeholder rows hold the features in order, the others the embeddings
    assert torch.equal(ours[placeholders], features) and torch.equal(ours[~placeholders], embeds[~placeholders])


def test_merge_rows_refuses_a_count_that_differs_as_transformers_does():
    placeholders = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: 2, features: 3"):
        IM.merge_rows(torch.zeros(1, 3, 4), placeholders, torch.zeros(3, 4), "pixel_values")
    with pytest.raises(ValueError, match="Video features and video tokens do not match, tokens: 2, features: 1"):
        IM.merge_rows(torch.zeros(1, 3, 4), placeholders, torch.zeros(1, 4), "pixel_values_videos")


def _lora_vlm(name: str):
    """A tiny float32 Qwen-VL with LoRA on its language and vision layers (B != 0), so the image
    features carry a gradient back into the tower through the merge."""
    from peft import LoraConfig, get_peft_model

    fam = family(name)
    model = fam.tiny_model(seed=5)
    targets = target_module_names(model, fam, ["language", "vision", "attention", "mlp"])
    assert any(".visual." in t for t in targets)
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    ).train()


def _batch(name: str):
    return VisionCollator(family(name), processor(name))(
        [single(image(name, 2, 3)), rows(name)["two-turns"], single(image(name, 4, 2, (10, 200, 10)), index=2)]
    )


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class _MaskedScatterCalls:
    """Counts Tensor.masked_scatter calls while installed."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = torch.Tensor.masked_scatter

        def counting(t, *a, **k):
            self.n += 1
            return real(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, "masked_scatter", counting)


@pytest.mark.parametrize("name", QWEN_VL)
def test_patched_model_gives_the_stock_loss_and_gradients_without_masked_scatter(name, monkeypatch):
    batch = _batch(name)
    assert batch["image_grid_thw"].shape[0] == 3 and "mm_token_type_ids" in batch
    stock = _lora_vlm(name)
    merged = copy.deepcopy(stock)
    assert IM.patch_image_merge(merged) == "fused"
    (backbone,) = IM.find_models(merged)
    assert markers.ORIG_FORWARD in vars(backbone)

    calls = _MaskedScatterCalls(monkeypatch)
    s_loss, s_grads = _loss_and_grads(stock, batch)
    assert calls.n == 1  # transformers' merge, once for the images
    m_loss, m_grads = _loss_and_grads(merged, batch)
    assert calls.n == 1  # none more: the rows were copied by index

    assert torch.allclose(m_loss, s_loss, rtol=1e-6, atol=0)
    assert s_grads.keys() == m_grads.keys()
    vision = [n for n in s_grads if ".visual." in n]
    assert vision and all(s_grads[n].abs().sum() > 0 for n in vision)  # the tower's adapters learn
    for n in s_grads:
        assert torch.allclose(m_grads[n], s_grads[n], rtol=1e-5, atol=1e-7), n
    # the rotary positions came from transformers' own computation: its deltas were kept
    assert backbone.rope_deltas is not None


@pytest.mark.parametrize("name", QWEN_VL)
def test_calls_it_does_not_take_go_to_the_stock_forward(name, monkeypatch):
    model = _lora_vlm(name)
    assert IM.patch_image_merge(model) == "fused"
    (backbone,) = IM.find_models(model)
    calls = _MaskedScatterCalls(monkeypatch)
    batch = _batch(name)
    with torch.no_grad():
        # text only: nothing to merge, the stock forward as it is
        text = {k: batch[k] for k in ("input_ids", "attention_mask")}
        model(**text, use_cache=False)
        assert calls.n == 0
        # embeddings handed in: the caller merged already
        embeds = backbone.get_input_embeddings()(batch["input_ids"])
        model.base_model.model.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        assert calls.n == 0
        # token ids and pixel values again: ours, still no masked_scatter
        model(**batch, use_cache=False)
        assert calls.n == 0
    IM.unpatch_image_merge(model)
    assert markers.ORIG_FORWARD not in vars(backbone)
    with torch.no_grad():
        model(**batch, use_cache=False)
    assert calls.n == 1  # the stock merge is back


def test_other_models_are_reported_stock_with_why():
    gemma = family("gemma3").tiny_model(seed=1)
    assert IM.patch_image_merge(gemma) == "stock: only Qwen2VLModel and Qwen2_5_VLModel merge image features this way"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_merge_is_exact_and_allocates_no_prefix_sum():
    """Qwen2.5-VL-3B's step shape (4 rows of 1,024 tokens, hidden 2,048, 256 image tokens a row) in
    bf16: the rows equal masked_scatter's, and the merge allocates its output and a row index only,
    where masked_scatter also takes a contiguous mask and an int64 prefix sum of every element."""
    batch, tokens, hidden = 4, 1024, 2048
    g = torch.Generator("cuda").manual_seed(0)
    embeds = torch.randn(batch, tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    placeholders = torch.zeros(batch, tokens, dtype=torch.bool, device="cuda")
    placeholders[:, 10:266] = True
    features = torch.randn(batch * 256, hidden, device="cuda", dtype=torch.bfloat16, generator=g)

    def transient(fn) -> tuple[torch.Tensor, int]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - before

    ours, ours_bytes = transient(lambda: IM.merge_rows(embeds, placeholders, features, "pixel_values"))
    stock, stock_bytes = transient(lambda: embeds.masked_scatter(placeholders[..., None], features))
    assert torch.equal(ours, stock)
    output = embeds.numel() * embeds.element_size()  # 16 MiB
    assert ours_bytes <= output + 2 * 2**20  # the output, the row index (32 KiB) and the allocator's rounding
    assert stock_bytes >= output + 8 * embeds.numel()  # the prefix sum alone: 64 MiB
