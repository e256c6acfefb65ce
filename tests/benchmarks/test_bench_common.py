"""benchmarks/bench_common.py: the header, timed training and failure lines every benchmark shares."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "benchmarks"))

import bench_common


def test_result_header_names_the_machine_versions_date_and_command():
    import torch
    import transformers

    header = bench_common.result_header("cpu", "transformers")
    assert list(header) == ["device", "torch", "transformers", "date", "command"]
    assert header["device"] == "cpu" and header["torch"] == torch.__version__
    assert header["transformers"] == transformers.__version__ and header["date"].endswith("UTC")


def test_timed_train_reports_the_trainer_run():
    class Trainer:
        state = SimpleNamespace(global_step=0)

        def train(self):
            self.state.global_step = 7
            return SimpleNamespace(metrics={"train_runtime": 1.5}, training_loss=2.25)

    row = bench_common.timed_train(Trainer())
    assert row["steps"] == 7 and row["train_runtime_s"] == 1.5 and row["final_loss"] == 2.25
    assert row["train_s"] >= 0 and row["peak_allocated_gib"] is None  # no GPU here


def test_lines_of_paths_that_measured_nothing():
    assert bench_common.unmeasured_line({"path": "sftop", "tokens_per_s": 1.0}, 6) is None
    failed = bench_common.unmeasured_line({"path": "stock", "error": "Traceback\n  ...\nOutOfMemoryError: 2 GiB\n"}, 6)
    assert failed == "  stock  FAILED: OutOfMemoryError: 2 GiB"
    assert bench_common.unmeasured_line({"path": "stock"}, 6) == "  stock  FAILED"
    peer = bench_common.unmeasured_line({"path": "unsloth", "unavailable": "not installed"}, 7)
    assert peer.startswith("  unsloth ") and "not installed" in peer
