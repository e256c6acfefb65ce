"""Part vision_graphs: a Qwen2.5-VL vision tower's blocks replayed from CUDA graphs once a batch's
image layout repeats.

Why: with every other tower part fused, a Qwen2.5-VL-3B step (4 rows of one 448x448 image each)
still kept the GPU busy for only 39 % of the step (docs/benchmarks.md, 2026-12-06).  The host
launched about 8,700 kernels a step and ran the small autograd Functions of 32 tower blocks (the
LoRA projections, norms, rotary and attention calls) on 4,096 patches: the tower took 0.29 s of a
0.69 s step.  Replaying the blocks from a graph launches them with one call each way.

How: the tower's forward becomes sftop's own, step for step transformers' (the same helpers for
the rotary positions, attention segments and windows, each computed eagerly with its host reads),
except that the loop over the blocks runs through a `StepGraphs` of the tower (cuda_graphs.py):
  * the key: the patches' shape and dtype, the number of images' segments and windows and the
    longest of each (host integers baked into the flash-attention launches), grad mode, autocast,
    the blocks' checkpointing and its function, and every block parameter's address,
    `requires_grad` and adapter state (graph_layout.py);
  * the inputs copied into the graph: the patch embeddings in window order, the rotary cos/sin,
    and both cumulative-length tensors.  Their values may change between replays of a key; their
    shapes and the longest segments may not, and they are in the key;
  * a tower with trainable parameters captures forward and backward, a frozen one (or a no-grad
    call: preference tuning's reference forward) its forward only;
  * the patch embedding, the window permutation, the merger and the reordering after it stay eager;
    a patch embedding with trainable parameters of its own (whose gradient the graph does not
    give) keeps the blocks eager.

On by default (measured: 1.60x the eager step on Qwen2.5-VL-3B in bf16, docs/benchmarks.md);
`SFTOP_VISION_GRAPHS=0` turns it and language_graphs off, `SFTOP_CUDA_GRAPHS=0` every graph.
Refused when the tower's attention is not sftop's one-launch segment attention (the stock one reads
the segments back to the host in every layer, which a capture does not allow), under dropout,
without CUDA, or under multi-process training; eager under transformers' blocking offload of the
checkpoints (graph_checks.uncapturable_checkpoints).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .. import compat
from ..constants import VISION_GRAPHS_ENV
from . import markers as M
from .forwards import set_forward
from .graph_checks import call_modes, install_refusal, plain_call, uncapturable_checkpoints

FUSED = "fused"
ENV_SWITCH = VISION_GRAPHS_ENV
TOWER_CLASS = "Qwen2_5_VisionTransformerPretrainedModel"
_HELPERS = ("get_vision_position_ids", "get_vision_attention_seqlens", "get_vision_window_index")
# the tower members its forward uses
_MEMBERS = (
    "patch_embed",
    "rotary_pos_emb",
    "blocks",
    "merger",
    "fullatt_block_indexes",
    "window_size",
    "patch_size",
    "spatial_merge_size",
    "permute_input_for_window_attn",
)


def _helpers():
    """transformers' vision helpers (transformers.vision_utils) and get_max_seqlen, or None."""
    try:
        utils = importlib.import_module("transformers.vision_utils")
        generic = importlib.import_module("transformers.utils.generic")
    except ImportError:
        return None
    found = [getattr(utils, name, None) for name in _HELPERS] + [getattr(generic, "get_max_seqlen", None)]
    return None if any(f is None for f in found) else tuple(found)


def patch_graphs(tower: nn.Module, _spec) -> str:
    from ..cuda_graphs import StepGraphs, no_rng_stash
    from ..vision_attention import NAME

    why = install_refusal(tower)
    if why:
        return why
    if type(tower).__name__ != TOWER_CLASS:
        return f"stock: only {TOWER_CLASS}'s blocks are graphed, not {type(tower).__name__}'s"
    if compat.attn_implementation(tower.config) != NAME:
        return "stock: needs the vision_attention part (the stock attention reads segment lengths on the host)"
    missing = [name for name in _MEMBERS if not hasattr(tower, name)]
    if missing:
        return f"stock: the tower has no {', '.join(missing)}"
    if _helpers() is None:
        return "stock: this transformers has no vision_utils helpers for the tower's positions and windows"
    if M.TOWER_GRAPHS not in tower.__dict__:
        tower.__dict__[M.TOWER_GRAPHS] = StepGraphs(no_rng_stash(tower))
    set_forward(tower, _forward, "vision_graphs")
    return FUSED


def _forward(self, base, hidden_states, grid_thw=None, **kwargs):
    graphs = self.__dict__.get(M.TOWER_GRAPHS)
    if graphs is None or grid_thw is None or not plain_call(kwargs, self.config):
        return base(hidden_states, grid_thw, **kwargs)
    return tower_forward(self, graphs, hidden_states, grid_thw)


