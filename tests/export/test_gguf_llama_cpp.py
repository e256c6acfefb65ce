"""llama.cpp itself reads the exported demo model: the same tokens for a text, logits close to the
merged model's, and the same greedy continuation as transformers generates.

Needs `llama-cpp-python` (the `gguf-check` extra: `pip install -e ".[gguf-check]"`, which compiles
llama.cpp once); without it these tests skip and say so.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_helpers import SAMPLE, make_run
from sftop.engine.export import find_adapter, load_merged
from sftop.engine.export.gguf import export_gguf
from sftop.engine.rundir import RunDir

llama_cpp = pytest.importorskip(
    "llama_cpp", reason='llama-cpp-python is not installed: pip install -e ".[gguf-check]" (compiles llama.cpp)'
)

PROMPT = [{"role": "user", "content": "What is 12 + 30?"}]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from sftop.engine.models.demo import ensure_demo_model

    root = tmp_path_factory.mktemp("llama-cpp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTOP_HOME", str(root / "home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        base = ensure_demo_model()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        run = make_run(root / "run", root / "base", model, AutoTokenizer.from_pretrained(base), seed=1)
        files = {kind: export_gguf(run, kind) / f"run-{kind}.gguf" for kind in ("f16", "q8_0")}
        run_dir = RunDir(run)
        merged, tokenizer = load_merged(run_dir, find_adapter(run_dir))
    return files, merged, tokenizer


def _llama(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=0)


def _f16_weights(model):
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(param.half().float())
    return model


def test_llama_cpp_tokenizes_like_the_model(exported):
    files, _, tokenizer = exported
    llm = _llama(files["f16"])
    chat = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    for text in (SAMPLE, chat):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]


def _llama_cpp_greedy(llm, ids: list[int]) -> list[int]:
    llm.reset()
    generated = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        generated.append(token)
        if len(generated) == NEW_TOKENS:
            break
    return generated


@pytest.mark.parametrize("kind, tolerance", [("f16", 2e-3), ("q8_0", 5e-2)])
def test_llama_cpp_logits_and_greedy_tokens_match_transformers(exported, kind, tolerance):
    files, merged, tokenizer = exported
    # The same weights in both: the merged model rounded to f16, or transformers' reading of the
    # q8_0 file (its int8 blocks dequantized).
    reference = (
        _f16_weights(merged)
        if kind == "f16"
        else AutoModelForCausalLM.from_pretrained(
            files[kind].parent, gguf_file=files[kind].name, dtype=torch.float32
        ).eval()
    )
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"]
    llm = _llama(files[kind])
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    generated = _llama_cpp_greedy(llm, ids)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
        error = ((expected - got).abs().max() / expected.abs().max()).item()
        assert error < tolerance, error
        greedy = reference.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
        along = reference(torch.tensor([ids + generated])).logits[0, len(ids) - 1 : -1]
    if kind == "f16":
        assert generated == greedy
        return
    # llama.cpp multiplies q8_0 weights by int8-quantized activations, transformers by float ones:
    # where two tokens are within a hair of each other (this random-adapter model has such steps)
    # the pick may differ. Every pick must still be transformers' best or tie with it, step by step
    # along llama.cpp's own continuation, and the clear first choice must agree.
    assert generated[0] == greedy[0]
    gaps = [(row.max() - row[token]).item() for row, token in zip(along, generated)]
    assert max(gaps) < 0.05, gaps
