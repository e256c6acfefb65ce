"""GGUF export, checked by an independent reader: transformers' GGUF loader rebuilds the model and
the tokenizer from the file alone, and both must match the merged model sftop exported.

Tolerances (largest |logit difference| over the largest |logit|):
- f16 / bf16: within 1e-3 of the merged model with its matrices rounded to that type (what the file
  holds; vectors stay float32), so any wrong name, permutation or offset shows;
- q8_0: within 5e-2 of the float32 merged model (int8 weights with one scale per 32 values; tiny
  random models average errors over few weights: 7e-3 to 3.6e-2 measured across the families).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_helpers import FAMILY_CASES, SAMPLE, family_model, family_tokenizer, make_run
from sftop.engine.errors import SftopError
from sftop.engine.export import find_adapter, load_merged
from sftop.engine.export.gguf import export_gguf
from sftop.engine.rundir import RunDir

CHAT = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42, I think."}]
Q8_TOLERANCE = 5e-2


@pytest.fixture(scope="module")
def gguf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("gguf-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTOP_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield home


@pytest.fixture(scope="module")
def demo_run(gguf_home, tmp_path_factory):
    from sftop.engine.models.demo import ensure_demo_model

    base = ensure_demo_model()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    root = tmp_path_factory.mktemp("demo-gguf")
    return make_run(root / "demo-run", root / "base", model, tokenizer)


def _merged(run: Path):
    run_dir = RunDir(run)
    return load_merged(run_dir, find_adapter(run_dir))


def _rounded(model, kind: str):
    """The merged model as the file holds it: matrices through f16/bf16, vectors float32."""
    if kind not in ("f16", "bf16"):
        return model
    dtype = torch.float16 if kind == "f16" else torch.bfloat16
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(param.to(dtype).float())
    return model


def _relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    return ((expected - got).abs().max() / expected.abs().max()).item()


def _check_readback(run: Path, out: Path, kind: str) -> tuple[float, object]:
    """Export's file, read by transformers: logits error against the merged model, and its tokenizer."""
    name = f"{run.name}-{kind}.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "Modelfile", "README.md"])
    merged, tokenizer = _merged(run)
    reference = _rounded(merged, kind)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(SAMPLE)["input_ids"]])
    with torch.no_grad():
        error = _relative_error(reference(ids).logits, loaded(ids).logits)
    rebuilt = AutoTokenizer.from_pretrained(out, gguf_file=name)
    assert (
        rebuilt(SAMPLE, add_special_tokens=False)["input_ids"]
        == tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    )
    return error, (tokenizer, rebuilt, merged)


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t.tensor_type for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_demo_model_reads_back_in_transformers(demo_run, kind, tmp_path):
    out = export_gguf(demo_run, kind, out=tmp_path / "out")
    error, (tokenizer, rebuilt, _) = _check_readback(demo_run, out, kind)
    assert error < (Q8_TOLERANCE if kind == "q8_0" else 1e-3), error
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert (
        rebuilt(chat, add_special_tokens=False)["input_ids"] == tokenizer(chat, add_special_tokens=False)["input_ids"]
    )

    fields, tensors = _fields(out / f"{demo_run.name}-{kind}.gguf")
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the demo model has no BOS
    assert "{% generation %}" not in fields["tokenizer.chat_template"]  # training-only tags are dropped
    assert fields["tokenizer.chat_template"].startswith("{%- for message in messages %}")
    matrix = {
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[kind]
    assert tensors["blk.0.attn_q.weight"] == matrix and tensors["output.weight"] == matrix
    assert tensors["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32

    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{demo_run.name}-{kind}.gguf" in modelfile
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    # Nothing else was left next to the output: the temporary directory was renamed into place.
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_each_family_reads_back_in_transformers(gguf_home, family, tmp_path):
    tokenizer = family_tokenizer(family)
    run = make_run(tmp_path / "run", tmp_path / "base", family_model(family, tokenizer), tokenizer)
    out = export_gguf(run, "f16")
    error, (tokenizer, rebuilt, merged) = _check_readback(run, out, "f16")
    assert error < 1e-3, error
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, attn_implementation="eager")
    ids = torch.tensor([tokenizer(SAMPLE)["input_ids"]])
    with torch.no_grad():  # the file holds the merged model, not the base one
        assert _relative_error(merged(ids).logits, base(ids).logits) > 1e-2

    fields, tensors = _fields(out / "run-f16.gguf")
    tied = family in ("qwen2", "qwen3", "gemma2", "gemma3_text")
    assert ("output.weight" in tensors) is not tied
    assert len(fields["tokenizer.ggml.tokens"]) == merged.config.vocab_size  # padded past the tokenizer
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{merged.config.vocab_size - 1}]"
    if family == "qwen2":
        assert "blk.0.attn_q.bias" in tensors
    if family in ("qwen2", "qwen3", "llama"):
        assert fields["tokenizer.ggml.pre"] == ("llama-bpe" if family == "llama" else "qwen2")
    else:
        assert (
            fields["tokenizer.ggml.model"] == "llama"
            and len(fields["tokenizer.ggml.scores"]) == merged.config.vocab_size
        )
        assert fields["tokenizer.ggml.add_bos_token"] is True
        assert fields["tokenizer.ggml.add_space_prefix"] is (family == "mistral")
    if family.startswith("gemma"):
        assert fields[f"{fields['general.architecture']}.attention.sliding_window_pattern"] == [
            t == "sliding_attention" for t in merged.config.layer_types
        ]
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False)
    if family != "llama":
        # transformers rebuilds Llama 3 tokenizers with GPT-2's split (it has no Llama 3 pre-tokenizer),
        # which differs from the model's on runs of newlines; llama.cpp reads `llama-bpe` from the file.
        assert (
            rebuilt(chat, add_special_tokens=False)["input_ids"]
            == tokenizer(chat, add_special_tokens=False)["input_ids"]
        )


