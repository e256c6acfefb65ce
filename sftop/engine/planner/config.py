"""Read a model's config (shapes only, never weights) so the planner can size the run before loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftop.engine.errors import ModelError
from sftop.engine.planner.estimate import ModelShape


def load_model_config(preset: Any) -> Any:
    """The transformers config of `preset.model`, without downloading or loading weights.

    `builtin:demo-tiny` is described from its definition in sftop.engine.models.demo (no build);
    popular hub models not in the local cache come from the published shapes in known_shapes.py;
    any other local directory or hub id is read from its config.json, cache first, with the same
    actionable errors as model loading (offline, gated, not found). Plain dicts where possible:
    `sftop plan` does not import torch.
    """
    section = preset.model
    name = section.name
    if name.startswith("builtin:"):
        from sftop.engine.models import demo, demo_vlm

        if name == demo_vlm.DEMO_VLM_NAME:
            return demo_vlm.demo_vlm_config()
        if name != demo.DEMO_NAME:
            raise ModelError(
                f"Unknown built-in model `{name}`",
                where="model.name",
                hint=f"The built-in models are `{demo.DEMO_NAME}` and `{demo_vlm.DEMO_VLM_NAME}`; otherwise "
                "give a hub id or a local directory",
            )
        # The tokenizer adds a few special tokens to the base vocabulary; a little over is harmless here.
        return dict(model_type="llama", vocab_size=demo.VOCAB_SIZE + 8, tie_word_embeddings=False, **demo.MODEL_SIZE)

    from sftop.engine.planner.known_shapes import known_config

    def load(source: str, local_files_only: bool) -> Any:
        return _read_config(source, section, local_files_only)

    table = known_config(name) if section.revision is None else None
    if table is not None:
        # A cached config.json wins; otherwise the published shape spares a hub round trip (and a
        # gated model's login) just to plan.
        try:
            return load(name, True)
        except (OSError, ValueError):
            return table

    from sftop.engine.models.tokenizer import hub_call

    return hub_call(section, "config", load)


def _read_config(source: str, section: Any, local_files_only: bool) -> Any:
    """config.json as a dict, read without transformers (whose import pulls in torch) so that
    planning stays light; a config that leans on transformers' defaults for its sizes (some
    vision-language models' text_config) goes through AutoConfig instead."""
    if Path(source).is_dir():
        path = Path(source) / "config.json"
        if not path.is_file():
            raise OSError(f"{source} has no config.json")
    else:
        from huggingface_hub import hf_hub_download

        path = Path(
            hf_hub_download(source, "config.json", revision=section.revision, local_files_only=local_files_only)
        )
    config = json.loads(path.read_text(encoding="utf-8"))
    try:
        ModelShape.from_config(config)
        return config
    except ValueError:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            source,
            revision=section.revision,
            trust_remote_code=section.trust_remote_code,
            local_files_only=local_files_only,
        )
