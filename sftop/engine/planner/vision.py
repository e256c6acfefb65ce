"""The image terms of a vision-language model's step: pixels, the vision tower and the projector.

A VLM's language model sees image tokens as ordinary sequence positions, so the text terms of
`estimate` already count them inside `max_length`. What the text model does not cover:
- the processor's pixel tensors (fp32 as the image processor returns them, plus the copy the model
  casts to its dtype), for every patch of every image in the micro-batch;
- the vision tower's activations: one layer's working set while it runs when the tower is frozen
  (autograd keeps nothing for a frozen tower fed by pixels), every layer's saved tensors when LoRA
  adapts it (only each layer's input under gradient checkpointing, plus one recomputed layer);
- the projector's activations, saved only when LoRA adapts it;
- LoRA parameters, gradients and optimizer states of adapted vision/projector layers.

The image load is the number of image tokens in a micro-batch, taken from the data check's exact
per-row counts: the largest possible micro-batch (the rows with the most image tokens together)
sizes memory, and its p95 is reported alongside. A mean would under-size every batch of big images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

FP32 = 4


def _mapping(config: Any) -> Mapping[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return vars(config)


@dataclass(frozen=True)
class VisionShape:
    """The vision tower and projector sizes that decide memory, read from a VLM config."""

    hidden: int  # the tower's width
    layers: int
    intermediate: int
    heads: int
    gated_mlp: bool
    patch_size: int
    temporal_patch: int  # Qwen's processors stack 2 frames per patch, even for a still image
    channels: int
    patches_per_token: int  # vision patches per image token (2x2 merge = 4, pixel shuffle, pooling)
    text_hidden: int  # the projector's output width

    @property
    def pixel_values_per_patch(self) -> int:
        return self.channels * self.temporal_patch * self.patch_size**2

    @property
    def projector_in(self) -> int:
        """Width of one image token entering the projector (merged patches side by side)."""
        return self.hidden * self.patches_per_token

    @classmethod
    def from_config(cls, config: Any) -> "VisionShape | None":
        cfg = _mapping(config)
        vision = _mapping(cfg.get("vision_config"))
        text = _mapping(cfg.get("text_config")) or cfg
        if not vision:
            return None
        # Qwen2-VL names the tower's width embed_dim and uses hidden_size for the projector's output.
        hidden = int(vision.get("embed_dim") or vision.get("hidden_size") or 0)
        layers = int(vision.get("depth") or vision.get("num_hidden_layers") or 0)
        layers += int(vision.get("num_global_layers") or 0)  # mllama's second encoder
        if not hidden or not layers:
            return None
        intermediate = int(vision.get("intermediate_size") or hidden * float(vision.get("mlp_ratio") or 4))
        heads = int(vision.get("num_heads") or vision.get("num_attention_heads") or 1)
        patch = int(vision.get("patch_size") or 14)
        if vision.get("spatial_merge_size"):
            per_token = int(vision["spatial_merge_size"]) ** 2
        elif cfg.get("scale_factor"):  # Idefics3 / SmolVLM pixel shuffle
            per_token = int(cfg["scale_factor"]) ** 2
        elif cfg.get("mm_tokens_per_image") and vision.get("image_size"):  # Gemma 3 average pooling
            per_token = max(1, (int(vision["image_size"]) // patch) ** 2 // int(cfg["mm_tokens_per_image"]))
        else:
            per_token = 1
        act = str(vision.get("hidden_act", "")).lower()
        text_hidden = int(vision.get("out_hidden_size") or text.get("hidden_size") or hidden)
        return cls(
            hidden=hidden,
            layers=layers,
            intermediate=intermediate,
            heads=heads,
            gated_mlp=act in ("silu", "swiglu"),
            patch_size=patch,
            temporal_patch=int(vision.get("temporal_patch_size") or 1),
            channels=int(vision.get("in_channels") or vision.get("num_channels") or 3),
            patches_per_token=per_token,
            text_hidden=text_hidden,
        )


@dataclass(frozen=True)
class ImageLoad:
    """Image tokens per row from the data check, summarised for any micro-batch size."""

    largest: tuple[int, ...]  # the largest per-row image token counts, descending (enough for any micro-batch)
    row_p95: int

    @classmethod
    def from_rows(cls, image_tokens_per_row: Iterable[int], keep: int = 4096) -> "ImageLoad":
        counts = sorted((int(c) for c in image_tokens_per_row), reverse=True)
        if not counts:
            return cls((), 0)
        ascending = counts[::-1]
        rank = max(1, -(-len(ascending) * 95 // 100))  # nearest rank: a count some row really has
        return cls(tuple(counts[:keep]), ascending[rank - 1])

    def max_tokens(self, rows: int) -> int:
        """The most image tokens any micro-batch of `rows` rows can hold: its largest rows together."""
        return sum(self.largest[:rows])

    def p95_tokens(self, rows: int) -> int:
        return min(self.max_tokens(rows), rows * self.row_p95)


@dataclass(frozen=True)
class VisionTraining:
    """Which vision-side parts LoRA adapts (from `lora.parts` and the family's default)."""

    vision: bool = False
    projector: bool = False
    attention: bool = True
    mlp: bool = True

    @classmethod
    def from_parts(cls, parts: Iterable[str]) -> "VisionTraining":
        chosen = set(parts)
        kinds = chosen & {"attention", "mlp"}
        return cls(
            vision="vision" in chosen,
            projector="projector" in chosen,
            attention=not kinds or "attention" in kinds,
            mlp=not kinds or "mlp" in kinds,
        )


def vision_lora_params(v: VisionShape, training: VisionTraining, r: int) -> int:
    """LoRA parameters on the vision tower's and projector's linears (r x (in + out) each)."""
    h, i = v.hidden, v.intermediate
    params = 0
    if training.vision:
        per_layer = 0
        if training.attention:
            per_layer += r * (h + 3 * h) + r * (h + h)  # fused qkv, output projection
        if training.mlp:
            per_layer += r * (h + i) * (3 if v.gated_mlp else 2)
        params += v.layers * per_layer
    if training.projector:
        params += r * (v.projector_in + v.projector_in) + r * (v.projector_in + v.text_hidden)
    return params


def layer_backward_bytes_per_patch(v: VisionShape, dt: int) -> int:
    """An adapted layer's backward, per patch: the recomputed layer's saved tensors, gradients of
    as many bytes at most, and the layer's working set.  Measured as the tower graphs' pool of a
    Qwen2.5-VL-3B step (4,096 patches, LoRA on attention and MLP, 2026-12-07): 373 MiB of
    transients, where this gives 404 and one forward working set 103 (docs/planner.md)."""
    return 2 * layer_saved_bytes_per_patch(v, dt) + layer_working_bytes_per_patch(v, dt)


def layer_saved_bytes_per_patch(v: VisionShape, dt: int) -> int:
    """What one adapted vision layer saves for backward, per patch: its norms' inputs and outputs,
    q/k/v, the attention output, the MLP's up (and gate) projections and activation."""
    h, i = v.hidden, v.intermediate
    mlp = (3 if v.gated_mlp else 2) * i
    return dt * (2 * h + 3 * h + h + h + mlp) + 2 * FP32  # + the norms' fp32 statistics


def layer_working_bytes_per_patch(v: VisionShape, dt: int) -> int:
    """One frozen layer's live tensors while it runs: input, q/k/v, attention out, MLP hidden."""
    h, i = v.hidden, v.intermediate
    return dt * (h + 3 * h + h + (2 if v.gated_mlp else 1) * i)


def image_terms(
    v: VisionShape,
    training: VisionTraining,
    *,
    image_tokens: int,
    dtype_bytes: int,
    checkpointing: str,
    lora_r: int,
    optimizer_bytes_per_param: int = 8,
) -> tuple[dict[str, int], int]:
    """(bytes of each image term held through the step, the vision forward's own transient peak)
    for a micro-batch holding `image_tokens` image tokens.

    The transient is a frozen tower's working set: live only while the tower runs, before the
    language model's forward, so it adds to the step's peak only when it outgrows the text terms.
    `checkpointing`: the plan's mode, "off", "on" or "offload" (the checkpointed blocks' inputs in
    host memory, by sftop's overlapped offload or transformers' save_on_cpu, both over the tower's
    blocks too: two of them on the GPU at a time).
    """
    dt = dtype_bytes
    patches = image_tokens * v.patches_per_token
    terms: dict[str, int] = {}
    # The processor returns fp32 pixels; the model casts a copy to its dtype before the patch embedding.
    terms["pixel_values"] = patches * v.pixel_values_per_patch * (FP32 + dt)
    transient = 0
    if training.vision:
        if checkpointing != "off":
            inputs = min(2, v.layers) if checkpointing == "offload" else v.layers
            saved = inputs * dt * v.hidden + layer_saved_bytes_per_patch(v, dt)  # inputs + one recomputed layer
        else:
            saved = v.layers * layer_saved_bytes_per_patch(v, dt)
        terms["vision_activations"] = patches * saved
    else:
        # Frozen: autograd saves nothing; one layer's working set and its output while it runs.
        transient = patches * (layer_working_bytes_per_patch(v, dt) + dt * v.hidden)
    if training.projector:
        terms["projector_activations"] = image_tokens * dt * (2 * v.projector_in + v.text_hidden)
    else:
        transient += image_tokens * dt * (v.projector_in + v.text_hidden)
    lora = vision_lora_params(v, training, lora_r)
    if lora:
        terms["vision_lora"] = lora * (FP32 + FP32 + optimizer_bytes_per_param)
    return terms, transient


def default_image_tokens(v: VisionShape, max_pixels: int) -> int:
    """Image tokens of one image at the pixel budget, for planning before any data is checked."""
    return max(1, max_pixels // (v.patch_size**2 * v.patches_per_token))


def vision_setup(
    setup: Any, preset: Any, model_config: Any, shape: Any, image_tokens_per_row: Any, notes: list[str]
) -> Any:
    """`setup` with a VLM's image load and adapted vision parts; unchanged for a text model."""
    from dataclasses import replace

    from sftop.engine.models.vision.loading import family_of

    if shape.vision is None:
        return setup
    family = family_of(model_config)  # a config object, or config.json's dict
    parts = preset.lora.parts
    if parts is None:
        parts = family.default_lora_parts if family is not None else ("language", "attention", "mlp")
    if image_tokens_per_row is not None:
        if getattr(setup, "preference", False):
            # DPO: a row is a pair, and its images go through the vision tower once per side (chosen
            # and rejected are two sequences of the same forward), so each pair's count is two rows'
            image_tokens_per_row = [n for n in image_tokens_per_row for _side in (0, 1)]
        load = ImageLoad.from_rows(image_tokens_per_row)
    else:
        max_pixels = getattr(preset.data, "max_pixels", None)
        if max_pixels is None:
            max_pixels = family.image_rules.max_pixels if family is not None else 1024 * 1024
        per_image = default_image_tokens(shape.vision, int(max_pixels))
        load = ImageLoad((per_image,) * 4096, per_image)
        notes.append(
            f"no data check yet: image memory sized for one image per row at {max_pixels} pixels "
            f"({per_image} image tokens)"
        )
    packed = setup.packed
    if packed:
        from sftop.engine.models.vision.packing import packing_refusal

        refusal = packing_refusal(family)
        if refusal is not None:
            packed = False
            notes.append(f"rows padded per micro-batch, not packed: {refusal}")
    return replace(setup, images=load, vision_training=VisionTraining.from_parts(parts), packed=packed)
