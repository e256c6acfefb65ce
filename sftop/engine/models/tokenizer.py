"""Find a model's files (hub id, local directory or built-in) and load its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sftop.engine.errors import ModelError
from sftop.engine.models.demo import DEMO_NAME, ensure_demo_model, is_builtin

# Tokens some families reserve for padding; used before falling back to EOS.
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")


def hub_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep in name and Path(name).expanduser().exists()


def resolve_model_source(model_section) -> str:
    """What to hand `from_pretrained`: a local directory for builtin/local models, else the hub id."""
    name = model_section.name
    if is_builtin(name):
        from sftop.engine.models.demo_vlm import DEMO_VLM_NAME, ensure_demo_vlm

        if name == DEMO_VLM_NAME:
            return str(ensure_demo_vlm())
        if name != DEMO_NAME:
            raise ModelError(
                f"Unknown built-in model `{name}`",
                where="model.name",
                hint=f"The built-in models are `{DEMO_NAME}` and `{DEMO_VLM_NAME}`; otherwise give a hub id or a local directory",
            )
        return str(ensure_demo_model())
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelError(
                f"Model directory {path} does not exist",
                where="model.name",
                hint="Check the path, or give a hub id such as Qwen/Qwen2.5-0.5B-Instruct",
            )
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} has no config.json, so it is not a Hugging Face model directory",
                where="model.name",
                hint="Point model.name at the folder that holds config.json and the weights",
            )
        return str(path)
    return name


def hub_call(model_section, what: str, load):
    """Run `load(local_files_only=...)`: cache first, then the hub, with errors a user can act on.

    Trying the cache first keeps runs working offline and avoids a network round trip per file.
    """
    name = model_section.name
    source = resolve_model_source(model_section)
    if source != name or Path(source).is_dir():
        try:
            return load(source, local_files_only=True)
        except Exception as exc:
            if _damaged_weights(exc):
                raise _damaged_error(source, what, exc, hint=f"Copy or download the model to {source} again") from None
            if not isinstance(exc, (OSError, ValueError)):
                raise
            raise ModelError(f"Cannot load the {what} from {source}: {exc}", where="model.name") from None
    try:
        return load(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        if _damaged_weights(exc):
            raise _damaged_error(
                name, what, exc, hint=f"Download it again: `hf download {name} --force-download`"
            ) from None
        pass  # not (fully) in the local cache
    except Exception as exc:
        if not _damaged_weights(exc):
            raise
        raise _damaged_error(
            name, what, exc, hint=f"Download it again: `hf download {name} --force-download`"
        ) from None
    if hub_offline():
        raise ModelError(
            f"`{name}` is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE is set)",
            where="model.name",
            hint=f"While online, run `hf download {name}`, or set model.name to a local model directory",
        )
    from sftop.engine.hub_reach import OFFLINE_HINT, unreachable_reason

    unreachable = unreachable_reason()
    if unreachable is not None:
        raise ModelError(
            f"`{name}` is not in the local Hugging Face cache and the hub cannot be reached: {unreachable}",
            where="model.name",
            hint=f"{OFFLINE_HINT}; or, on a machine that is online, run `hf download {name}`, "
            "or set model.name to a local model directory",
        )
    try:
        return load(source, local_files_only=False)
    except Exception as exc:  # noqa: BLE001 - translated into one user-facing error
        raise _hub_error(name, what, exc) from None


# What safetensors and torch say about a weights file cut short or overwritten with garbage.
_DAMAGED = (
    "safetensor",
    "deserializing header",
    "file not fully covered",
    "pytorchstreamreader",
    "unexpected eof",
    "invalid load key",
    "failed finding central directory",
)


def _damaged_weights(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, EOFError) or any(word in text for word in _DAMAGED)


def _damaged_error(where: str, what: str, exc: BaseException, hint: str) -> ModelError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return ModelError(
        f"The {what} weights in {where} cannot be read ({first}): a weights file is truncated or damaged, "
        "as an interrupted download or copy leaves it",
        where=str(where),
        hint=hint,
    )


def _hub_error(name: str, what: str, exc: Exception) -> ModelError:
    kind = type(exc).__name__
    text = str(exc)
    if "Gated" in kind or "gated" in text.lower() or "401" in text or "403" in text:
        return ModelError(
            f"`{name}` is gated on the Hugging Face hub and this machine is not allowed to download it",
            where="model.name",
            hint="Accept the licence on the model's hub page, then run `hf auth login` (or set HF_TOKEN)",
        )
    if "RepositoryNotFound" in kind or "404" in text or "is not a local folder and is not a valid model" in text:
        return ModelError(
            f"No model `{name}` on the Hugging Face hub, and no local directory of that name",
            where="model.name",
            hint="Check the spelling (ORG/NAME), or give the path of a local model directory",
        )
    if "Revision" in kind:
        return ModelError(
            f"`{name}` has no revision as given in model.revision",
            where="model.revision",
            hint="Use a branch, tag or commit that exists, or remove model.revision",
        )
    if any(s in kind for s in ("Connection", "Timeout", "Offline")) or "connect" in text.lower():
        return ModelError(
            f"Cannot reach the Hugging Face hub to download `{name}`, and it is not in the local cache",
            where="model.name",
            hint=f"While online, run `hf download {name}`, or set model.name to a local model directory",
        )
    return ModelError(f"Cannot load the {what} of `{name}`: {kind}: {text}", where="model.name")


def ensure_pad_token(tokenizer) -> Any:
    """Batches need a pad token; many base models ship without one."""
    if tokenizer.pad_token is not None:
        return tokenizer
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab:
            tokenizer.pad_token = candidate
            return tokenizer
    if tokenizer.eos_token is None:
        raise ModelError(
            "The tokenizer has neither a pad token nor an end-of-sequence token",
            where="model.name",
            hint="Use a tokenizer that defines eos_token (most chat models do)",
        )
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model_section):
    """The tokenizer for `preset.model`, with a pad token. Raises ModelError with a fix on failure."""
    from transformers import AutoTokenizer

    def load(source, local_files_only):
        return AutoTokenizer.from_pretrained(
            source,
            revision=model_section.revision,
            trust_remote_code=model_section.trust_remote_code,
            local_files_only=local_files_only,
        )

    return ensure_pad_token(hub_call(model_section, "tokenizer", load))
