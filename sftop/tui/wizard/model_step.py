"""Step 1, the model: the built-in demo, models in the local Hugging Face cache, a path or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from sftop.engine.presets import Preset
from sftop.tui.wizard.base import Step, StepError, with_fields
from sftop.tui.app_ref import sftop_app

DEMO = "builtin:demo-tiny"
DEMO_VLM = "builtin:demo-vlm-tiny"
BUILTINS = (DEMO, DEMO_VLM)


@dataclass
class CachedModels(Message):
    models: list[tuple[str, float]]  # repo id, size in GiB
    note: str | None
    vision: dict[str, str] | None = None  # repo id -> VLM family name, for the cached VLMs


def vision_label(name: str, cache_dir: str | None = None) -> str | None:
    """The VLM family's display name when `name` is a vision-language model (disk only), else None."""
    from sftop.engine.models.vision.detect import family_on_disk

    family = family_on_disk(name, cache_dir)
    return family.display_name if family is not None else None


def scan_cached_models(cache_dir: str | None = None) -> tuple[list[tuple[str, float]], str | None]:
    """Model repos in the local Hugging Face cache (disk only: never touches the network)."""
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError as exc:
        return [], f"cannot read the Hugging Face cache ({exc})"
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return [], "the Hugging Face cache is empty"
    except OSError as exc:
        return [], f"cannot read the Hugging Face cache ({exc})"
    repos = sorted((r for r in info.repos if r.repo_type == "model"), key=lambda r: r.repo_id.lower())
    return [(r.repo_id, r.size_on_disk / 2**30) for r in repos], None


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().is_dir()


class ModelStep(Step):
    title = "Model"
    BINDINGS = [Binding("ctrl+o", "browse", "Browse folders")]
    cache_scanned = False  # the HF cache's models are in the list (or its note, when there are none)

    def compose(self) -> ComposeResult:
        yield Static(
            "Pick a model, type a hub id (org/name) or a local directory, or browse with ctrl+o.", classes="help"
        )
        yield OptionList(
            Option(f"{DEMO}  built-in demo: tiny, trains on a CPU", id=DEMO),
            Option(f"{DEMO_VLM}  built-in vision demo: tiny VLM, trains on a CPU", id=DEMO_VLM),
            id="model-choices",
        )
        yield Input(placeholder="hub id, local path, or builtin:demo-tiny", id="model-input", compact=True)
        yield Static("", id="model-note", classes="note")

    def on_mount(self) -> None:
        self.query_one("#model-choices").border_title = "Built-in and cached models"
        self.scan()

    @work(thread=True, exclusive=True, exit_on_error=False, group="hf-cache", description="scan the HF cache")
    def scan(self) -> None:
        cache = sftop_app(self).services.hf_cache_dir
        models, note = scan_cached_models(cache)
        vision = {repo: label for repo, _ in models if (label := vision_label(repo, cache))}
        self.post_message(CachedModels(models, note, vision))

    @on(CachedModels)
    def on_cached(self, message: CachedModels) -> None:
        choices = self.query_one("#model-choices", OptionList)
        vision = message.vision or {}
        choices.add_options(
            Option(
                f"{repo}  cached, {size:.1f} GiB" + (f", vision-language ({vision[repo]})" if repo in vision else ""),
                id=repo,
            )
            for repo, size in message.models
        )
        if message.note and not message.models:
            choices.add_option(Option(f"({message.note})", disabled=True))
        self.cache_scanned = True

    @on(OptionList.OptionSelected, "#model-choices")
    @on(OptionList.OptionHighlighted, "#model-choices")
    def on_choice(self, event: OptionList.OptionMessage) -> None:
        # Highlighting happens on mount too; only a user moving through the list picks a model.
        if event.option_id and event.option_list.has_focus:
            self.query_one("#model-input", Input).value = event.option_id
        if isinstance(event, OptionList.OptionSelected):
            self.wizard.action_next()

    @on(Input.Changed, "#model-input")
    def on_typed(self, event: Input.Changed) -> None:
        name = event.value.strip()
        note = self.describe(name)
        label = vision_label(name, sftop_app(self).services.hf_cache_dir) if name else None
        if label and name != DEMO_VLM:
            note += f"\nA vision-language model ({label}): trains on rows with images."
        self.query_one("#model-note", Static).update(note)

    @on(Input.Submitted, "#model-input")
    def on_submitted(self) -> None:
        self.wizard.action_next()

    def action_browse(self) -> None:
        from sftop.tui.screens.path_picker import PathPickerScreen

        def picked(path: Path | None) -> None:
            if path is not None:
                self.query_one("#model-input", Input).value = str(path)
                self.query_one("#model-input", Input).focus()

        self.app.push_screen(PathPickerScreen("dir"), picked)

    @staticmethod
    def describe(name: str) -> str:
        if not name:
            return ""
        if name == DEMO:
            return "A tiny random-initialised Llama: shows the whole flow in about a minute, no download."
        if name == DEMO_VLM:
            return (
                "A tiny random-initialised vision-language model (Qwen2-VL): learns to answer questions "
                "about shapes in a few minutes on a CPU, no download."
            )
        if looks_like_path(name):
            path = Path(name).expanduser()
            if (path / "config.json").is_file():
                return f"Local model directory {path}"
            return f"[yellow]{path} is not a model directory (no config.json)[/]"
        if "/" in name:
            return "A hub id: downloaded when the run starts unless it is already cached."
        return "[yellow]Hub ids look like org/name[/]"

    def load(self, draft: Preset) -> None:
        self.query_one("#model-input", Input).value = draft.model.name

    def apply(self, draft: Preset) -> Preset:
        name = self.query_one("#model-input", Input).value.strip()
        if not name:
            raise StepError("Choose a model, or type a hub id or a local path")
        if looks_like_path(name) and not (Path(name).expanduser() / "config.json").is_file():
            raise StepError(f"{name} is not a model directory (it has no config.json)")
        if name.startswith("builtin:") and name not in BUILTINS:
            raise StepError(f"The built-in models are {DEMO} and {DEMO_VLM}")
        if looks_like_path(name):
            name = str(Path(name).expanduser().resolve())
        return with_fields(draft, model={"name": name})
