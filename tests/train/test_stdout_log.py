"""stdout.log gets every line once: teed in the foreground, not doubled under the supervisor."""

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from pathlib import Path
from sftop.engine.train.runner import _Tee
log = Path(sys.argv[1])
with _Tee(log):
    print("hello from the trainer")
    print("an error line", file=sys.stderr)
print("after the run")
"""


def _run(log: Path, stdout):
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log)],
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=True,
    )


def test_foreground_run_is_teed_to_the_log(tmp_path):
    log = tmp_path / "stdout.log"
    result = _run(log, subprocess.PIPE)
    assert "hello from the trainer" in result.stdout and "after the run" in result.stdout
    text = log.read_text()
    assert text.count("hello from the trainer") == 1 and text.count("an error line") == 1
    assert "after the run" not in text


def test_supervised_run_is_not_doubled(tmp_path):
    log = tmp_path / "stdout.log"
    with open(log, "ab") as fh:  # what the supervisor does: the child's stdout/stderr are the log
        _run(log, fh)
    text = log.read_text()
    assert text.count("hello from the trainer") == 1 and text.count("an error line") == 1
    assert text.count("after the run") == 1