def test_q8_0_family_export(gguf_home, tmp_path):
    tokenizer = family_tokenizer("qwen2")
    run = make_run(tmp_path / "run", tmp_path / "base", family_model("qwen2", tokenizer), tokenizer)
    error, _ = _check_readback(run, export_gguf(run), "q8_0")
    assert error < Q8_TOLERANCE, error


def test_llama3_rope_scaling_is_written_as_rope_freqs(gguf_home, tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sftop.engine.export.gguf.families.llama import llama3_rope_divisors

    config = AutoConfig.for_model(
        "llama",
        hidden_size=256,
        num_attention_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = 128
    plain = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    divisors = llama3_rope_divisors(config, head_dim)
    torch.testing.assert_close(plain / divisors, scaled.float(), rtol=1e-5, atol=0)
    assert divisors.min() == 1.0 and divisors.max() == 32.0


# --- refusals: clear errors, before any work, nothing left behind ----------------------------------------


def _nothing_left(parent: Path, out_name: str = "out") -> None:
    assert not (parent / out_name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out_name}-")]


def test_run_without_adapter_is_refused(demo_run, tmp_path):
    run = tmp_path / "no-adapter"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("adapter", "export-*"))
    with pytest.raises(SftopError, match="no adapter and no complete checkpoint"):
        export_gguf(run, out=tmp_path / "out")
    _nothing_left(tmp_path)


def test_missing_base_model_is_refused(demo_run, tmp_path):
    run = tmp_path / "moved-base"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("export-*"))
    text = (run / "preset.toml").read_text()
    (run / "preset.toml").write_text(text.replace(str(demo_run.parent / "base"), str(tmp_path / "gone")))
    with pytest.raises(SftopError, match="does not exist") as info:
        export_gguf(run, out=tmp_path / "out")
    assert info.value.where == "model.name"
    _nothing_left(tmp_path)


def test_full_disk_removes_the_partial_file(demo_run, tmp_path, monkeypatch):
    written = []
    real = gguf.GGUFWriter.write_tensor_data

    def fill_up(self, tensor, *args, **kwargs):
        if written:
            written.append(Path(self.path).stat().st_size)
            raise OSError(28, "No space left on device")
        written.append(0)
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fill_up)
    with pytest.raises(SftopError, match="disk filled up") as info:
        export_gguf(demo_run, "f16", out=tmp_path / "out")
    assert "Free some space" in info.value.hint
    assert written[-1] > 0  # the file was partly written when the disk "filled"
    _nothing_left(tmp_path)


def _refused_before_loading(monkeypatch):
    import sftop.engine.export as export

    def fail(*args, **kwargs):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(export, "load_merged", fail)


def test_unsupported_family_is_refused_before_any_work(gguf_home, tmp_path, monkeypatch):
    from transformers import AutoConfig, GPT2LMHeadModel

    tokenizer = family_tokenizer("qwen2")
    model = GPT2LMHeadModel(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer)))
    run = make_run(tmp_path / "run", tmp_path / "base", model, tokenizer, targets=["c_attn"])
    _refused_before_loading(monkeypatch)
    with pytest.raises(SftopError, match="cannot write `gpt2` models to GGUF") as info:
        export_gguf(run, out=tmp_path / "out")
    assert "llama" in str(info.value) and "--merged" in info.value.hint
    _nothing_left(tmp_path)


