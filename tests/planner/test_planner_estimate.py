"""The memory model's terms, checked against numbers worked out by hand for Llama-3.2-1B."""

from __future__ import annotations

import pytest
from _shapes import llama_1b, llama_8b, qwen_1_5b

from sftop.engine.planner.estimate import (
    GIB,
    PROJECTIONS,
    ModelShape,
    Setup,
    estimate,
    fused_ce_bytes,
    layer_activation_bytes_per_token,
    lora_modules,
    lora_params,
    weight_bytes,
)

L1B = ModelShape.from_config(llama_1b())


def test_shape_from_config_and_dict():
    s = L1B
    assert (s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab, s.tied) == (
        2048,
        8192,
        16,
        32,
        8,
        64,
        128256,
        True,
    )
    assert ModelShape.from_config(llama_1b().to_dict()) == s
    # per block: q,o 2048^2 each; k,v 2048*512 each; gate,up,down 2048*8192 each
    assert s.linear_params == 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) == 973_078_528
    assert s.embedding_params == 128256 * 2048  # tied: one matrix
    assert s.total_params == 1_235_814_400  # Llama-3.2-1B's published 1.24 B


def test_vlm_text_config_and_qwen_bias():
    q = ModelShape.from_config(qwen_1_5b())
    assert q.attn_bias and q.tied and q.head_dim == 128 and q.kv_dim == 256
    assert 1.5e9 < q.total_params < 1.6e9  # Qwen2.5-1.5B has 1.54 B
    nested = {"model_type": "llava", "tie_word_embeddings": False, "text_config": llama_1b().to_dict()}
    nested["text_config"].pop("tie_word_embeddings")
    assert ModelShape.from_config(nested).hidden == 2048
    assert ModelShape.from_config(nested).tied is False
    with pytest.raises(ValueError, match="hidden_size"):
        ModelShape.from_config({"vocab_size": 10})


def test_weights_bf16_fp32_nf4():
    assert weight_bytes(L1B, Setup()) == 2 * 1_235_814_400
    assert weight_bytes(L1B, Setup(dtype="fp32")) == 4 * 1_235_814_400
    # NF4: 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks = 4.126953125 bits per linear param;
    # embeddings and norms stay bf16.
    nf4 = 973_078_528 * 4.126953125 / 8
    assert nf4 == 501_981_184
    assert weight_bytes(L1B, Setup(load_in_4bit=True)) == 501_981_184 + 2 * (262_668_288 + 67_584)
    no_dq = weight_bytes(L1B, Setup(load_in_4bit=True, double_quant=False))
    assert no_dq == int(973_078_528 * 4.5 / 8 + 2 * (262_668_288 + 67_584))
    upcast = weight_bytes(L1B, Setup(load_in_4bit=True, upcast_non_quantized=True))
    assert upcast - weight_bytes(L1B, Setup(load_in_4bit=True)) == 2 * (262_668_288 + 67_584)


def test_8b_weights_match_research_numbers():
    s = ModelShape.from_config(llama_8b())
    assert weight_bytes(s, Setup()) / GIB == pytest.approx(14.96, abs=0.01)
    nf4_linear = s.linear_params * 4.126953125 / 8 / GIB
    assert nf4_linear == pytest.approx(3.35, abs=0.01)
    # r=16 on all seven projections: 41.9 M parameters (research §A2)
    assert lora_params(s, 16, PROJECTIONS) / 1e6 == pytest.approx(41.9, abs=0.05)


def test_lora_terms():
    # per block sum(d_in + d_out) = 4096 + 2560 + 2560 + 4096 + 3 * 10240 = 44032
    p = 16 * 16 * 44032
    assert lora_params(L1B, 16, PROJECTIONS) == p == 11_272_192
    e = estimate(L1B, Setup(), 1024)
    assert e.terms["lora_params"] == 4 * p and e.terms["lora_grads"] == 4 * p
    assert e.terms["optimizer_states"] == 8 * p
    assert estimate(L1B, Setup(optimizer="adamw_8bit"), 1024).terms["optimizer_states"] == 2 * p
    assert lora_modules(["q_proj", "v_proj", "lm_head"]) == ("q_proj", "v_proj")
    assert lora_params(L1B, 8, ("q_proj", "v_proj")) == 16 * 8 * (4096 + 2560)


