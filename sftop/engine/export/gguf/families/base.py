"""What every decoder family shares: how a Hugging Face causal LM's hyper-parameters and tensors
become GGUF metadata and `blk.N.*` tensors.

A family module says only what is its own (the GGUF architecture, extra keys, renamed or
transformed tensors). Names come from the `gguf` package's constants (`MODEL_TENSOR`,
`TENSOR_NAMES`), so a tensor that llama.cpp does not know for this architecture is an error here,
not a file llama.cpp refuses later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch
from gguf import MODEL_TENSOR as T

from sftop.engine.errors import SftopError

# Hugging Face names inside `model.layers.N.`, the same in every family here.
LAYER_TENSORS: dict[str, T] = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
}
TOP_TENSORS: dict[str, T] = {
    "model.embed_tokens": T.TOKEN_EMBD,
    "model.norm": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
}

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PlannedTensor:
    """One tensor of the file: its GGUF name, the source tensor, and a shape-keeping transform."""

    name: str
    source: torch.Tensor
    transform: Transform | None = None

    def value(self) -> torch.Tensor:
        tensor = self.source.detach()
        return self.transform(tensor) if self.transform is not None else tensor


class Family:
    """A decoder-only causal LM family. Subclasses set `arch` and `model_types`, and override hooks."""

    arch: gguf.MODEL_ARCH
    model_types: tuple[str, ...] = ()
    layer_tensors: dict[str, T] = LAYER_TENSORS

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    # --- hyper-parameters ---------------------------------------------------------------------
    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def rope_theta(self, config) -> float:
        params = getattr(config, "rope_parameters", None) or {}
        return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))

    def write_hparams(self, writer: gguf.GGUFWriter, config) -> None:
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_freq_base(self.rope_theta(config))
        head_dim = self.head_dim(config)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
        self.check_rope_scaling(config)

    def validate(self, config) -> None:
        """Raise now what `write_hparams` would raise later (e.g. an unsupported rope scaling),
        by writing the hyper-parameters into a writer that has no file."""
        self.write_hparams(gguf.GGUFWriter(None, self.arch_name), config)

    def check_rope_scaling(self, config) -> None:
        params = getattr(config, "rope_parameters", None) or {}
        kind = params.get("rope_type", "default")
        if kind not in ("default", *self.rope_types_written):
            raise SftopError(
                f"{config.model_type} with rope_type `{kind}` cannot be written to GGUF by sftop yet",
                where="config.json: rope_parameters",
                hint="Export a merged Hugging Face model instead (`sftop export RUN --merged`)",
            )

    rope_types_written: tuple[str, ...] = ()

    # --- tensors ------------------------------------------------------------------------------
    def tensor_name(self, kind: T, bid: int | None = None) -> str:
        if kind not in gguf.MODEL_TENSORS[self.arch]:
            raise SftopError(f"GGUF architecture {self.arch_name} has no tensor {gguf.TENSOR_NAMES[kind]}")
        return gguf.TENSOR_NAMES[kind].format(bid=bid)

    def transform(self, kind: T, config) -> Transform | None:
        """A value change llama.cpp expects for this tensor kind (default: none)."""
        return None

    def plan(self, config, state_dict: dict[str, torch.Tensor]) -> list[PlannedTensor]:
        """Every tensor of the file, in file order; refuses any source tensor it does not place."""
        planned: list[PlannedTensor] = []
        left = dict(state_dict)
        tied = getattr(config, "tie_word_embeddings", False)
        if tied:
            left.pop("lm_head.weight", None)

        def place(hf_name: str, kind: T, bid: int | None = None) -> None:
            for suffix in ("weight", "bias"):
                key = f"{hf_name}.{suffix}"
                if key in left:
                    tensor = left.pop(key)
                    name = f"{self.tensor_name(kind, bid)}.{suffix}"
                    planned.append(PlannedTensor(name, tensor, self.transform(kind, config)))

        for hf_name, kind in TOP_TENSORS.items():
            if kind is T.OUTPUT and tied:
                continue
            place(hf_name, kind)
        for bid in range(config.num_hidden_layers):
            for hf_name, kind in self.layer_tensors.items():
                place(f"model.layers.{bid}.{hf_name}", kind, bid)
        planned.extend(self.extra_tensors(config))
        # Buffers such as rotary inverse frequencies are recomputed by every reader.
        unplaced = [k for k in left if not k.endswith(("rotary_emb.inv_freq", ".original_inv_freq"))]
        if unplaced:
            raise SftopError(
                f"{len(unplaced)} tensor(s) of this {config.model_type} model have no place in a GGUF file, "
                f"e.g. {unplaced[0]}",
                hint="This model has parts sftop's GGUF export does not know; export a merged Hugging Face "
                "model instead (`sftop export RUN --merged`)",
            )
        return planned

    def extra_tensors(self, config) -> list[PlannedTensor]:
        return []
