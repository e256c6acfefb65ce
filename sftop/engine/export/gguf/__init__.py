"""`sftop export RUN --gguf [f16|bf16|q8_0|q4_k_m...]`: the merged model as one GGUF file, for
llama.cpp, Ollama and LM Studio, with an Ollama `Modelfile` next to it.

Everything that can refuse the export (no adapter, no base model, an unsupported family or
tokenizer, no `llama-quantize` for a K-quant, too little disk) is checked before the slow part.
The files are written into a hidden temporary directory that is renamed into place at the end, so
a failure at any point, a full disk included, leaves nothing half-written behind.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from sftop.engine.errors import SftopError
from sftop.engine.export.gguf.encode import FILE_TYPES
from sftop.engine.export.gguf.kquants import K_QUANTS

GGUF_KINDS = (*FILE_TYPES, *K_QUANTS)
DEFAULT_KIND = "q8_0"

# progress(phase, done, total): phases "load", "merge", "write", "quantize".
ExportProgress = Callable[[str, int, int], None]


def default_out(run_dir, kind: str) -> Path:
    return run_dir.path / f"export-gguf-{kind}"


def export_gguf(run, kind: str = DEFAULT_KIND, out: Path | None = None, progress: ExportProgress | None = None) -> Path:
    """Write RUN's merged model as `OUT/<run>-<kind>.gguf` plus `Modelfile` and `README.md`; return OUT."""
    from sftop.engine.export import _finish, _prepare_out, _run_dir, find_adapter, load_merged
    from sftop.engine.export.gguf import kquants, ollama
    from sftop.engine.export.gguf.families import family_for
    from sftop.engine.export.gguf.tokenizer import read_vocabulary
    from sftop.engine.export.gguf.writer import write_gguf

    kind = kind.lower()
    if kind not in GGUF_KINDS:
        raise SftopError(f"Unknown GGUF type `{kind}`", where="--gguf", hint=f"Use one of: {', '.join(GGUF_KINDS)}")
    report = progress or (lambda phase, done, total: None)
    run_dir = _run_dir(run)
    if not run_dir.path.is_dir():
        raise SftopError(f"No run directory at {run_dir.path}", hint="`sftop runs` lists the runs")
    adapter = find_adapter(run_dir)
    quantizer = kquants.find_quantizer(kind) if kind in K_QUANTS else None
    config, tokenizer = _base_config_and_tokenizer(run_dir, adapter)
    family = family_for(config)
    family.validate(config)
    vocab = read_vocabulary(tokenizer, config.vocab_size)
    out = Path(out).expanduser() if out else default_out(run_dir, kind)
    _prepare_out(out)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        report("load", 0, 1)
        write_kind = "f16" if quantizer else kind

        def room(params: int, itemsize: int) -> None:
            from sftop.engine.train.resources import check_disk_space

            # f16 bytes per weight bound every type written here (a K-quant goes through f16 first).
            need = params * 2 * (2 if quantizer else 1)
            check_disk_space(tmp, {f"GGUF file ({kind})": need})
            report("merge", 0, 1)

        model, _ = load_merged(run_dir, adapter, before_merge=room, dtype=_merge_dtype(run_dir, config))
        name = f"{run_dir.name}-{kind}.gguf"
        written = tmp / (f"{run_dir.name}-f16.gguf" if quantizer else name)
        write_gguf(
            written,
            model,
            vocab,
            family,
            write_kind,
            run_dir.name,
            progress=lambda done, total: report("write", done, total),
        )
        del model
        if quantizer:
            report("quantize", 0, 1)
            kquants.quantize(quantizer, written, tmp / name, kind)
            written.unlink()
            report("quantize", 1, 1)
        eos = tokenizer.eos_token if isinstance(getattr(tokenizer, "eos_token", None), str) else None
        (tmp / "Modelfile").write_text(ollama.modelfile(name, vocab.chat_template, eos))
        (tmp / "README.md").write_text(_readme(name))
        return _finish(tmp, out)
    except OSError as exc:
        if _disk_full(exc, tmp):
            raise SftopError(
                "The disk filled up while writing the GGUF file; the partial file was removed",
                where=str(out.parent),
                hint="Free some space (or pass --out on another disk) and export again",
            ) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _merge_dtype(run_dir, config) -> str | None:
    """With `model.dtype = "auto"`, merge in the checkpoint's own 16-bit type rather than float32:
    an 8B model then needs 16 GB of RAM, not 32, and the file is 16-bit (or less) anyway."""
    from sftop.engine.presets import load_preset

    preset, _ = load_preset(run_dir.preset)
    if preset.model.dtype != "auto":
        return None
    stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
    return {"torch.bfloat16": "bf16", "bfloat16": "bf16", "torch.float16": "fp16", "float16": "fp16"}.get(stored)


def _disk_full(exc: OSError, where: Path) -> bool:
    """ENOSPC, or numpy's short write (`N requested and M written`, no errno) on a file system with
    nothing left: how a full disk shows while tensors are written."""
    if exc.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def _base_config_and_tokenizer(run_dir, adapter: Path):
    """The base model's config and the run's tokenizer: enough to refuse before loading weights."""
    from transformers import AutoConfig, AutoTokenizer

    from sftop.engine.models.tokenizer import hub_call, load_tokenizer
    from sftop.engine.presets import load_preset

    if not run_dir.preset.is_file():
        raise SftopError(
            f"{run_dir.preset} is missing, so the base model is unknown",
            where=str(run_dir.path),
            hint="Export the adapter alone (`sftop export RUN`)",
        )
    preset, _ = load_preset(run_dir.preset)
    section = preset.model

    def load(source, local_files_only):
        return AutoConfig.from_pretrained(
            source,
            revision=section.revision,
            local_files_only=local_files_only,
            trust_remote_code=section.trust_remote_code,
        )

    config = hub_call(section, "model config", load)
    if (adapter / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    else:
        tokenizer = load_tokenizer(section)
    return config, tokenizer


def _readme(name: str) -> str:
    return (
        f"# {name}\n\n"
        f"- llama.cpp: `llama-cli -m {name} -cnv` (chat) or `llama-server -m {name}`\n"
        f"- Ollama: `ollama create my-model -f Modelfile` then `ollama run my-model`\n"
        f"- LM Studio: import `{name}` (My Models > import)\n"
    )


__all__ = ["DEFAULT_KIND", "GGUF_KINDS", "export_gguf"]