def test_activation_per_token_per_layer():
    # stock: 36h + 4h_kv + 10i (research §A3) = 73728 + 2048 + 81920
    assert layer_activation_bytes_per_token(L1B, Setup(kernels=False), 2048) == 157_696
    # sftop's kernels + LoRA path: Q, K, V, out (2q + 2kv) and the fp32 log-sum-exp per head; gate and up;
    # each norm's bf16 input + fp32 rstd; the two norm outputs the adapters read (no fp32 copies; o_proj's
    # input is SDPA's own output); a rank-16 bf16 product per adapter
    fused = 2 * (2 * 2048 + 2 * 512) + 4 * 32 + 2 * 2 * 8192 + 2 * (2 * 2048 + 4) + 2 * 2 * 2048 + 2 * 16 * 7
    assert fused == 59_752
    # what the CPU graph walk (test_planner_saved_tensors) sees; on the GPU SDPA keeps K and V repeated
    # per query head (measured, 2026-12-02): 2 x (q - kv) x 2 bytes more
    assert layer_activation_bytes_per_token(L1B, Setup(kernels=True, on_gpu=False), 2048) == fused
    assert layer_activation_bytes_per_token(L1B, Setup(kernels=True), 2048) == fused + 2 * (2048 - 512) * 2
    # an explicit SDPA mask (packed rows) makes transformers repeat K and V to all 32 heads first
    assert layer_activation_bytes_per_token(L1B, Setup(kernels=True), 2048, masked=True) == fused + 2 * 2 * (2048 - 512)
    assert layer_activation_bytes_per_token(L1B, Setup(kernels=False), 2048, masked=True) == 157_696 + 6144
    # only q and v adapted: the MLP runs the fused GLU on its own (gate, up saved), no MLP adapter input
    qv = layer_activation_bytes_per_token(
        L1B, Setup(kernels=True, lora_targets=("q_proj", "v_proj"), on_gpu=False), 2048
    )
    assert qv == 2 * (2 * 2048 + 2 * 512) + 4 * 32 + 2 * 2 * 8192 + 2 * (2 * 2048 + 4) + 2 * 2048 + 2 * 16 * 2
    # LoRA dropout sends every adapter back to PEFT (fp32 input copies + masks); norms and GLU stay fused
    kd = layer_activation_bytes_per_token(L1B, Setup(kernels=True, lora_dropout=0.05), 2048)
    assert kd == 157_696 - 4 * 2048 + 8 - 2 * 8192 + 6 * 2048 + 8192
    dropout = layer_activation_bytes_per_token(L1B, Setup(kernels=False, lora_dropout=0.05), 2048)
    assert dropout - 157_696 == 6 * 2048 + 8192  # (6h + i) one-byte masks
    eager = layer_activation_bytes_per_token(L1B, Setup(kernels=False, attention="eager"), 4096)
    assert eager - 157_696 == 6 * 32 * 4096 + 2 * 2 * (2048 - 512)  # probabilities; eager repeats K and V too


def test_full_estimate_by_hand_no_checkpointing_hf_loss():
    t = 2048
    e = estimate(L1B, Setup(kernels=False, loss="full"), t)
    saved_tok = 16 * 157_696 + 4 * 2048  # every block + the fp32 final-norm input
    assert e.terms["activations"] == saved_tok * t == 5_184_159_744
    assert e.terms["loss_peak"] == 14 * 128256 * t
    assert e.peak_phase == "loss"
    allocated = 2_471_628_800 + 3 * 45_088_768 + 45_088_768 + 64 * 2**20 + 5_184_159_744 + 14 * 128256 * t
    assert e.allocated_bytes == allocated
    margin = int(0.10 * (allocated - 2_471_628_800 - 45_088_768))
    assert e.device_bytes == allocated + margin + int(0.6 * GIB)


def test_checkpointing_keeps_block_inputs_and_one_recomputed_block():
    t = 4096
    on = estimate(L1B, Setup(checkpointing="on", kernels=False, loss="chunked"), t)
    assert on.terms["activations"] == (16 * 2 * 2048 + 4 * 2048) * t
    assert on.peak_phase == "backward"
    assert on.terms["recomputed_layer"] == 157_696 * t
    off = estimate(L1B, Setup(checkpointing="off", kernels=False, loss="chunked"), t)
    offload = estimate(L1B, Setup(checkpointing="offload", kernels=False, loss="chunked"), t)
    assert offload.allocated_bytes < on.allocated_bytes < off.allocated_bytes
    assert offload.terms["activations"] == (2 * 2 * 2048 + 4 * 2048) * t
    assert "CPU RAM" in offload.notes[0]


