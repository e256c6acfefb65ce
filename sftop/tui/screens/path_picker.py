"""Pick a file (a dataset) or a directory (a model) from a tree, with the keyboard."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DirectoryTree, Static

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")


class FilteredTree(DirectoryTree):
    """Directories, plus files with the wanted suffixes; hidden entries left out."""

    def __init__(self, path: Path, suffixes: tuple[str, ...] | None, **kwargs):
        super().__init__(path, **kwargs)
        self.suffixes = suffixes

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        for path in paths:
            if path.name.startswith("."):
                continue
            try:
                if path.is_dir() or self.suffixes is None or path.suffix.lower() in self.suffixes:
                    yield path
            except OSError:
                continue


class PathPickerScreen(ModalScreen["Path | None"]):
    """`want="file"`: enter on a file picks it. `want="dir"`: s picks the highlighted directory."""

    CSS_PATH = "modal.tcss"
    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("s", "pick_dir", "Pick directory"),
        Binding("backspace", "up", "Parent directory"),
    ]

    def __init__(self, want: str = "file", start: Path | None = None, suffixes: tuple[str, ...] | None = DATA_SUFFIXES):
        super().__init__()
        self.want = want
        self.start = (start or Path.cwd()).expanduser()
        self.suffixes = suffixes if want == "file" else ()

    def compose(self) -> ComposeResult:
        hint = (
            "enter: open a folder or pick a file"
            if self.want == "file"
            else "enter: open a folder   s: pick the highlighted folder"
        )
        with Vertical(id="dialog", classes="wide"):
            yield Static(f"Choose a {'dataset file' if self.want == 'file' else 'model directory'}", id="dialog-title")
            yield FilteredTree(self.start, self.suffixes, id="picker-tree")
            yield Static(f"{hint}   backspace: parent folder   escape: cancel", id="dialog-hint")

    def on_mount(self) -> None:
        tree = self.query_one(FilteredTree)
        tree.border_title = str(self.start)
        tree.focus()

    @on(DirectoryTree.FileSelected)
    def on_file(self, event: DirectoryTree.FileSelected) -> None:
        if self.want == "file":
            self.dismiss(Path(event.path))

    def action_pick_dir(self) -> None:
        if self.want != "dir":
            return
        node = self.query_one(FilteredTree).cursor_node
        if node is not None and node.data is not None:
            path = Path(node.data.path)
            self.dismiss(path if path.is_dir() else path.parent)

    def action_up(self) -> None:
        tree = self.query_one(FilteredTree)
        parent = Path(tree.path).resolve().parent
        tree.path = parent
        tree.border_title = str(parent)

    def action_cancel(self) -> None:
        self.dismiss(None)
