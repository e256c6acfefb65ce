"""Unsloth as a peer in the benchmarks: its own process, imported first, offline, its own TRL.

Unsloth patches transformers, TRL and PEFT when it is imported, and asks to be imported before
them. So a benchmark runs each Unsloth measurement in a subprocess of its own (never in the process
that measures sftop) and calls `unavailable()` there before anything else: where Unsloth cannot be
imported (not installed, a TRL release it refuses, no GPU) the measurement is reported as not
measured, with the reason, and the other paths run.

Unsloth 2026.10 accepts older TRL releases than sftop does. `--peer-pythonpath DIRS` names folders
put first on that subprocess's PYTHONPATH only (the folder holding Unsloth and the one holding the
TRL it accepts); the sftop paths keep the environment they were started with.

Nothing is downloaded: the models are random-init checkpoints saved to a local directory with a
tokenizer (and, for vision models, a processor) beside them, because Unsloth's loaders read a
directory; the subprocess runs with the Hugging Face offline switches on and Unsloth's usage
statistics off, and Unsloth's compiled-module cache goes to a temporary folder, not the working
directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence

# Read by huggingface_hub, transformers, datasets and Unsloth at import time. With them Unsloth
# neither fetches its model-name mapper nor its statistics README, and resolves a local directory
# without asking the hub about it.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
}
HELP = "folders put first on the Unsloth paths' PYTHONPATH (Unsloth, and the TRL release it accepts)"
# LoRA on the seven projections of a Llama-like decoder: "all-linear" for these models
LANGUAGE_LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def compile_cache_dir() -> str:
    """Where Unsloth writes the modules it generates and compiles (by default `./unsloth_compiled_cache`)."""
    return os.path.join(tempfile.gettempdir(), "sftop-bench-unsloth-compiled-cache")


def environment(peer_pythonpath: str, pythonpath: str | None = None) -> dict[str, str]:
    """The variables an Unsloth subprocess runs with, on top of the caller's environment."""
    env = {**OFFLINE_ENV, "UNSLOTH_COMPILE_LOCATION": compile_cache_dir()}
    inherited = os.environ.get("PYTHONPATH", "") if pythonpath is None else pythonpath
    if peer_pythonpath:
        env["PYTHONPATH"] = peer_pythonpath + (os.pathsep + inherited if inherited else "")
    elif pythonpath is not None:
        env["PYTHONPATH"] = inherited
    return env


def command(cmd: Sequence[str], peer_pythonpath: str, pythonpath: str | None = None) -> list[str]:
    """`cmd` run through `env` with `environment()`, for callers that start every path the same way."""
    return ["env", *(f"{k}={v}" for k, v in environment(peer_pythonpath, pythonpath).items()), *cmd]


def unavailable(*names: str) -> str | None:
    """Import Unsloth (and `names` from it) in this process; None once done, else why it cannot run.

    Call it before transformers, TRL or PEFT are imported: Unsloth patches them on import."""
    for key, value in OFFLINE_ENV.items():  # also when a worker was started by hand
        os.environ.setdefault(key, value)
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", compile_cache_dir())
    try:
        import unsloth

        for name in names:
            getattr(unsloth, name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or Unsloth refusing this TRL / GPU / platform
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")
    return None


def not_measured(why: str) -> str:
    """The line a benchmark prints for an Unsloth path that could not run."""
    return (
        f"not measured: Unsloth cannot be imported here ({why}); install it, or pass --peer-pythonpath "
        "with the folders holding it and the TRL it accepts"
    )


def versions() -> dict[str, str]:
    """The versions the Unsloth process ran with (its TRL differs from sftop's)."""
    import importlib.metadata as md

    out = {}
    for name in ("unsloth", "unsloth_zoo", "trl", "transformers", "peft", "torch"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "?"
    try:  # the one imported, which is what ran (PYTHONPATH can shadow the installed metadata)
        import trl

        out["trl"] = trl.__version__
    except Exception:  # noqa: BLE001
        pass
    return out


def language_model(model_dir: str, max_seq_length: int, four_bit: bool, targets: Sequence[str] = LANGUAGE_LORA):
    """Unsloth's text recipe: `FastLanguageModel.from_pretrained` on the local directory, then
    `get_peft_model` with LoRA r=16, alpha 16, no dropout and its offloaded checkpointing."""
    import torch
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_dir, max_seq_length=max_seq_length, dtype=torch.bfloat16, load_in_4bit=four_bit
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=list(targets),
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )
    return model, tokenizer


def vision_model(model_dir: str, max_seq_length: int, four_bit: bool, vision: bool = True):
    """Unsloth's vision recipe: `FastVisionModel.from_pretrained` (which quantises what it chooses
    under 4-bit), then LoRA r=16, alpha 16 on the language layers' attention and MLP, and on the
    vision layers' too unless `vision` is False."""
    import torch
    from unsloth import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(
        model_dir,
        max_seq_length=max_seq_length,
        dtype=torch.bfloat16,
        load_in_4bit=four_bit,
        use_gradient_checkpointing="unsloth",
    )
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=vision,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=16,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        random_state=0,
    )
    return model, processor


def word_tokenizer(vocab: int):
    """A word-level tokenizer covering `vocab` ids (t0 pad, t1 eos, t2 unk), built offline."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")


def checkpoint_dir(size_bytes: int) -> str | None:
    """Memory-backed /dev/shm when it exists and holds `size_bytes` with room to spare (an 8B
    checkpoint is 16 GB), else None: the system's temporary folder."""
    shm = "/dev/shm"
    fits = os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1.2 * size_bytes
    return shm if fits else None


def save_processing(directory: str, config) -> None:
    """A tokenizer (text models) or processor (vision models) beside a saved random checkpoint, built
    offline: loaders that read a directory, Unsloth's among them, load one from there. Vision models
    get sftop's offline processor for their family; their benchmarks feed token ids of their own."""
    if getattr(config, "vision_config", None) is not None:
        from sftop.engine.models.vision.registry import family_for_config

        family = family_for_config(config)
        if family is None:
            raise ValueError(f"no vision family for model type {config.model_type!r}: cannot build its processor")
        family.offline_processor().save_pretrained(directory)
        _declare_video_processor(directory, config.model_type)
    else:
        word_tokenizer(config.get_text_config().vocab_size).save_pretrained(directory)


def _declare_video_processor(directory: str, model_type: str) -> None:
    """sftop's offline processors handle images only, while `AutoProcessor` (which Unsloth's vision
    loader calls) builds the family's whole processor, video part included, and fails without its
    settings. Name the family's video processor in processor_config.json with the image processor's
    settings (it needs torchvision, as on the GPU machines; images are what the benchmarks feed)."""
    import json

    from transformers.models.auto import video_processing_auto as auto

    # without torchvision transformers blanks its mapping; the names it adds by hand stay readable
    video = auto.VIDEO_PROCESSOR_MAPPING_NAMES.get(model_type) or getattr(
        auto, "MISSING_VIDEO_PROCESSOR_MAPPING_NAMES", {}
    ).get(model_type)
    path = os.path.join(directory, "processor_config.json")
    if not video or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if "video_processor" in data:
        return
    image = {k: v for k, v in data.get("image_processor", {}).items() if k != "image_processor_type"}
    data["video_processor"] = {**image, "video_processor_type": video}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
