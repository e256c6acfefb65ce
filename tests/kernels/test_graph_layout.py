"""The model's part of a captured step's key, listed once (sftop/kernels/graph_layout.py).

On a CPU, with everything around the capture real except the capture itself (a stand-in step whose
replay returns a zero loss sum): the SFT fixed-shape path (`graphed_loss`) and the packed path
(`packed_graphed_loss`) list the model's modules once, not per call; and the key still changes, or
the list is made afresh, whenever a replay would be wrong: a parameter given new storage, frozen or
unfrozen, an adapter added, removed from its module, switched off.
"""

import pytest
import torch
from _tiny_models import tiny_model
from peft import LoraConfig

import sftop.kernels as K
from sftop.kernels import cuda_graphs as cg
from sftop.kernels import graph_layout as gl
from sftop.kernels import packed_graphs as pg
from sftop.kernels.patching.parts.cuda_graphs import graphed_loss


class _Step:
    backward = True
    grad_inputs: tuple = ()
    grad_ptrs: set = set()
    backward_pending = False  # captured with its forward
    grads: list = []  # no gradients kept: the shared set stays empty


@pytest.fixture
def captures(monkeypatch):
    """StepGraphs' own bookkeeping (sightings, captures, replays) with a stand-in for the capture:
    the list of every call's key."""
    keys = []
    real_replay = cg.StepGraphs.replay

    def replay(self, key, *a, **k):
        keys.append(key)
        return real_replay(self, key, *a, **k)

    monkeypatch.setattr(cg.StepGraphs, "replay", replay)

    def capture(self, fn, inputs, slots, backward=True, grad_inputs=()):
        self.stats.captures += 1
        return _Step(), None

    monkeypatch.setattr(cg.StepGraphs, "_capture", capture)
    monkeypatch.setattr(cg, "_room_for_capture", lambda static_bytes=0: None)
    monkeypatch.setattr(cg._Replay, "apply", lambda graphs, step, *tensors: torch.zeros(()))
    monkeypatch.setattr(cg, "capturable", lambda t: True)
    return keys


def _listings(monkeypatch, model):
    """Count the walks over `model`'s modules (what building a key from scratch costs)."""
    calls = []
    real = torch.nn.Module.named_modules

    def named_modules(self, *a, **k):
        if self is model:
            calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "named_modules", named_modules)
    return calls


def _patched_in_training():
    """A tiny LoRA Llama with sftop's kernels, and its base model in training mode."""
    model = tiny_model("llama")
    K.patch_model(model)
    base = model.get_base_model()
    base.train()
    return model, base


def _sft_call(base, graphs, ids):
    labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[..., 1:]
    return graphed_loss(base, graphs, {"input_ids": ids}, labels, None, -100)


def test_the_sft_graph_key_is_built_from_a_list_made_once(monkeypatch, captures):
    model, base = _patched_in_training()
    graphs = cg.StepGraphs()
    ids = torch.randint(3, 100, (2, 16))
    walks = _listings(monkeypatch, base)
    assert _sft_call(base, graphs, ids) is None  # first sighting: eager
    assert graphs.layout.scans == 1 and len(walks) == 2  # one listing: modules, adapter layers
    assert _sft_call(base, graphs, ids) is not None  # captured (listed afresh first) and replayed
    assert graphs.stats.captures == 1 and graphs.layout.scans == 2
    walks.clear()
    for _ in range(5):
        assert _sft_call(base, graphs, ids) is not None
    assert graphs.stats.replays == 6 and graphs.stats.captures == 1
    assert walks == [] and graphs.layout.scans == 2  # replays never walk the model

    # new storage for a parameter: a new key (the old graph reads the old address)
    lora_a = next(p for n, p in base.named_parameters() if "lora_A" in n)
    lora_a.data = lora_a.data.clone()
    assert _sft_call(base, graphs, ids) is None and graphs.stats.eager_calls == 2
    assert _sft_call(base, graphs, ids) is not None and graphs.stats.captures == 2
    assert captures[-1] != captures[0] and captures[-1][:-2] == captures[0][:-2]  # only the parameters differ

    # the trainable set changes: a new key
    lora_a.requires_grad_(False)
    assert _sft_call(base, graphs, ids) is None
    lora_a.requires_grad_(True)
    assert _sft_call(base, graphs, ids) is not None and graphs.stats.captures == 2  # the earlier key again

    # the adapter switched off: its layers' state is in the key (and PEFT freezes the adapter, so
    # nothing trains: eager)
    with model.disable_adapter():
        assert _sft_call(base, graphs, ids) is None
    assert _sft_call(base, graphs, ids) is not None and graphs.stats.captures == 2