def test_offload_counts_the_kept_attention_output_where_it_is_kept():
    t = 4096  # one unpadded row: unmasked causal attention
    kept = estimate(L1B, Setup(checkpointing="offload"), t)
    packed = estimate(L1B, Setup(checkpointing="offload", packed=True, attention="varlen"), t)
    no_mlp = estimate(L1B, Setup(checkpointing="offload", lora_targets=("q_proj", "v_proj")), t)
    plain = (2 * 2 * 2048 + 2 * 2048 + 4) * t  # two block inputs in flight, the final norm
    for e in (packed, no_mlp):
        assert e.terms["activations"] == plain
    # one more [tokens, heads * head_dim] output in flight, and 16 layers' fp32 log-sum-exp of 32 heads
    assert kept.terms["activations"] == plain + (2 * 2048 + 16 * 4 * 32) * t
    # on the host: 16 block inputs and 16 attention outputs
    assert f"{16 * 2 * 2 * 2048 * t / 2**30:.2f} GiB" in kept.notes[0]
    assert f"{16 * 2 * 2048 * t / 2**30:.2f} GiB" in packed.notes[0]


def test_offload_counts_kept_qkv_on_layers_wide_enough_to_keep_them(monkeypatch):
    from sftop.kernels.constants import KEEP_PROJECTIONS_ENV

    monkeypatch.delenv(KEEP_PROJECTIONS_ENV, raising=False)
    s8, t = ModelShape.from_config(llama_8b()), 4096
    kept = estimate(s8, Setup(checkpointing="offload"), t)
    monkeypatch.setenv(KEEP_PROJECTIONS_ENV, "0")
    without = estimate(s8, Setup(checkpointing="offload"), t)
    # one more layer's q (4096), k and v (1024 each) in flight, and all 32 layers' on the host
    qkv = 2 * (4096 + 2 * 1024)
    assert kept.terms["activations"] - without.terms["activations"] == qkv * t
    host = lambda e: float(e.notes[0].split(" GiB")[0].split()[-1])  # noqa: E731
    assert host(kept) - host(without) == pytest.approx(32 * qkv * t / 2**30, abs=0.01)
    # Llama-3.2-1B's layers are too narrow to hide the copies unless forced
    monkeypatch.delenv(KEEP_PROJECTIONS_ENV)
    narrow = estimate(L1B, Setup(checkpointing="offload"), t)
    monkeypatch.setenv(KEEP_PROJECTIONS_ENV, "1")
    forced = estimate(L1B, Setup(checkpointing="offload"), t)
    assert forced.terms["activations"] - narrow.terms["activations"] == 2 * (2048 + 2 * 512) * t


def test_fused_loss_is_far_below_full_logits():
    t = 8192
    full = estimate(L1B, Setup(checkpointing="on", kernels=False, loss="full"), t)
    fused = estimate(L1B, Setup(checkpointing="on", kernels=True, loss="fused"), t)
    assert full.allocated_gib - fused.allocated_gib > 9  # 14 V bytes/token of fp32 logits at 8k tokens
    # one live logits chunk of 1046 rows (256 MiB / (V * 2 bytes)), the final norm's output, its gathered rows,
    # the dX rows, and labels/index/per-row loss
    setup = Setup(checkpointing="on")
    assert fused_ce_bytes(L1B, setup, t) == 1046 * 128256 * 2 + (3 * 2 * 2048 + 29) * t
    # fewer rows than a chunk holds
    assert fused_ce_bytes(L1B, setup, 1000) == 1000 * 128256 * 2 + (3 * 2 * 2048 + 29) * 1000
    # with one chunk live, a recomputed layer's backward outweighs the loss at 8K tokens
    assert fused.peak_phase == "backward"
    short = estimate(L1B, setup, 512)
    assert short.peak_phase == "loss" and short.terms["loss_peak"] == fused_ce_bytes(L1B, setup, 512)


@pytest.mark.parametrize("tokens", [512, 2048, 8192])
def test_monotone_in_tokens(tokens):
    for gc in ("off", "on", "offload"):
        a = estimate(L1B, Setup(checkpointing=gc), tokens)
        b = estimate(L1B, Setup(checkpointing=gc), tokens * 2)
        assert b.allocated_bytes > a.allocated_bytes


