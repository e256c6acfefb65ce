"""Export a run's result: the LoRA adapter as is, or merged into the base model.

The merged model is a plain Hugging Face model directory (safetensors + tokenizer) that
`AutoModelForCausalLM.from_pretrained` loads without peft or sftop; a vision-language model's
also holds its processor, and loads with its family's class (`AutoModelForImageTextToText`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sftop.engine.errors import SftopError
from sftop.engine.rundir import RunDir

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _run_dir(run) -> RunDir:
    if isinstance(run, RunDir):
        return run
    return RunDir(Path(getattr(run, "path", run)))


def find_adapter(run_dir: RunDir) -> Path:
    """The final adapter, or for a stopped run the newest complete checkpoint's."""
    from sftop.engine.train.trainer import checkpoint_is_complete

    if (run_dir.adapter / "adapter_config.json").is_file():
        return run_dir.adapter
    for path in reversed(run_dir.complete_checkpoints()):
        if checkpoint_is_complete(path):
            return path
    raise SftopError(
        f"Run {run_dir.name} has no adapter and no complete checkpoint to export",
        where=str(run_dir.path),
        hint="Export a run that finished or saved a checkpoint (`sftop runs` lists them), or resume this one first",
    )


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SftopError(
            f"{out} already exists and is not empty",
            where=str(out),
            hint="Pass another --out directory, or delete this one first",
        )
    out.parent.mkdir(parents=True, exist_ok=True)


def _current_umask() -> int:
    try:  # Linux reports it without changing it, which matters when other threads create files
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(tree: Path) -> None:
    """An export is meant to be shared: give it the modes the user's umask gives new files
    (mkdtemp makes its directory owner-only, and some writers create owner-only files)."""
    mask = _current_umask()
    tree.chmod(0o777 & ~mask)
    for path in tree.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _finish(tmp: Path, out: Path) -> Path:
    _apply_umask(tmp)
    if out.exists():
        out.rmdir()  # empty (checked before): rename needs it gone
    os.replace(tmp, out)
    return out


def export_run(run, merged: bool = False, out: Path | None = None) -> Path:
    """Write the adapter (or the merged model) to `out` (default RUN_DIR/export-adapter|export-merged)."""
    run_dir = _run_dir(run)
    if not run_dir.path.is_dir():
        raise SftopError(f"No run directory at {run_dir.path}", hint="`sftop runs` lists the runs")
    adapter = find_adapter(run_dir)
    out = Path(out).expanduser() if out else run_dir.path / ("export-merged" if merged else "export-adapter")
    _prepare_out(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if merged:
            _write_merged(run_dir, adapter, tmp)
        else:
            for item in adapter.iterdir():
                # Only what a PEFT adapter + tokenizer needs; optimizer/RNG states stay behind.
                if (
                    item.is_file()
                    and not item.name.endswith((".pt", ".pth", ".bin"))
                    and item.name != "trainer_state.json"
                ):
                    shutil.copy2(item, tmp / item.name)
        return _finish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_merged(run_dir: RunDir, adapter: Path, tmp: Path) -> None:
    from sftop.engine.models.vision.loading import vision_family
    from sftop.engine.train.resources import check_disk_space

    section = _run_preset(run_dir).model
    family = vision_family(section)
    if family is not None:
        _write_merged_vision(section, family, _merge_dtype(section), adapter, tmp)
        return

    def room(params: int, itemsize: int) -> None:
        check_disk_space(tmp, {"merged model": params * itemsize})

    model, tokenizer = load_merged(run_dir, adapter, before_merge=room)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def _run_preset(run_dir: RunDir):
    from sftop.engine.presets import load_preset

    if not run_dir.preset.is_file():
        raise SftopError(
            f"{run_dir.preset} is missing, so the base model is unknown",
            where=str(run_dir.path),
            hint="Export the adapter alone (without --merged)",
        )
    return load_preset(run_dir.preset)[0]


def _merge_dtype(section) -> str:
    # Merge into 16-bit (or fp32) weights even after QLoRA: a merged NF4 model would lose precision twice.
    return section.dtype if section.dtype in _DTYPES else "fp32"


def load_merged(run_dir: RunDir, adapter: Path, before_merge=None, dtype: str | None = None):
    """The base model with the run's adapter merged in, and the run's tokenizer.

    `before_merge(params, itemsize)` runs once the base is loaded and before the merge, so a caller
    can refuse (e.g. for want of disk) before the slow part. `dtype` overrides the preset's.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftop.engine.models.tokenizer import hub_call, load_tokenizer

    section = _run_preset(run_dir).model
    dtype = dtype or _merge_dtype(section)

    def load(source, local_files_only):
        return AutoModelForCausalLM.from_pretrained(
            source,
            dtype=getattr(torch, _DTYPES[dtype]),
            revision=section.revision,
            trust_remote_code=section.trust_remote_code,
            local_files_only=local_files_only,
        )

    base = hub_call(section, "model", load)
    if before_merge is not None:
        before_merge(sum(p.numel() for p in base.parameters()), base.dtype.itemsize)
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    if (adapter / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter)
    else:
        tokenizer = load_tokenizer(section)
    return model.eval(), tokenizer


def _write_merged_vision(section, family, dtype: str, adapter: Path, tmp: Path) -> None:
    """A VLM merged in 16-bit (vision tower and projector as they were), with its processor."""
    from peft import PeftModel

    from sftop.engine.models.vision.loading import load_processor, load_vision_base
    from sftop.engine.train.resources import check_disk_space

    # 16-bit weights, never 4-bit: load as the run's dtype, unquantised
    base = load_vision_base(section.model_copy(update={"load_in_4bit": False}), family, dtype=dtype, attn="sdpa")
    params = sum(p.numel() for p in base.parameters())
    check_disk_space(tmp, {"merged model": params * base.dtype.itemsize})
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    model.save_pretrained(tmp)
    # the processor the run trained with (training never changes it)
    load_processor(section, family).save_pretrained(tmp)
