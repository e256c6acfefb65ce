"""benchmarks/bundle_results.py: a device call's result folder travels as one file and comes
back with every file's content and name."""

import importlib.util
import json
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "bundle_results", Path(__file__).resolve().parents[2] / "benchmarks" / "bundle_results.py")
bundle_results = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bundle_results)


def test_pack_leaves_one_file_and_unpack_restores_every_one(tmp_path):
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "bench_llama.json").write_text(json.dumps({"tokens_per_s": 66697.5, "losses": [12.1]}))
    (out / "a" / "session.log").write_text("stock 26,577 tok/s\n")
    (out / "killed.json").write_text('{"results": [')  # a run stopped while writing
    bundle = bundle_results.pack(out)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["bundle.json"]

    dest = tmp_path / "results"
    written = bundle_results.unpack(bundle, dest, prefix="call3")
    assert sorted(p.name for p in written) == ["call3a_bench_llama.json", "call3a_session.log", "call3killed.json"]
    assert json.loads((dest / "call3a_bench_llama.json").read_text()) == {"tokens_per_s": 66697.5, "losses": [12.1]}
    assert (dest / "call3a_session.log").read_text() == "stock 26,577 tok/s\n"
    assert (dest / "call3killed.json").read_text() == '{"results": ['