def test_peers_anchor_magnitudes():
    """The peers' measured H100 peaks (docs/peers.md) are within 10% for the paths we can model."""
    s8 = ModelShape.from_config(llama_8b())
    stock_8b = estimate(s8, Setup(checkpointing="on", kernels=False, loss="full"), 2 * 2048)
    assert stock_8b.allocated_gib == pytest.approx(23.40, rel=0.10)
    fused_8b = estimate(s8, Setup(checkpointing="on", kernels=True, loss="fused"), 2 * 2048)
    assert fused_8b.allocated_gib == pytest.approx(17.79, rel=0.10)  # Liger: fused norms, SwiGLU, linear+CE
    fused_1b = estimate(L1B, Setup(checkpointing="on", kernels=True, loss="fused"), 4 * 2048)
    # below Liger's 4.39; sftop's own step measured 3.67 GiB (H200, 2026-12-02, docs/benchmarks.md)
    assert fused_1b.allocated_gib == pytest.approx(3.67, rel=0.05)


def test_vlm_vision_tower_weights_count_and_stay_16bit():
    # Qwen2.5-VL-3B's config.json: 1280-wide, 32-deep gated ViT with a 2x2 merger into 2048
    text = qwen_1_5b().to_dict()
    vision = {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "hidden_act": "silu",
        "out_hidden_size": 2048,
    }
    shape = ModelShape.from_config({"model_type": "qwen2_5_vl", "text_config": text, "vision_config": vision})
    per_layer = 4 * 1280 * 1280 + 3 * 1280 * 3420
    assert shape.vision_params == 32 * per_layer + 5120 * 5120 + 5120 * 2048
    assert 0.6e9 < shape.vision_params < 0.7e9  # Qwen2.5-VL's tower is about 670 M parameters
    text_only = ModelShape.from_config(qwen_1_5b())
    assert weight_bytes(shape, Setup()) - weight_bytes(text_only, Setup()) == 2 * shape.vision_params
    assert weight_bytes(shape, Setup(load_in_4bit=True)) - weight_bytes(text_only, Setup(load_in_4bit=True)) == (
        2 * shape.vision_params
    )


def test_packed_and_padded_batches_pay_for_the_sdpa_mask():
    t = 8192
    packed = estimate(L1B, Setup(packed=True), t)
    # one [1, 1, T, T] bool mask, plus a bf16 bias per layer kept for backward
    assert packed.terms["attention_mask"] == t * t + 16 * 2 * t * t
    flash = estimate(L1B, Setup(packed=True, attention="flash_attention_2"), t)
    assert "attention_mask" not in flash.terms
    # ... and SDPA with a mask keeps K and V repeated to all 32 heads (transformers' repeat_kv)
    assert packed.allocated_bytes - flash.allocated_bytes == t * t + 16 * 2 * t * t + 16 * 2 * 2 * (2048 - 512) * t
    padded = estimate(L1B, Setup(), 4 * 2048, seq_len=2048)
    assert padded.terms["attention_mask"] == 4 * 2048 * 2048 * (1 + 16 * 2)
    single = estimate(L1B, Setup(), 2048, seq_len=2048)
    assert "attention_mask" not in single.terms  # causal SDPA, no mask
    gc_on = estimate(L1B, Setup(packed=True, checkpointing="on"), t)
    assert gc_on.terms["attention_mask"] == t * t  # the per-layer bias is rebuilt with its block


def test_partial_checkpointing_keeps_the_other_blocks_whole():
    from sftop.engine.planner.estimate import checkpointed_layers

    t = 4096
    a = layer_activation_bytes_per_token(L1B, Setup(kernels=False), t)
    half = Setup(checkpointing="on", checkpoint_every=2, kernels=False, loss="chunked")
    assert checkpointed_layers(L1B, half) == 8
    assert checkpointed_layers(L1B, Setup(checkpointing="on", checkpoint_every=3)) == 6  # blocks 0, 3, ..., 15
    e = estimate(L1B, half, t)
    assert e.terms["activations"] == (8 * 2 * 2048 + 8 * a + 4 * 2048) * t
    full = estimate(L1B, Setup(checkpointing="on", kernels=False, loss="chunked"), t)
    off = estimate(L1B, Setup(checkpointing="off", kernels=False, loss="chunked"), t)
    assert full.allocated_bytes < e.allocated_bytes < off.allocated_bytes


