"""Command palette (ctrl+p): the same actions as the keys, plus one entry per run and preset."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

from sftop.engine.presets import list_presets
from sftop.engine.runs import list_runs

if TYPE_CHECKING:
    from sftop.tui.app import SftopApp

Entry = tuple[str, str, Callable[[], Any]]


class SftopCommands(Provider):
    async def startup(self) -> None:
        # Listing runs reads files: do it once per palette opening, off the event loop.
        worker = self.app.run_worker(self._collect, thread=True)
        self._entries = await worker.wait()

    def _collect(self) -> list[Entry]:
        app = cast("SftopApp", self.app)
        entries: list[Entry] = [
            ("New run", "Start the new-run wizard", app.action_new_run),
            ("Runs", "List every run: attach, inspect, resume, stop, export", app.action_runs),
            ("Attach to the newest run", "Open the dashboard of the newest run", app.action_attach_latest),
            ("Quit", "Quit sftop (training keeps running)", app.action_request_quit),
        ]
        for summary in list_runs():
            entries.append(
                (
                    f"Attach {summary.name}",
                    f"{summary.status}, step {summary.progress}",
                    partial(app.attach, summary.run),
                )
            )
            if summary.active:
                entries.append(
                    (
                        f"Stop {summary.name}",
                        "SIGTERM: it saves a checkpoint, then exits",
                        partial(app.stop_run, summary.run),
                    )
                )
            elif summary.status in ("stopped", "failed", "lost") and summary.run.complete_checkpoints():
                entries.append(
                    (
                        f"Resume {summary.name}",
                        "continue from its newest checkpoint",
                        partial(app.resume_run, summary.run),
                    )
                )
            if summary.run.adapter.is_dir():
                entries.append(
                    (
                        f"Export {summary.name}",
                        "write its LoRA adapter for use elsewhere",
                        partial(app.export_run, summary.run),
                    )
                )
                entries.append(
                    (
                        f"Export {summary.name} to GGUF",
                        "merge and write one file for llama.cpp / Ollama",
                        partial(self._export_gguf, summary.run),
                    )
                )
        for info in list_presets():
            entries.append(
                (
                    f"Re-run preset {info.name}",
                    info.description or info.origin,
                    partial(app.new_run, preset=info.name, jump_to_plan=True),
                )
            )
        return entries

    def _export_gguf(self, run) -> None:
        from sftop.tui.screens.gguf_export import GgufExportScreen

        self.app.push_screen(GgufExportScreen(run))

    async def discover(self) -> Hits:
        for name, help_text, callback in self._entries[:12]:
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, callback in self._entries:
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
