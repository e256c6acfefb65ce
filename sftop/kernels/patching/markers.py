"""Every name sftop sets on a Hugging Face or PEFT object when it patches one, in one place.

The parts leave these on module instances (`module.__dict__`) and on the model; a part that needs
another part's result reads the marker that part declares in its `provides`.  `unpatch` removes
every name in `MODULE_MARKERS` and `MODEL_MARKERS`, and the tests check that no `_sftop_` name is
left behind, so a new marker goes here or the tests fail.
"""

from __future__ import annotations

# A replaced forward (patching/forwards.py): the forward we replaced (None when the instance used
# the class method), our wrapper, the part function it calls, an "off" switch for when someone
# else wrapped the forward on top of ours, and the name of the part that installed it.
ORIG_FORWARD = "_sftop_orig_forward"
FORWARD = "_sftop_forward"
FUNCTION = "_sftop_fn"
OFF = "_sftop_off"
PART = "_sftop_part"

# mlp, vision_mlp: the fused activation's kind, and the adapter of the one-Function LoRA MLP (None without it)
GLU = "_sftop_glu"
LORA_MLP_ADAPTER = "_sftop_lora_adapter"
# lora, attention_lora: the adapter a LoRA layer runs, and whether its frozen base runs inside the
# fused Function
ADAPTER = "_sftop_adapter"
DIRECT = "_sftop_direct"
# attention_lora: the q/k/v group an attention block's three projections share
QKV_GROUP = "_sftop_qkv"
# loss: the compute dtype of the head matmuls (a k-bit model's compute dtype, else None)
LOSS_DTYPE = "_sftop_loss_dtype"
# attention: the attention implementation the model had before (restored on unpatch)
ATTN_IMPLEMENTATION = "_sftop_attn_implementation"
# lean_recompute, checkpoint_offload: the model's own override of gradient_checkpointing_enable
# (an instance attribute over the PreTrainedModel method), what each part switched on, how the
# last enable call set the layers up, and on each layer the checkpoint function it had before ours
GC_ENABLE = "gradient_checkpointing_enable"
GC_DISABLE = "gradient_checkpointing_disable"
# the last full enable's arguments and flags, for a pause (patching/checkpointing.py)
GC_LAST = "_sftop_gc_last"
LEAN = "_sftop_lean_recompute"
OFFLOAD_OK = "_sftop_offload_ok"
OFFLOADING = "_sftop_offloading"
GC_MODE = "_sftop_gc_mode"
STOCK_CHECKPOINT_FUNCTION = "_sftop_stock_checkpoint_function"
# cuda_graphs: the model's StepGraphs
GRAPHS = "_sftop_graphs"
# rope: on the modeling module's apply_rotary_pos_emb dispatcher (function attributes)
ROPE_DISPATCHER = "_sftop_dispatcher"
ROPE_ORIGINAL = "_sftop_original"
# logprob_head (preference tuning): the model answers fused_lm_head=True calls itself
LOGPROB_HEAD = "_sftop_logprob_head"
# logprob_graphs: the log-prob head's captured steps (policy and reference forwards)
LOGPROB_GRAPHS = "_sftop_logprob_graphs"
# set while one micro-batch's log-prob forwards run (logprob_graphs.labels_from_one_batch)
LABELS_FROM_ONE_BATCH = "_sftop_labels_from_one_batch"
# set while one micro-batch's log-prob forwards run with each prompt once (shared_prompt.py)
SHARED_PROMPT = "_sftop_shared_prompt"

# vision tower parts (patching/vision_tower.py): the tower config's attention implementation
# before ours (its forwards, and the vision MLP's GLU and LoRA_MLP_ADAPTER, use the names above)
VISION_ATTN_IMPLEMENTATION = "_sftop_vision_attn_implementation"
# vision_graphs (patching/vision_graphs.py): the tower's StepGraphs for its blocks
TOWER_GRAPHS = "_sftop_tower_graphs"
# language_graphs (patching/language_graphs.py): a VLM text model's StepGraphs for its layers
LANGUAGE_GRAPHS = "_sftop_language_graphs"
# set on the text model while the loss part asks its graphs for the loss (language_graphs.loss_inside)
LANGUAGE_LOSS = "_sftop_language_loss"
# on the model whose loss part asks: its text models with graphs, looked up once
LANGUAGE_GRAPHED_MODELS = "_sftop_language_graphed_models"

# what unpatch removes from every module's __dict__ once its forward is restored
MODULE_MARKERS = (
    ORIG_FORWARD,
    FORWARD,
    FUNCTION,
    OFF,
    PART,
    GLU,
    LORA_MLP_ADAPTER,
    ADAPTER,
    DIRECT,
    QKV_GROUP,
    LOSS_DTYPE,
    GRAPHS,
    TOWER_GRAPHS,
    LANGUAGE_GRAPHS,
    LANGUAGE_LOSS,
    LANGUAGE_GRAPHED_MODELS,
)
# what unpatch removes from the patched model itself
MODEL_MARKERS = (GC_ENABLE, GC_DISABLE, GC_LAST, LEAN, OFFLOAD_OK, OFFLOADING, GC_MODE, ATTN_IMPLEMENTATION)

ALL = frozenset(v for k, v in globals().items() if k.isupper() and isinstance(v, str))
