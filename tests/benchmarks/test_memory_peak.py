"""benchmarks/memory_peak.py: replaying an allocator trace to the moment most bytes were live."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import memory_peak


def _ev(action, addr, size, where):
    frames = [
        {"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
        {"filename": f"/site/sftop/kernels/{where}.py", "line": 7, "name": "f"},
    ]
    return {"action": action, "addr": addr, "size": size, "frames": frames}


def test_live_blocks_at_the_peak_grouped_by_sftop_frame():
    trace = [
        _ev("alloc", 1, 100, "a"),
        _ev("alloc", 2, 50, "b"),
        _ev("free_completed", 1, 100, "a"),
        _ev("alloc", 3, 30, "b"),
        _ev("alloc", 4, 80, "c"),  # 160 live here: the peak
        _ev("free_requested", 4, 80, "c"),
        _ev("alloc", 5, 10, "a"),
        _ev("free_completed", 99, 1000, "z"),  # allocated before recording: ignored
    ]
    peak, at, sites = memory_peak.peak_blocks(trace)
    assert (peak, at) == (160, 4)
    assert sites == {"kernels/c.py:7 f": 80, "kernels/b.py:7 f": 80}
    # outside sftop: the innermost frame that is not torch's
    assert (
        memory_peak._where(
            [
                {"filename": "/x/torch/a.py", "line": 3, "name": "g"},
                {"filename": "/x/transformers/llama.py", "line": 9, "name": "fwd"},
            ]
        )
        == "llama.py:9 fwd"
    )


def test_live_blocks_by_their_innermost_library_frames():
    """--frames: a block a library allocated inside a call of sftop's is named by the library's line."""
    inner = [
        {"filename": "/x/torch/nn/modules/sparse.py", "line": 190, "name": "forward"},
        {"filename": "/env/site-packages/transformers/models/qwen2_5_vl/modeling.py", "line": 1201, "name": "forward"},
        {"filename": "/env/site-packages/sftop/kernels/patching/parts/loss.py", "line": 62, "name": "_forward"},
        {"filename": "/bench/step_bench.py", "line": 5, "name": "step"},
    ]
    scatter = [dict(inner[1], line=1250), *inner[2:]]
    trace = [
        {"action": "alloc", "addr": 1, "size": 16, "frames": inner},
        {"action": "alloc", "addr": 2, "size": 16, "frames": scatter},
        {"action": "alloc", "addr": 3, "size": 4, "frames": scatter},
    ]
    assert memory_peak.peak_blocks(trace)[2] == {"kernels/patching/parts/loss.py:62 _forward": 36}
    assert memory_peak.peak_blocks(trace, depth=2)[2] == {
        "transformers/models/qwen2_5_vl/modeling.py:1250 < sftop/kernels/patching/parts/loss.py:62": 20,
        "transformers/models/qwen2_5_vl/modeling.py:1201 < sftop/kernels/patching/parts/loss.py:62": 16,
    }


def test_library_frames_count_in_an_environment_under_a_torch_or_python3_folder():
    """A venv at /opt/torch/.venv/lib/python3.12/site-packages: transformers' frames are still a
    library's, torch's own and the standard library's are not (they once hid every transformers
    line, leaving sftop's call of the backbone as the innermost frame)."""
    env = "/opt/torch/.venv/lib/python3.12/site-packages"
    frames = [
        {"filename": f"{env}/torch/nn/modules/sparse.py", "line": 190, "name": "forward"},
        {"filename": "/usr/lib/python3.12/contextlib.py", "line": 81, "name": "inner"},
        {"filename": f"{env}/transformers/models/qwen2_5_vl/modeling.py", "line": 1201, "name": "forward"},
        {"filename": "/work/repo/sftop/kernels/patching/parts/loss.py", "line": 62, "name": "_forward"},
    ]
    assert [memory_peak._outside_torch(f) for f in frames] == [False, False, True, True]
    trace = [{"action": "alloc", "addr": 1, "size": 16, "frames": frames}]
    assert memory_peak.peak_blocks(trace, depth=2)[2] == {
        "transformers/models/qwen2_5_vl/modeling.py:1201 < sftop/kernels/patching/parts/loss.py:62": 16
    }


def test_pool_reservations_split_the_ordinary_cache_from_each_graph_pool():
    segments = [
        {"segment_pool_id": (0, 0), "total_size": 100, "allocated_size": 40},
        {"segment_pool_id": (1, 2), "total_size": 60, "allocated_size": 10},
        {"segment_pool_id": (0, 0), "total_size": 20, "allocated_size": 20},
        {"segment_pool_id": (1, 5), "total_size": 8, "allocated_size": 0},
        {"total_size": 4, "allocated_size": 4},  # an older torch without pool ids: the ordinary cache
    ]
    assert memory_peak.pool_reservations(segments) == {
        "default": {"reserved": 124, "allocated": 64},
        "graphs(1, 2)": {"reserved": 60, "allocated": 10},
        "graphs(1, 5)": {"reserved": 8, "allocated": 0},
    }
