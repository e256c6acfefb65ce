"""Tiny random-weight models of each supported family, built from configs (no downloads)."""

import copy

import torch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"]
VOCAB = 301  # not a power of two
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(family: str):
    from transformers import AutoConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    extra = {}
    if family == "gemma2":
        extra = dict(
            final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=8, query_pre_attn_scalar=16
        )
    elif family == "gemma3_text":
        extra = dict(final_logit_softcapping=30.0, sliding_window=8, query_pre_attn_scalar=16)
    elif family in ("qwen2", "mistral"):
        extra = dict(sliding_window=None)
    return AutoConfig.for_model(family, **common, **extra)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model(family: str, seed: int = 0, lora: bool = True, dtype=torch.float32, quant=None, **lora_kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    # gemma2 soft-caps attention logits, which only HF's eager attention implements
    attn = "eager" if family == "gemma2" else "sdpa"
    if quant is not None:
        import tempfile

        from peft import prepare_model_for_kbit_training

        with tempfile.TemporaryDirectory() as d:
            # saved in bf16 whatever the compute dtype, so that every quantised twin of one seed
            # holds the same 4-bit weights
            AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
            model = AutoModelForCausalLM.from_pretrained(
                d, quantization_config=quant, dtype=dtype, attn_implementation=attn, device_map={"": DEVICE}
            )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype).to(DEVICE)
    with torch.no_grad():  # gemma norms start at zero weight; make the (1 + w) path non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    if lora:
        from peft import LoraConfig, get_peft_model

        kw = dict(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False
        )  # B != 0 so every LoRA matrix gets a gradient
        kw.update(lora_kw)
        model = get_peft_model(model, LoraConfig(**kw))
    return model


def twin(model):
    return copy.deepcopy(model)


def bf16_lora_llama(hidden: int, layers: int, seed: int = 0):
    """A bf16 Llama on the GPU wide enough for memory measurements (head_dim 128, vocab 1000,
    intermediate 2 x hidden), LoRA r=8 on all seven projections with B != 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=2 * hidden,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    return get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, target_modules=LORA_TARGETS)
    )
