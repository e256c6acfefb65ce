"""status.json has several writers (the supervisor, `sftop stop`, a foreground trainer): their
read-merge-writes are serialised, and a late "stopping" never replaces the status a run ended with."""

from __future__ import annotations

import threading

from sftop.engine.rundir import RunDir, _status_lock
from sftop.engine.supervisor import ACTIVE_STATUSES


def test_concurrent_writers_lose_no_fields(tmp_path):
    run = RunDir(tmp_path / "run").create()
    run.write_status(status="running")
    start = threading.Barrier(8)

    def writer(n: int) -> None:
        start.wait()
        for i in range(25):
            run.write_status(**{f"w{n}_{i}": i})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = run.read_status()
    assert status["status"] == "running"
    assert {k for k in status if k.startswith("w")} == {f"w{n}_{i}" for n in range(8) for i in range(25)}
    assert not list(run.path.glob("*.tmp"))


def test_a_late_stopping_never_replaces_the_final_status(tmp_path):
    run = RunDir(tmp_path / "run").create()
    run.write_status(status="running", pid=1)
    assert run.write_status(only_from=ACTIVE_STATUSES, status="stopping")["status"] == "stopping"
    run.write_status(status="stopped", exit_code=0)
    kept = run.write_status(only_from=ACTIVE_STATUSES, status="stopping", stop_requested=1.0)
    assert kept["status"] == "stopped" and "stop_requested" not in kept
    assert run.read_status() == {"status": "stopped", "pid": 1, "exit_code": 0}


def test_a_signal_handler_writing_inside_the_lock_does_not_wait_on_itself(tmp_path):
    run = RunDir(tmp_path / "run").create()
    run.write_status(status="running")
    done = []

    def main_thread_write_interrupted_by_a_handler():
        with _status_lock(run.path):  # the interrupted write holds the lock...
            run.write_status(status="stopping")  # ...and the handler's write, same thread, goes through
            done.append(True)

    t = threading.Thread(target=main_thread_write_interrupted_by_a_handler, daemon=True)
    t.start()
    t.join(timeout=10)
    assert done == [True] and run.read_status()["status"] == "stopping"
    # another thread waits for the holder instead
    order = []
    with _status_lock(run.path):
        other = threading.Thread(target=lambda: (run.write_status(status="running"), order.append("other")))
        other.start()
        other.join(timeout=0.3)
        order.append("holder")
    other.join(timeout=10)
    assert order == ["holder", "other"] and run.read_status()["status"] == "running"
