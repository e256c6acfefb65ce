"""End to end in a real terminal: launch the demo from the TUI, drop the terminal, re-attach.

tmux plays the SSH session: killing it sends SIGHUP to everything in it, as a dropped
connection does. The run must survive that, finish, and `sftop attach` must show it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)"),
]


class Tmux:
    """One private tmux server (its own socket), so the test never touches the user's sessions."""

    def __init__(self, socket: str):
        self.socket = socket

    def __call__(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=False)
        if check and out.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def start(self, session: str, command: str) -> None:
        self("new-session", "-d", "-s", session, "-x", "80", "-y", "24", command)

    def screen(self, session: str) -> str:
        return self("capture-pane", "-p", "-t", session, check=False)

    def keys(self, session: str, *keys: str) -> None:
        self("send-keys", "-t", session, *keys)

    def wait_for(self, session: str, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen(session)
            if text in screen:
                return screen
            time.sleep(0.5)
        raise AssertionError(f"{text!r} did not appear within {timeout} s; the screen was:\n{screen}")


def wait_file(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def events(run: Path) -> list[dict]:
    try:
        lines = (run / "events.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def test_run_survives_a_dropped_terminal_and_attach_shows_it(tmp_path, monkeypatch):
    from sftop.engine.presets import load_preset, save_user_preset

    home = tmp_path / "home"
    monkeypatch.setenv("SFTOP_HOME", str(home))
    # The demo, cut to 24 steps so the whole test takes about a minute on a CPU.  Fewer would end
    # within a poll or two of the first step (a demo step is 0.1-0.2 s on 2 cores), and the
    # terminal would then drop after the run, proving nothing.
    demo, _ = load_preset("demo", ["train.max_steps=24", "train.save_steps=8"])
    save_user_preset(demo, "e2e-demo")
    env = {
        "SFTOP_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "TERM": "xterm-256color",
        "TEXTUAL_ANIMATIONS": "none",
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(tmp_path)),
    }
    prefix = "env -i " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    sftop = f"{shlex.quote(sys.executable)} -m sftop"
    tmux = Tmux(f"sftop-e2e-{os.getpid()}")
    try:
        tmux.start("ssh", f"{prefix} {sftop} tui e2e-demo")  # the wizard, preloaded with the preset
        tmux.wait_for("ssh", "builtin:demo-tiny", timeout=60)
        tmux.keys("ssh", "C-n")
        tmux.wait_for("ssh", "no problems found", timeout=180)
        tmux.keys("ssh", "C-n")
        screen = tmux.wait_for("ssh", "max steps", timeout=30)
        assert any(line.split() == ["max", "steps", "24"] for line in screen.splitlines()), screen
        tmux.keys("ssh", "C-n")
        tmux.wait_for("ssh", "headroom", timeout=120)
        tmux.keys("ssh", "C-n")
        tmux.wait_for("ssh", "24 steps", timeout=30)
        # Save as a preset (tabbing away and back keeps the name: tests/tui/test_launch_step.py)
        tmux.keys("ssh", "e2e-saved")
        tmux.wait_for("ssh", "save as preset  e2e-saved", timeout=30)
        tmux.keys("ssh", "C-n")
        tmux.wait_for("ssh", "Checkpoint now", timeout=30)  # the dashboard's footer

        runs = home / "state" / "runs"
        run = wait_file(lambda: next(iter(runs.iterdir()), None) if runs.is_dir() else None, 30, "the run dir")
        wait_file(lambda: any(e["type"] == "step" for e in events(run)), 600, "the first training step")
        assert not any(e["type"] == "run_finished" for e in events(run)), "the run ended before the drop"

        tui_pid = int(tmux("list-panes", "-t", "ssh", "-F", "#{pane_pid}").split()[0])
        tmux("kill-session", "-t", "ssh")  # the SSH connection drops: SIGHUP to the TUI
        wait_file(lambda: not Path(f"/proc/{tui_pid}").exists() or _zombie(tui_pid), 30, "the TUI to exit")
        assert json.loads((run / "status.json").read_text())["status"] in ("running", "finished")
        status = wait_file(
            lambda: (
                (s := json.loads((run / "status.json").read_text())).get("status") in ("finished", "failed", "stopped")
                and s
            ),
            600,
            "the run to end",
        )
        assert status["status"] == "finished", (run / "stdout.log").read_text()[-3000:]
        finished = [e for e in events(run) if e["type"] == "run_finished"]
        assert len(finished) == 1 and finished[0]["step"] == 24
        final = finished[0]["final_loss"]

        tmux.start("again", f"{prefix} {sftop} attach")
        screen = tmux.wait_for("again", "finished", timeout=60)
        screen = tmux.wait_for("again", f"final loss {final:.4f}", timeout=30)
        assert "step 24/24" in screen
        assert run.name[:20] in screen
        # 80x24: every stats row, and no line that is only a scrollbar's glyph
        assert "checkpoint     step " in screen and "grad norm" in screen, screen
        lone = [
            line
            for line in screen.splitlines()
            if line.strip("│╭╮╰╯─ ") and set(line.strip("│╭╮╰╯─ ")) <= set("▁▂▃▄▅▆▇█▉▊▋▌▍▎▏▐")
        ]
        assert not lone, screen
        assert load_preset("e2e-saved")[0].train.max_steps == 24  # saved under the name typed
    finally:
        tmux("kill-server", check=False)