def test_kernel_families_follow_the_patcher():
    from sftop.engine.planner.estimate import (
        KEPT_PROJECTIONS_FAMILIES,
        KERNEL_FAMILIES,
        LEAN_RECOMPUTE_FAMILIES,
        kernels_cover,
    )

    # the planner reads the patcher's own table: these are its answers, not copies of it
    assert KERNEL_FAMILIES == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"}
    assert LEAN_RECOMPUTE_FAMILIES == {"llama", "mistral", "qwen2", "qwen3"}
    assert KEPT_PROJECTIONS_FAMILIES == {"llama", "mistral", "qwen2", "gemma2"}
    assert kernels_cover(L1B) and kernels_cover(ModelShape.from_config(qwen_1_5b()))
    vlm = ModelShape.from_config({"model_type": "qwen2_5_vl", "text_config": llama_1b().to_dict()})
    assert vlm.multimodal and not kernels_cover(vlm)


@pytest.mark.parametrize("forced", [None, "0", "1"])
def test_kept_projections_follow_layer_width_and_the_switch(monkeypatch, forced):
    from sftop.engine.planner.estimate import kept_projections
    from sftop.kernels.constants import KEEP_PROJECTIONS_ENV

    if forced is None:
        monkeypatch.delenv(KEEP_PROJECTIONS_ENV, raising=False)
    else:
        monkeypatch.setenv(KEEP_PROJECTIONS_ENV, forced)
    got = {
        cfg.model_type + str(cfg.hidden_size): kept_projections(
            ModelShape.from_config(cfg), Setup(checkpointing="offload"), masked=False
        )
        for cfg in (llama_1b(), llama_8b(), qwen_1_5b())
    }
    # Llama-3.1-8B's layers have the compute to hide the q/k/v copies; the narrower ones do not
    want = {"llama2048": False, "llama4096": True, "qwen21536": False}
    assert got == (want if forced is None else dict.fromkeys(want, forced == "1"))


def test_mlp_dh_chunks_match_the_kernel():
    import sftop.kernels.lora_mlp as lm
    from sftop.engine.planner.estimate import mlp_dh_bytes

    for tokens, inter in [(4096, 14336), (8192, 8192), (4096, 8960), (1000, 8192), (300, 40000), (7, 40)]:
        assert mlp_dh_bytes(tokens, inter, 2) == lm._dh_chunk_rows(tokens, inter, 2) * inter * 2
    # Llama-3.1-8B at 2 x 2048 tokens: 1024-row chunks instead of the whole 112 MiB
    assert mlp_dh_bytes(4096, 14336, 2) == 1024 * 14336 * 2
    assert mlp_dh_bytes(1000, 8192, 2) == 1000 * 8192 * 2  # 15.6 MiB: one chunk


def test_nf4_dequantised_weight_is_not_held_while_the_loss_runs():
    nf4, bf16 = Setup(load_in_4bit=True), Setup()
    # at the loss both hold the same activations; the dequantised weight only lives inside a block
    loss_nf4, loss_bf16 = estimate(L1B, nf4, 2048), estimate(L1B, bf16, 2048)
    assert loss_nf4.peak_phase == loss_bf16.peak_phase == "loss" and "dequant_transient" not in loss_nf4.terms
    assert loss_bf16.allocated_bytes - loss_nf4.allocated_bytes == weight_bytes(L1B, bf16) - weight_bytes(L1B, nf4)
    # backward: two may overlap
    back = estimate(L1B, Setup(load_in_4bit=True, checkpointing="on", kernels=False, loss="chunked"), 8192)
    assert back.peak_phase == "backward" and back.terms["dequant_transient"] == 2 * 2 * 8192 * 2048
    assert estimate(L1B, nf4, 8).terms["dequant_transient"] == 2 * 2 * 8192 * 2048  # tiny batches peak there too


def test_packed_attention_needs_no_mask_and_keeps_kv_unrepeated_when_torch_allows():
    t = 8192
    sdpa = estimate(L1B, Setup(packed=True), t)
    varlen = estimate(L1B, Setup(packed=True, attention="varlen"), t)
    assert "attention_mask" not in varlen.terms
    flash = estimate(L1B, Setup(packed=True, attention="flash_attention_2"), t)
    assert varlen.allocated_bytes == flash.allocated_bytes < sdpa.allocated_bytes
    # an older torch API without enable_gqa: K and V are repeated to all 32 query heads and kept
    repeated = estimate(L1B, Setup(packed=True, attention="varlen", varlen_native_gqa=False), t)
    assert repeated.allocated_bytes - varlen.allocated_bytes == 16 * 2 * 2 * (2048 - 512) * t