def test_vision_language_model_is_refused_before_any_work(demo_run, tmp_path, monkeypatch):
    from transformers import AutoConfig

    run = tmp_path / "vlm-run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("export-*"))
    base = tmp_path / "vlm-base"
    AutoConfig.for_model("qwen2_vl").save_pretrained(base)  # its config alone: nothing is loaded
    text = (run / "preset.toml").read_text()
    (run / "preset.toml").write_text(text.replace(str(demo_run.parent / "base"), str(base)))
    _refused_before_loading(monkeypatch)
    with pytest.raises(SftopError, match="vision-language model") as info:
        export_gguf(run, out=tmp_path / "out")
    assert "projector" in info.value.hint
    _nothing_left(tmp_path)


def test_k_quant_without_llama_quantize_says_how_to_get_it(demo_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    _refused_before_loading(monkeypatch)
    with pytest.raises(SftopError, match="needs llama.cpp's `llama-quantize` program, which is not on PATH") as info:
        export_gguf(demo_run, "q4_k_m", out=tmp_path / "out")
    assert "q8_0" in info.value.hint
    _nothing_left(tmp_path)


def test_k_quant_runs_llama_quantize_on_the_f16_file(demo_run, tmp_path, monkeypatch):
    """The call contract with llama.cpp's tool: f16 input, output path, type name; its output kept,
    the f16 intermediate removed. A stand-in program records the call and copies its input."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    tool = bin_dir / "llama-quantize"
    tool.write_text(f'#!/bin/sh\necho "$@" > {log}\nhead -c 4 "$1" >> {log}\ncp "$1" "$2"\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = export_gguf(demo_run, "q4_k_m", out=tmp_path / "out")
    args, magic = log.read_text().splitlines()
    source, target, kind = args.split(" ")
    assert source.endswith(f"{demo_run.name}-f16.gguf") and kind == "Q4_K_M" and magic == "GGUF"
    assert Path(target).name == f"{demo_run.name}-q4_k_m.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", f"{demo_run.name}-q4_k_m.gguf"]


def test_unknown_type_is_refused(demo_run, tmp_path):
    with pytest.raises(SftopError, match="Unknown GGUF type `q3`"):
        export_gguf(demo_run, "q3", out=tmp_path / "out")


def test_cli_exports_gguf_with_q8_0_by_default(demo_run, tmp_path, capsys):
    from sftop.cli import main

    assert main(["export", str(demo_run), "--gguf", "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr()
    assert (tmp_path / "cli" / f"{demo_run.name}-q8_0.gguf").is_file()
    assert "llama-cli -m" in printed.out and "ollama create" in printed.out
    assert "writing 100%" in printed.err


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs), where this machine lets the tests mount one."""
    import subprocess

    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'mount failed'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_too_small_disk_is_refused_before_writing(demo_run, small_disk):
    with pytest.raises(SftopError, match="Not enough free disk space"):
        export_gguf(demo_run, "f16", out=small_disk / "out")
    assert list(small_disk.iterdir()) == []


def test_disk_filling_up_mid_file_removes_it(demo_run, small_disk, monkeypatch):
    # The space check passes (as when another program fills the disk during the export); the real
    # file system then runs out part-way through the 1.7 MB file.
    monkeypatch.setattr("sftop.engine.train.resources.check_disk_space", lambda *a, **k: 0)
    with pytest.raises(SftopError, match="disk filled up"):
        export_gguf(demo_run, "f16", out=small_disk / "out")
    assert list(small_disk.iterdir()) == []


def test_mistral_with_a_short_sliding_window_is_refused_before_any_work(gguf_home, tmp_path, monkeypatch):
    tokenizer = family_tokenizer("mistral")
    model = family_model("mistral", tokenizer)
    model.config.sliding_window = 64  # shorter than its 256-token context
    run = make_run(tmp_path / "run", tmp_path / "base", model, tokenizer)
    _refused_before_loading(monkeypatch)
    with pytest.raises(SftopError, match="sliding window of 64 tokens") as info:
        export_gguf(run, out=tmp_path / "out")
    assert info.value.where == "config.json: sliding_window"
    _nothing_left(tmp_path)
