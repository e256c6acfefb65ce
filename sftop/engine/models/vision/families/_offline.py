"""Pieces every family's offline processor is built from: a small byte-level BPE tokenizer.

A family's real tokenizer has 32k-260k tokens and lives on the hub. For tests and the built-in
demo each family builds a tokenizer locally instead: byte-level BPE (so any text encodes) trained
in-process on a short corpus, with the family's special tokens under their real strings. The
special tokens are given first, so their ids are their positions in the family's list: the tiny
configs can name them (`image_token_id`, ...) without building the tokenizer.
"""

from __future__ import annotations

from typing import Any, Sequence

# Words of chat turns and of image questions (colours, shapes, counts, positions), so the BPE
# merges are the ones such rows need and sequences stay short.
_WORDS = (
    "what is the colour color of shape in this image picture how many are there left right top bottom "
    "middle centre center red green blue yellow purple orange black white grey circle square triangle "
    "star one two three four five six seven eight nine ten answer question describe both images first "
    "second third which is larger smaller same different yes no you are a helpful assistant please "
    "look at and the user system quick brown fox jumps over lazy dog hello world answer with a word only"
).split()


def _corpus() -> list[str]:
    lines = [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 6)]
    lines += [w.capitalize() + "?" for w in _WORDS] + [w + "." for w in _WORDS]
    lines.append(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()[]{}<>/\\|-_+=*&^%$#@~`\n\n"
    )
    return lines * 4


def build_tokenizer(
    specials: Sequence[str],
    *,
    chat_template: str,
    eos: str,
    pad: str,
    bos: str | None = None,
    unk: str | None = None,
    vocab_size: int,
    extra: dict[str, str] | None = None,
):
    """A fast tokenizer with `specials` at ids 0..len-1 and at most `vocab_size` tokens in all.

    `extra` sets named multimodal tokens the family's processor reads from the tokenizer
    (`image_token`, `boi_token`, ...); they must be among `specials`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    kwargs: dict[str, Any] = dict(eos_token=eos, pad_token=pad)
    if bos is not None:
        kwargs["bos_token"] = bos
    if unk is not None:
        kwargs["unk_token"] = unk
    extra = dict(extra or {})
    missing = [t for t in extra.values() if t not in specials]
    if missing:
        raise ValueError(f"multimodal tokens {missing} must be among the special tokens")
    if extra:
        kwargs["extra_special_tokens"] = extra
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    # Every family token is special: decoding keeps it whole and the text path's mask logic
    # (whitespace after an end-of-turn token is not trained) recognises end-of-turn markers.
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in specials if t not in (eos, pad, bos, unk)]},
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = chat_template
    tokenizer.padding_side = "right"
    ids = [tokenizer.convert_tokens_to_ids(t) for t in specials]
    if ids != list(range(len(specials))) or len(tokenizer) > vocab_size:
        raise AssertionError(f"offline tokenizer layout broke: special ids {ids}, {len(tokenizer)} tokens")
    return tokenizer


def token_ids(specials: Sequence[str]) -> dict[str, int]:
    """The ids `build_tokenizer` gives `specials` (their positions), for the tiny configs."""
    return {token: i for i, token in enumerate(specials)}


def image_only(processor_class):
    """`processor_class` without its video processor.

    Qwen-VL and SmolVLM processors take a video processor, and transformers checks it against
    `transformers.BaseVideoProcessor`, which is a placeholder that matches nothing when
    torchvision is not installed. sftop trains on images only, so the offline processors (and
    `VisionFamily.load_processor` without torchvision) use this subclass: the same class (same
    `__call__`, same expansion, saved under the parent's name so `AutoProcessor` loads it back as
    the family's processor where torchvision is installed), with no video processor attribute.
    Its `__init__` shows the parent's signature less `video_processor`, which is what transformers
    reads to list the sub-processors and the settings it saves (`image_seq_len`, ...).
    """
    import inspect

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        # ProcessorMixin pairs the parent's positional sub-processors with this class's attribute
        # list, which has no video processor, so the third (None) is dropped.
        processor_class.__init__(self, image_processor, tokenizer, None, **kwargs)

    parent = inspect.signature(processor_class.__init__)
    __init__.__signature__ = parent.replace(
        parameters=[p for p in parent.parameters.values() if p.name != "video_processor"]
    )

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # SmolVLM's override only fills in video sampling defaults from the video processor.
        from transformers.processing_utils import ProcessorMixin

        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    body = {"__init__": __init__, "__module__": __name__}
    if "apply_chat_template" in processor_class.__dict__:
        body["apply_chat_template"] = apply_chat_template
    subclass = type(processor_class.__name__, (processor_class,), body)
    subclass.__qualname__ = processor_class.__qualname__
    return subclass
