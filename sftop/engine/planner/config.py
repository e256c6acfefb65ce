"""Read a model's config (shapes only, never weights) so the planner can size the run before loading."""

from __future__ import annotations

from typing import Any

from sftop.engine.errors import ModelError


def load_model_config(preset: Any) -> Any:
    """The transformers config of `preset.model`, without downloading or loading weights.

    `builtin:demo-tiny` is described from its definition in sftop.engine.models.demo (no build);
    popular hub models not in the local cache come from the published shapes in known_shapes.py;
    any other local directory or hub id goes through AutoConfig, cache first, with the same
    actionable errors as model loading (offline, gated, not found).
    """
    section = preset.model
    name = section.name
    if name.startswith("builtin:"):
        try:
            from sftop.engine.models import demo
        except ImportError as exc:
            raise ModelError(
                f"The built-in model `{name}` is not available in this install ({exc})",
                where="model.name",
                hint="Reinstall sftop, or give a hub id or a local model directory",
            ) from None
        if name != demo.DEMO_NAME:
            raise ModelError(
                f"Unknown built-in model `{name}`",
                where="model.name",
                hint=f"The built-in model is `{demo.DEMO_NAME}`; otherwise give a hub id or a local directory",
            )
        from transformers import LlamaConfig

        # The tokenizer adds a few special tokens to the base vocabulary; a little over is harmless here.
        return LlamaConfig(vocab_size=demo.VOCAB_SIZE + 8, tie_word_embeddings=False, **demo.MODEL_SIZE)

    from transformers import AutoConfig

    from sftop.engine.planner.known_shapes import known_config

    table = known_config(name) if section.revision is None else None
    if table is not None:
        # A cached config.json wins; otherwise the published shape spares a hub round trip (and a
        # gated model's login) just to plan.
        try:
            return AutoConfig.from_pretrained(name, local_files_only=True,
                                              trust_remote_code=section.trust_remote_code)
        except (OSError, ValueError):
            return table

    try:
        from sftop.engine.models.tokenizer import hub_call
    except ImportError:
        hub_call = None

    def load(source: str, local_files_only: bool) -> Any:
        return AutoConfig.from_pretrained(
            source,
            revision=section.revision,
            trust_remote_code=section.trust_remote_code,
            local_files_only=local_files_only,
        )

    if hub_call is not None:
        return hub_call(section, "config", load)
    try:
        return load(name, False)
    except Exception as exc:  # noqa: BLE001 - one user-facing error
        raise ModelError(
            f"Cannot read the config of `{name}`: {exc}",
            where="model.name",
            hint="Check the name, log in for gated models (`hf auth login`), or give a local model directory",
        ) from None
