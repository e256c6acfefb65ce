"""What sftop needs to know about one vision-language family, in one place.

Each family (Qwen2-VL, Gemma 3, ...) is one module under `families/` that defines a subclass of
`VisionFamily` and an instance named `FAMILY`; `registry` collects them. The data layer, the
collator, the loader, the planner and the tests ask the family, never branch on its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

from sftop.engine.data.images import ImageRules

# The parts of a VLM that LoRA may adapt; presets choose among them (`lora.parts`).
LORA_PARTS: tuple[str, ...] = ("language", "vision", "attention", "mlp", "projector")


@dataclass(frozen=True)
class LoraTargets:
    """Regular expressions (matched with `re.fullmatch` against module names) for each part.

    A module is adapted when it matches one of the chosen *location* parts (language, vision,
    projector) and, where `attention`/`mlp` are chosen, one of those *kind* patterns too.
    """

    language: str
    vision: str
    projector: str
    attention: str
    mlp: str

    def pattern(self, part: str) -> str:
        return getattr(self, part)


class VisionFamily(ABC):
    """One vision-language family. Subclasses set the class attributes and the methods."""

    name: str  # our id, e.g. "qwen2_vl"
    display_name: str  # e.g. "Qwen2-VL"
    model_types: tuple[str, ...]  # the HF `config.model_type` values this family covers
    # the text layers' model_type in the kernel patch registry (sftop.kernels.patching.registry),
    # or None where the family's language layers are not ones the registry knows (stock path)
    language_model_type: str | None
    # tokens that stand for images (placeholders, soft tokens, begin/end markers): never trained on
    image_token_strings: tuple[str, ...]
    image_rules: ImageRules
    lora_targets: LoraTargets
    default_lora_parts: tuple[str, ...] = ("language", "attention", "mlp")
    supports_multiple_images: bool = True
    supports_system_turn: bool = True
    # whether a batch may hold rows without images next to rows with images (mllama's processor
    # refuses such a batch: keep its text-only rows in batches of their own, or drop them)
    mixes_text_only_rows: bool = True
    # Why several rows cannot share one padding-free micro-batch row in this family, or None where
    # they can (`packer`: sftop.engine.models.vision.packing for 3-D positions, packing_text_positions
    # for 1-D ones; isolation checked by tests/vision/test_vlm_packing.py for the family)
    packing_refusal: str | None = (
        "its batches carry per-row image layouts (tiles, cross-attention or image masks) that "
        "padding-free packing does not keep apart yet"
    )

    def packer(self, model: Any) -> Any:
        """What packs this family's rows where `packing_refusal` is None: an object with
        `.pack(samples)` (one padding-free row), `.config` and `.positions` (what restarts per
        sample), small and picklable for data-loader workers; built from the (PEFT-wrapped) model."""
        raise NotImplementedError(f"{self.display_name} rows are not packed: {self.packing_refusal}")

    @abstractmethod
    def tiny_config(self) -> Any:
        """A random-init config small enough to train on a CPU in seconds (tests and demos)."""

    def tiny_model(self, seed: int = 0) -> Any:
        """The random-init model of `tiny_config()` (fixed seed), with its image path open.

        Random init closes some image paths that real checkpoints have open: Gemma 3's projector
        starts at zeros and Llama 3.2 Vision's cross-attention gates at zero, so the images of a
        tiny model would not reach its loss and a LoRA fine-tune (which adapts neither) could never
        use them. `open_image_path` sets them as a trained model has them.
        """
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_class().from_config(self.tiny_config())
            with torch.no_grad():
                self.open_image_path(model)
        return model

    def open_image_path(self, model: Any) -> None:
        """Give parameters that random init leaves at zero on the image path (see `tiny_model`)
        trained-like values. Nothing to do for most families."""
        return None

    @abstractmethod
    def offline_processor(self) -> Any:
        """The family's processor (tokenizer with its special tokens and chat template, image
        processor) built locally, without the hub: for tests and the built-in demo."""

    @abstractmethod
    def image_token_count(self, processor: Any, width: int, height: int) -> int:
        """Exact number of tokens one image of this (already resized) size becomes in the input
        ids, taken from the processor's own arithmetic, begin/end markers included."""

    @abstractmethod
    def vision_patches(self, processor: Any, config: Any, width: int, height: int) -> int:
        """How many positions the vision tower computes for one (already resized) image: patches
        of every tile or crop it sees, with the class and padding positions the tower adds. For
        the planner's vision-tower activations; the language model's share is
        `image_token_count`."""

    def language_model_type_for(self, config: Any) -> str | None:
        """`language_model_type` for one loaded config: families whose checkpoints come with
        different language models (LLaVA: Vicuna, Mistral, Llama 3, ...) read it from the config."""
        return self.language_model_type

    def image_placeholder(self, processor: Any) -> str:
        """The token string the chat template renders for each image and the processor then
        expands (`<|image_pad|>`, `<image>`, `<start_of_image>`, ...)."""
        return processor.image_token

    @abstractmethod
    def image_expansion(self, processor: Any, width: int, height: int) -> str:
        """The text one `image_placeholder` becomes for an image of this (already resized) size,
        exactly as the processor expands it, computed from sizes alone (no pixels): the collator's
        per-row encoding uses it to count and mask a row's tokens without running the image
        processor, and checks it against the processor's real output whenever it collates."""

    def processor_images(self, images_per_row: list[list[Any]]) -> Any:
        """The `images` argument of the processor's call for a batch: one list per row by default."""
        return images_per_row

    def pil_processor_classes(self) -> tuple[Any, Any] | None:
        """(processor class, PIL image processor class) for families whose processor cannot be
        loaded by `AutoProcessor` without torchvision (see `load_processor`); None for the others."""
        return None

    def load_processor(self, source: str, **kwargs: Any) -> Any:
        """The processor of a checkpoint (hub id or local directory).

        `AutoProcessor` where it works. Without torchvision, Qwen-VL's processors still ask for a
        video processor and Idefics3/SmolVLM's image processors are only found through their
        torchvision class, so for those families the processor is assembled from the checkpoint's
        own parts instead: its tokenizer, its image processor config read by the PIL class, and its
        processor config (chat template, image_seq_len, ...). Images only, no video.
        """
        import importlib.util
        import inspect

        from transformers import AutoProcessor, AutoTokenizer

        classes = self.pil_processor_classes()
        if classes is None:
            return AutoProcessor.from_pretrained(source, **kwargs)
        if importlib.util.find_spec("torchvision") is not None:
            try:
                return AutoProcessor.from_pretrained(source, **kwargs)
            except OSError as exc:
                # A checkpoint saved where torchvision was missing (a tiny test model, an export made
                # on such a machine) has no video processor, which AutoProcessor then insists on:
                # assemble it from its parts, as without torchvision.
                if "video processor" not in str(exc).lower():
                    raise
        processor_class, image_processor_class = classes
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        image_processor = image_processor_class.from_pretrained(source, **kwargs)
        settings, _ = processor_class.get_processor_dict(source, **kwargs)
        accepted = set(inspect.signature(processor_class.__init__).parameters)
        accepted -= {"self", "image_processor", "tokenizer"}
        return processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            **{key: value for key, value in settings.items() if key in accepted},
        )

    def model_class(self) -> Any:
        """The transformers class that loads this family for training (a default that works for
        most; families override it where `AutoModelForImageTextToText` does not fit)."""
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def configure_processor(self, processor: Any, rules: ImageRules) -> None:
        """Set the processor's own image budget to `rules` (the loader and the collator call this
        once), so that it keeps the sizes the data layer chose and `image_token_count` /
        `image_expansion`, which read the processor's state, match what it emits. Nothing to do for
        families whose tower takes a fixed size."""
        return None

    def processor_kwargs(self, rules: ImageRules) -> Mapping[str, Any]:
        """Keyword arguments for the processor's call so that it keeps the images at the sizes the
        data layer already chose (no second resize). Empty by default."""
        return {}