def test_a_registered_adapter_or_a_removed_parameter_lists_the_model_again(monkeypatch, captures):
    model, base = _patched_in_training()
    graphs = cg.StepGraphs()
    ids = torch.randint(3, 100, (2, 16))
    _sft_call(base, graphs, ids)
    _sft_call(base, graphs, ids)
    assert graphs.stats.captures == 1 and graphs.layout.scans == 2
    # a new adapter registers modules and parameters: the next call lists the model before keying
    # (from the old list, its key would have matched the captured one), and its key differs
    model.add_adapter("extra", LoraConfig(r=2, target_modules=["q_proj"]))
    listed = len(graphs.layout._slots)
    assert graphs.layout.slots() is None
    assert _sft_call(base, graphs, ids) is None and graphs.stats.replays == 1
    assert graphs.layout.scans == 3 and len(graphs.layout._slots) == listed + 2 * 2
    assert captures[-1] != captures[0]
    model.set_adapter("extra")  # another adapter in use: another key again
    assert _sft_call(base, graphs, ids) is None and captures[-1] not in captures[:-1]
    # a parameter taken out of its module directly (no registration): the list says it is stale
    assert graphs.layout.slots() is not None
    del base.model.norm._parameters["weight"]
    assert graphs.layout.slots() is None


def test_keys_are_listed_afresh_only_when_they_would_capture():
    graphs = cg.StepGraphs(max_keys=1)
    assert graphs.would_capture("a") is False  # first sighting: eager
    graphs._seen["a"] = 1
    assert graphs.would_capture("a") is True
    graphs._refused["a"] = "no memory"
    assert graphs.would_capture("a") is False
    graphs._steps["b"] = object()
    graphs._seen["c"] = 1
    assert graphs.would_capture("c") is False  # no room for another key
    assert graphs.would_capture("b") is False  # held: replays


def test_the_packed_graph_key_is_built_from_a_list_made_once(monkeypatch, captures):
    model, base = _patched_in_training()
    monkeypatch.setattr(pg, "_eligible", lambda lm, inputs: True)
    ids = torch.randint(3, 100, (1, 24))
    batch = {
        "input_ids": ids,
        "labels": ids,
        "position_ids": torch.cat([torch.arange(10), torch.arange(14)])[None],
        "cu_seq_lens_q": torch.tensor([0, 10, 24], dtype=torch.int32),
    }
    walks = _listings(monkeypatch, base)
    assert pg.packed_graphed_loss(model, batch) is None
    assert pg.packed_graphed_loss(model, batch) is not None
    stats = pg.packed_graph_stats(model)
    layout = base.__dict__[pg._PACKED_GRAPHS].layout
    assert stats.captures == 1 and layout.scans == 2
    walks.clear()
    for _ in range(4):
        assert pg.packed_graphed_loss(model, batch) is not None
    assert walks == [] and layout.scans == 2 and stats.replays == 5
    # another bucket length: eager at its first sighting, without a listing
    longer = {k: (v if k == "cu_seq_lens_q" else torch.cat([v, v[:, :8]], dim=1)) for k, v in batch.items()}
    longer["cu_seq_lens_q"] = torch.tensor([0, 10, 32], dtype=torch.int32)
    assert pg.packed_graphed_loss(model, longer) is None
    assert walks == [] and layout.scans == 2


def test_only_registrations_on_a_listed_model_count():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    before = gl.registrations()
    loose = torch.nn.Linear(2, 2)
    loose.extra = torch.nn.Linear(2, 2)
    assert gl.registrations() == before
    layout = gl.ModelLayout(model)
    torch.nn.ModuleList(list(model))  # a throwaway container of the model's modules, as slicing makes
    model[0:1]
    assert gl.registrations() == before and layout.slots() is not None
    model[1].extra = loose  # a submodule attached to the model
    assert gl.registrations() == before + 1 and layout.slots() is None
    layout.rescan(model)
    model[1].extra.bias = torch.nn.Parameter(torch.zeros(2))  # a parameter on a module now listed
    assert gl.registrations() == before + 2 and layout.slots() is None


def test_a_training_forward_registers_nothing_on_the_model():
    """transformers' decoder slices its ModuleList of layers on every forward: that must not make
    every call list the model again."""
    model = tiny_model("llama")
    base = model.get_base_model()
    layout = gl.ModelLayout(base)
    base.train()
    base(input_ids=torch.randint(3, 100, (1, 8)), labels=torch.randint(3, 100, (1, 8))).loss.backward()
    assert layout.slots() is not None
