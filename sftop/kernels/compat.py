"""Every name sftop reads from another package that the package does not promise to keep.

The kernels and the patcher reach into torch, transformers, PEFT, TRL and bitsandbytes at a few
places their public APIs do not cover: a C symbol, a private attribute, a module-level function
that HF's attention calls by name.  All of those go through this module, so that an upstream
rename breaks one line here (and `tests/compat/test_compat.py`, whose failures name the package
and version), never a kernel deep inside a training step.  `TESTED` holds the ranges of these
packages that sftop is tested with: its dependency ranges in pyproject.toml, word for word
(tests/compat checks that they agree).

Importing this module imports nothing heavy: each function imports what it touches.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Callable

# The releases these names are tested with: pyproject.toml's dependency ranges, whose lower bound
# is the version CI pins and whose top the newest-releases CI run tests.
TESTED: dict[str, str] = {
    "torch": ">=2.13,<2.14",
    "transformers": ">=5.17,<6",
    "peft": ">=0.21,<0.22",
    "trl": ">=1.16,<2",
    "bitsandbytes": ">=0.50,<0.51",
}


def installed_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def moved(package: str, what: str) -> str:
    """The message for an upstream name that is gone: which package, which version, what to do."""
    tested = TESTED[package]
    return (
        f"{package} {installed_version(package)}: {what} is missing or changed; sftop relies on it "
        f"through sftop/kernels/compat.py and is tested with {package}{tested}. "
        f"Install it with `pip install '{package}{tested}'`, or update compat.py for this release."
    )


# --------------------------------------------------------------------------- torch

RAW_STREAM = "_cuda_getCurrentRawStream"


def cuda_raw_stream(device_index: int) -> int:
    """The current CUDA stream of a device as the raw pointer C functions take (torch private)."""
    import torch

    return getattr(torch._C, RAW_STREAM)(device_index)


# --------------------------------------------------------------------------- bitsandbytes

# Importing this module declares the ctypes argument types of bitsandbytes' CUDA entry points.
BNB_CUDA_OPS = "bitsandbytes.backends.cuda.ops"


def bnb_dequantize_symbol(dtype_name: str, quant_type: str | None = None) -> str:
    """The C function that dequantises blockwise: `(code, A, absmax, out, blocksize, n, stream)`.
    With a `quant_type` ("nf4"/"fp4") the 4-bit one, into `dtype_name` ("fp32"/"fp16"/"bf16")."""
    return f"cdequantize_blockwise_{dtype_name}" + (f"_{quant_type}" if quant_type else "")


def bnb_cuda_library() -> Any | None:
    """bitsandbytes' native CUDA library once its CUDA backend has declared the argument types, or
    None where it cannot be loaded (no GPU build, no CUDA runtime)."""
    import importlib

    try:
        importlib.import_module(BNB_CUDA_OPS)
        from bitsandbytes.cextension import lib
    except (ImportError, OSError, RuntimeError, AttributeError):
        # AttributeError: a CPU-only torch lacks the CUDA stream function that module reads
        return None
    return lib if getattr(lib, "compiled_with_cuda", False) else None


def bnb_c_function(lib: Any, name: str) -> Callable[..., Any] | None:
    """`lib.name` when it is a ctypes function with declared argument types, else None: a 64-bit
    device pointer passed without declared argtypes would be truncated to a C int."""
    fn = getattr(lib, name, None)
    # a ctypes function (ctypes does not export its base class): callable, with declared argtypes
    ok = callable(fn) and getattr(fn, "argtypes", None) is not None
    return fn if ok else None


# --------------------------------------------------------------------------- transformers

ATTN_IMPLEMENTATION = "_attn_implementation"
CHECKPOINT_FUNCTION = "_gradient_checkpointing_func"
ROPE_FUNCTION = "apply_rotary_pos_emb"


def attn_implementation(config: Any) -> str | None:
    """The attention backend a loaded model's config runs (set by `set_attn_implementation`)."""
    return getattr(config, ATTN_IMPLEMENTATION, None)


def set_config_attn_implementation(config: Any, name: str | None) -> None:
    """Make the modules reading this one config run the attention registered as `name`.

    For a vision tower, whose attention reads the tower's own sub-config: the model's
    `set_attn_implementation` would switch the language model's attention as well."""
    setattr(config, ATTN_IMPLEMENTATION, name)


def checkpoint_function(module: Any, own: bool = False) -> Callable[..., Any] | None:
    """The function a checkpointed layer runs itself through (set by `gradient_checkpointing_enable`
    on each layer); `own`: only when set on this instance, not inherited."""
    if own and CHECKPOINT_FUNCTION not in vars(module):
        return None
    return getattr(module, CHECKPOINT_FUNCTION, None)


def set_checkpoint_function(module: Any, fn: Callable[..., Any]) -> None:
    setattr(module, CHECKPOINT_FUNCTION, fn)


def rope_function(modeling: Any) -> Callable[..., Any] | None:
    """The module-level RoPE function a family's attention looks up by name at call time."""
    fn = getattr(modeling, ROPE_FUNCTION, None)
    return fn if callable(fn) else None


def set_rope_function(modeling: Any, fn: Callable[..., Any]) -> None:
    setattr(modeling, ROPE_FUNCTION, fn)


# --------------------------------------------------------------------------- PEFT

PEFT_LORA_MODULE = "peft.tuners.lora"
PEFT_LORA_CLASSES = ("Linear", "Linear4bit", "Linear8bitLt")
# what the fast LoRA paths read on a PEFT LoRA layer: per-adapter ModuleDicts / dicts, and state
PEFT_LORA_ATTRIBUTES = (
    "base_layer",
    "lora_A",
    "lora_B",
    "lora_dropout",
    "scaling",
    "active_adapters",
    "disable_adapters",
    "merged",
)


def is_peft_lora_layer(module: Any) -> bool:
    cls = type(module)
    return (
        cls.__module__.startswith(PEFT_LORA_MODULE)
        and cls.__name__ in PEFT_LORA_CLASSES
        and hasattr(module, "lora_A")
        and hasattr(module, "base_layer")
    )


def lora_weights(layer: Any, adapter: str) -> tuple[Any, Any, float]:
    """(A weight [r, in], B weight [out, r], scale) of one adapter on a PEFT LoRA layer."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter])


# --------------------------------------------------------------------------- transformers Trainer / TRL

TRAINER_PREPARE_INPUTS = "_prepare_inputs"
TRAINER_TOKEN_COUNT = "_total_train_tokens"
TRL_METRICS = "_metrics"


def trainer_prepare_inputs(trainer: Any, batch: Any) -> Any:
    """The batch moved to the device the way the training loop does it (Trainer private)."""
    return getattr(trainer, TRAINER_PREPARE_INPUTS)(batch)


def reset_trainer_counters(trainer: Any) -> None:
    """Forget a batch that was not training data: TRL's logged metrics and Trainer's token count."""
    metrics = getattr(trainer, TRL_METRICS, None)
    if metrics is not None:
        metrics["train"].clear()
    if hasattr(trainer, TRAINER_TOKEN_COUNT):
        setattr(trainer, TRAINER_TOKEN_COUNT, 0)