def tower_forward(tower: nn.Module, graphs, hidden_states: torch.Tensor, grid_thw: torch.Tensor):
    """transformers' Qwen2.5-VL tower forward, its block loop run by `run_blocks`."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    helpers = _helpers()
    assert helpers is not None  # the part checked
    position_ids_of, seqlens_of, windows_of, max_seqlen_of = helpers
    config = tower.config
    position_ids = position_ids_of(grid_thw, tower.spatial_merge_size)
    cu_full, max_full = seqlens_of(grid_thw, config)
    window_index, cu_window = windows_of(
        grid_thw,
        spatial_merge_size=tower.spatial_merge_size,
        window_size=tower.window_size,
        patch_size=tower.patch_size,
    )
    max_window = max_seqlen_of(cu_window, config, kwarg_name="max_window_seqlen")

    embedded = tower.patch_embed(hidden_states)
    # a patch embedding with trainable parameters needs its gradient, which the graphs do not give
    upstream = embedded.grad_fn is not None
    n = embedded.shape[0]
    hidden = tower.permute_input_for_window_attn(embedded, window_index, seq_len=n)
    if hidden.requires_grad and not upstream and not any(p.requires_grad for p in tower.blocks.parameters()):
        # transformers' enable_input_require_grads marks the patch embeddings as needing a gradient
        # (for reentrant checkpoints), but nothing trainable lies behind them or in the blocks: a
        # frozen tower (the default LoRA parts) would save its blocks' tensors and run their
        # backward for a gradient no one reads.  The merger after them takes its own.
        hidden = hidden.detach()
    cos, sin = (
        tower.permute_input_for_window_attn(f, window_index, seq_len=n)
        for f in tower.rotary_pos_emb(hidden, position_ids)
    )
    hidden = run_blocks(tower, graphs, hidden, cos, sin, cu_full, max_full, cu_window, max_window, upstream)
    merged = tower.merger(hidden)[torch.argsort(window_index), :]
    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=merged)


def _blocks(tower: nn.Module, hidden, cos, sin, cu_full, max_full, cu_window, max_window):
    full = set(tower.fullatt_block_indexes)
    for i, block in enumerate(tower.blocks):
        hidden = block(
            hidden,
            cu_seqlens=cu_full if i in full else cu_window,
            max_seqlen=max_full if i in full else max_window,
            position_embeddings=(cos, sin),
        )
    return hidden


def run_blocks(tower: nn.Module, graphs, hidden, cos, sin, cu_full, max_full, cu_window, max_window, upstream):
    """The blocks' output, replayed from the tower's graphs where the call allows, else eagerly.
    `upstream`: the patch embeddings carry a gradient path to trainable parameters."""
    out = None
    if not upstream:
        out = _replayed(tower, graphs, hidden, cos, sin, cu_full, max_full, cu_window, max_window)
    if out is None:
        return _blocks(tower, hidden, cos, sin, cu_full, max_full, cu_window, max_window)
    return out


def _replayed(tower, graphs, hidden, cos, sin, cu_full, max_full, cu_window, max_window):
    from ..cuda_graphs import capturable
    from ..graph_layout import keyed_slots, layout_of

    if not tower.training or not capturable(hidden):
        return None  # evaluation; the CPU
    blocks = tower.blocks
    if len(blocks) == 0 or uncapturable_checkpoints(blocks[0]):
        return None
    # transformers' enable_input_require_grads hooks the tower's patch embedding (its input embedding
    # layer) to mark its output as needing a gradient.  Nothing trainable lies behind it (`upstream`
    # said so), so the captured blocks take a leaf that needs a gradient, as the eager ones would,
    # and no one reads that leaf's own gradient
    leaf = hidden.requires_grad
    if not (isinstance(max_full, int) and isinstance(max_window, int)):
        return None
    layout = layout_of(graphs, blocks)
    grad = torch.is_grad_enabled()
    head = (
        "vision_blocks",
        grad,
        leaf,
        tuple(hidden.shape),
        hidden.dtype,
        cos.dtype,
        tuple(cos.shape),
        tuple(cu_full.shape),
        max_full,
        tuple(cu_window.shape),
        max_window,
        *call_modes(layout, blocks[0]),
    )
    key, slots = keyed_slots(blocks, layout, head, graphs.would_capture)
    if slots is None:
        return None
    trainable = [slot for slot in slots if slot[2].requires_grad]
    backward = grad and bool(trainable)

    def step(hidden_, cos_, sin_, cu_full_, cu_window_):
        if leaf:
            hidden_ = hidden_.detach().requires_grad_()
        return _blocks(tower, hidden_, cos_, sin_, cu_full_, max_full, cu_window_, max_window)

    inputs = (hidden, cos, sin, cu_full, cu_window)
    return graphs.replay(key, step, inputs, trainable if backward else [], backward=backward)


def graph_stats(tower: nn.Module):
    """The tower graphs' counters (captures, replays, eager calls, failures), or None when unpatched."""
    graphs = tower.__dict__.get(M.TOWER_GRAPHS)
    return None if graphs is None else graphs.stats
