"""Part image_merge: a Qwen-VL model's image and video embeddings written into its token
embeddings by row, not by transformers' `masked_scatter`.

Why: transformers merges them with `inputs_embeds.masked_scatter(mask, features)`, where the mask
is the placeholder tokens' [batch, tokens, 1] broadcast to the embeddings' [batch, tokens, hidden].
On CUDA that op takes an int64 prefix sum of the embeddings' full shape (`empty(self.sizes(),
kLong)` in torch's kernel): for 4 rows of 1,024 tokens at Qwen2.5-VL-3B's hidden size of 2,048,
64 MiB beside the two embedding tensors.  With the tower and the language layers
replayed from CUDA graphs, this eager moment before the language layers is where a step's
allocations outside the graphs' pool peak (docs/benchmarks.md), so every one of those bytes adds
to the step's peak.

How: for a call with token ids, pixel values (or video frames) and no cache, the model's forward
becomes sftop's: it embeds the tokens, takes the features from transformers' own
`get_image_features` / `get_video_features`, finds the placeholder rows (their count checked
against the features, as transformers checks, with the same message), copies the features into
those rows with one `index_copy` (a new [batch x tokens, hidden] tensor; its backward hands each
side its gradient by the same index), computes the rotary positions with transformers' own
`compute_3d_position_ids` from the same arguments, and calls the stock forward with the merged
embeddings and those positions.  Everything after the merge is transformers'.  Generation (a
cache), embeddings handed in, and models without those methods keep the stock forward.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .forwards import FUSED, restore_forward, set_forward

MODEL_CLASSES = ("Qwen2VLModel", "Qwen2_5_VLModel")
_METHODS = ("get_input_embeddings", "get_image_features", "get_video_features", "compute_3d_position_ids")
# (pixel values, grid, placeholder token id in the config, features method) per modality
_MODALITIES = (
    ("pixel_values", "image_grid_thw", "image_token_id", "get_image_features"),
    ("pixel_values_videos", "video_grid_thw", "video_token_id", "get_video_features"),
)


def find_models(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in MODEL_CLASSES]


def patch_image_merge(model: nn.Module) -> str:
    """Install the part on every Qwen-VL model inside `model`; "fused" or "stock: why"."""
    found = find_models(model)
    if not found:
        return f"stock: only {' and '.join(MODEL_CLASSES)} merge image features this way"
    for m in found:
        missing = [name for name in _METHODS if not callable(getattr(m, name, None))]
        if missing:
            return f"stock: {type(m).__name__} has no {', '.join(missing)}"
        if getattr(m.config, "image_token_id", None) is None:
            return f"stock: {type(m).__name__}'s config names no image_token_id"
    for m in found:
        set_forward(m, _forward, "image_merge")
    return FUSED


def unpatch_image_merge(model: nn.Module) -> None:
    for m in find_models(model):
        restore_forward(m)


def _forward(self, base, *args, **kwargs):
    if len(args) > 1:  # positional arguments past the token ids: the stock forward maps them
        return base(*args, **kwargs)
    input_ids = args[0] if args else kwargs.pop("input_ids", None)
    if (
        input_ids is None
        or kwargs.get("inputs_embeds") is not None
        or kwargs.get("past_key_values") is not None
        or all(kwargs.get(values_key) is None for values_key, *_ in _MODALITIES)
    ):
        return base(input_ids=input_ids, **kwargs)
    # the stock forward hands what its signature does not name on to the feature methods
    named = _named_arguments(type(self), "forward")
    features_kwargs = {k: v for k, v in kwargs.items() if k not in named}
    embeds = self.get_input_embeddings()(input_ids)
    for values_key, grid_key, token_key, method in _MODALITIES:
        values = kwargs.pop(values_key, None)
        if values is None:
            continue
        features = getattr(self, method)(values, kwargs.get(grid_key), **features_kwargs).pooler_output
        features = torch.cat(list(features), dim=0).to(embeds.device, embeds.dtype)
        embeds = merge_rows(embeds, input_ids == getattr(self.config, token_key), features, values_key)
    if kwargs.get("position_ids") is None:
        kwargs["position_ids"] = _positions(self, input_ids, embeds, kwargs)
    kwargs["inputs_embeds"] = embeds
    return base(input_ids=None, **kwargs)


_NAMED: dict[tuple[type, str], frozenset[str]] = {}


def _named_arguments(cls: type, method: str) -> frozenset[str]:
    """The arguments `cls.<method>` names (its **kwargs excluded), looked up once per class: a
    signature read costs host time every step."""
    key = (cls, method)
    if key not in _NAMED:
        params = inspect.signature(getattr(cls, method)).parameters.values()
        _NAMED[key] = frozenset(p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD)
    return _NAMED[key]


def _positions(model: nn.Module, input_ids: torch.Tensor, embeds: torch.Tensor, call: dict):
    """transformers' rotary positions for this call, from the arguments the stock forward gives."""
    accepted = _named_arguments(type(model), "compute_3d_position_ids")
    args = {
        "input_ids": input_ids,
        "inputs_embeds": embeds,
        "image_grid_thw": call.get("image_grid_thw"),
        "video_grid_thw": call.get("video_grid_thw"),
        "second_per_grid_ts": call.get("second_per_grid_ts"),
        "attention_mask": call.get("attention_mask"),
        "past_key_values": call.get("past_key_values"),
        "mm_token_type_ids": call.get("mm_token_type_ids"),
    }
    return model.compute_3d_position_ids(**{k: v for k, v in args.items() if k in accepted})


def merge_rows(embeds: torch.Tensor, placeholders: torch.Tensor, features: torch.Tensor, what: str) -> torch.Tensor:
    """`embeds` [batch, tokens, hidden] with the rows where `placeholders` [batch, tokens] is true
    replaced, in order, by the rows of `features` [n, hidden]: what
    `embeds.masked_scatter(placeholders[..., None], features)` gives, without its prefix sum over
    every element.  Raises ValueError (transformers' check) when the counts differ."""
    hidden = embeds.shape[-1]
    rows = placeholders.reshape(-1).nonzero().squeeze(1)
    if rows.numel() != features.shape[0] or features.shape[-1] != hidden:
        kind = "Video" if "video" in what else "Image"
        raise ValueError(
            f"{kind} features and {kind.lower()} tokens do not match, tokens: {rows.numel()}, "
            f"features: {features.shape[0]}"
        )
    return embeds.reshape(-1, hidden).index_copy(0, rows, features).view(embeds.shape)
