"""Without a network, a hub id fails within seconds with what to do, and cached models still plan.

The hub is simulated as unreachable by pointing HF_ENDPOINT at a local port nothing listens on
(connection refused, as on a machine without a network); each case runs the CLI in a fresh
process, since huggingface_hub reads HF_ENDPOINT when it is imported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from transformers import LlamaConfig

# The probe answers within seconds; huggingface_hub's own retries took about 24 s.
BOUND_S = 10.0


@pytest.fixture
def offline_env(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again on leaving: nothing listens there
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")
    }
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
        SFTOP_HOME=str(tmp_path / "home"),
    )
    return env


def sftop(env, *args):
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "sftop", *args], env=env, capture_output=True, text=True, timeout=120)
    return out, time.monotonic() - start


def write_preset(tmp_path, model: str, data: str = "builtin:arithmetic"):
    path = tmp_path / "p.toml"
    path.write_text(f'[model]\nname = "{model}"\n[data]\nsource = "{data}"\n')
    return str(path)


def test_uncached_hub_model_fails_fast_and_says_what_to_do(tmp_path, offline_env):
    out, took = sftop(offline_env, "plan", write_preset(tmp_path, "sftop-test-org/not-cached"))
    assert out.returncode == 2, out.stderr
    assert took < BOUND_S
    assert "Retrying" not in out.stderr  # no retry lines before the error
    message = out.stderr
    assert "not in the local Hugging Face cache and the hub cannot be reached" in message
    assert f"{offline_env['HF_ENDPOINT']} cannot be reached" in message
    assert "HF_HUB_OFFLINE=1" in message and "`hf download sftop-test-org/not-cached`" in message


def test_cached_hub_model_still_plans_when_the_hub_is_unreachable(tmp_path, offline_env):
    repo = "sftop-test-org/cached-llama"
    folder = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    (snapshot / "config.json").write_text(config.to_json_string())
    out, took = sftop(offline_env, "plan", write_preset(tmp_path, repo), "--json")
    assert out.returncode == 0, out.stderr
    assert took < BOUND_S and "Retrying" not in out.stderr
    assert json.loads(out.stdout)["model_name"] == repo


def test_uncached_hub_dataset_fails_fast(tmp_path, offline_env):
    out, took = sftop(
        offline_env, "data", "check", write_preset(tmp_path, "builtin:demo-tiny", "sftop-test-org/not-a-dataset")
    )
    assert out.returncode == 2, out.stderr
    assert took < BOUND_S + 10  # the demo model's tokenizer is built first
    assert "Retrying" not in out.stderr
    assert "the hub cannot be reached" in out.stderr and "data.source" in out.stderr
