"""The built-in demo model, tokenizer loading and model loading errors."""

import pytest
import torch

from sftop.engine.errors import ModelError
from sftop.engine.models import demo
from sftop.engine.models.loading import load_model, resolve_dtype
from sftop.engine.models.tokenizer import ensure_pad_token, load_tokenizer
from sftop.engine.presets import load_preset
from sftop.engine.presets.schema import ModelSection


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTOP_HOME", str(home))
        path = demo.ensure_demo_model()
    return home, path


@pytest.fixture
def offline(demo_home, monkeypatch, tmp_path):
    monkeypatch.setenv("SFTOP_HOME", str(demo_home[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    return demo_home


def test_demo_model_is_cached_atomically_and_reused(offline):
    home, path = offline
    assert path == home / "cache" / "models" / "demo-tiny"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not list(path.parent.glob(".demo-tiny-*"))  # no build leftovers
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_demo_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt


def test_outdated_demo_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTOP_HOME", str(tmp_path))
    stale = tmp_path / "cache" / "models" / "demo-tiny"
    stale.mkdir(parents=True)
    (stale / "sftop-demo-version").write_text("0\n")
    (stale / "config.json").write_text("{half written")
    path = demo.ensure_demo_model()
    assert (path / "sftop-demo-version").read_text().strip() == demo.DEMO_VERSION
    assert (path / "model.safetensors").is_file()
    assert not list(path.parent.glob(".demo-tiny-*"))


def test_demo_build_is_deterministic():
    tok_a, tok_b = demo.build_tokenizer(), demo.build_tokenizer()
    assert tok_a.get_vocab() == tok_b.get_vocab() and len(tok_a) == demo.VOCAB_SIZE
    a, b = demo.build_model(tok_a), demo.build_model(tok_b)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    params = sum(p.numel() for p in a.parameters())
    assert 300_000 < params < 5_000_000


def test_demo_tokenizer_digits_and_chat_template(offline):
    tok = load_tokenizer(ModelSection())
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id
    pieces = [tok.decode([i]) for i in tok("12+345=357")["input_ids"]]
    assert pieces[:2] == ["1", "2"] and "357" not in pieces  # one token per digit
    out = tok.apply_chat_template(
        [{"role": "user", "content": "What is 7+5?"}, {"role": "assistant", "content": "12"}],
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(trained) == "12<|im_end|>"  # the answer and the stop token, nothing else
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_offline_hub_model_not_cached_says_what_to_do(offline):
    with pytest.raises(ModelError) as info:
        load_tokenizer(ModelSection(name="sftop-test-org/not-a-cached-model"))
    text = str(info.value)
    assert "not in the local Hugging Face cache" in text and "offline" in text
    assert "hf download sftop-test-org/not-a-cached-model" in text
    assert "model.name" in text


def test_local_directory_errors(offline, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(ModelSection(name=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_tokenizer(ModelSection(name=str(tmp_path / "empty")))
    with pytest.raises(ModelError, match="Unknown built-in model"):
        load_tokenizer(ModelSection(name="builtin:huge"))


def test_local_directory_loads_like_a_hub_model(offline):
    _, path = offline
    tok = load_tokenizer(ModelSection(name=str(path)))
    assert len(tok) == demo.VOCAB_SIZE


def test_pad_token_is_added_when_missing():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def without_pad(specials):
        vocab = {t: i for i, t in enumerate(specials + ["a", "b"])}
        raw = Tokenizer(models.WordLevel(vocab, unk_token="a"))
        return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>")

    reserved = ensure_pad_token(without_pad(["<|im_end|>", "<|finetune_right_pad_id|>"]))
    assert reserved.pad_token == "<|finetune_right_pad_id|>"  # a reserved pad token beats EOS
    plain = ensure_pad_token(without_pad(["<|im_end|>"]))
    assert plain.pad_token == "<|im_end|>"


def test_dtype_resolution_on_cpu():
    assert resolve_dtype("auto", on_cuda=False) == "fp32"
    assert resolve_dtype("bf16", on_cuda=False) == "bf16"
    with pytest.raises(ModelError, match="fp16 training needs a CUDA GPU"):
        resolve_dtype("fp16", on_cuda=False)


def test_qlora_on_cpu_is_a_clear_error(offline, monkeypatch):
    import sftop.engine.models.loading as loading

    monkeypatch.setattr(loading, "cuda_available", lambda: False)  # what a machine without a GPU says
    preset, _ = load_preset("demo", ["model.load_in_4bit=true"])
    with pytest.raises(ModelError) as info:
        load_model(preset)
    assert "needs a CUDA GPU" in str(info.value) and "model.load_in_4bit" in str(info.value)


def test_lora_targets_that_do_not_exist(offline):
    preset, _ = load_preset("demo", ['lora.targets=["no_such_proj"]'])
    with pytest.raises(ModelError) as info:
        load_model(preset)
    assert "lora.targets" in str(info.value)


def test_load_model_adds_lora_and_reports(offline):
    preset, _ = load_preset("demo", ['lora.targets=["q_proj", "v_proj"]', "lora.r=4"])
    model, tok, info = load_model(preset)
    assert info.dtype == "fp32" and info.device == "cpu" and info.attn_implementation == "sdpa"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(("q_proj" in n or "v_proj" in n) for n in names)
    # r=4 on q (128->128) and v (128->64) in 4 layers
    assert info.params_trainable == 4 * (4 * (128 + 128) + 4 * (128 + 64))
    assert info.kernels == {"enabled": False, "reason": "no CUDA GPU: stock PyTorch layers"}
