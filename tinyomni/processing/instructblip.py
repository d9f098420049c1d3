"""BLIP-2 / InstructBLIP prompts: query-token placeholders first, and the instruction for the Q-Former.

transformers' Blip2Processor / InstructBlipProcessor write `num_query_tokens` image tokens per image at
the very start of the input ids, before the tokenizer's BOS, and nothing where the image sits
(`OmniConfig.image_prompt = "prefix"`, done in `ChatProcessor._prefix_ids`). InstructBlipProcessor also
tokenizes the same prompt text with the Q-Former's own tokenizer (a BERT WordPiece: [CLS] text [SEP]); the
ids go to the Q-Former with each image (`Prompt.qformer_input_ids`).

The images themselves need nothing of their own: BlipImageProcessor's plain bicubic resize to a square is
`image_resize = "tiles"` with one tile (processing/image.py).

The Q-Former tokenizer travels with the main one, as its `qformer_tokenizer` attribute (set by
`attach_instruction_tokenizer` when a checkpoint is imported), since the model's processor is built from
the main tokenizer alone. A saved checkpoint keeps it in `qformer_tokenizer/`, as upstream does.
"""

from __future__ import annotations

from pathlib import Path

from tinyomni.errors import InputError
from tinyomni.processing.tokenizer import Tokenizer

# The hub's InstructBLIP / BLIP-2 checkpoints ship no chat template: the processor takes the prompt text as it
# is. This one writes each message's text as it is, a space between messages, so one question is itself.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ ' ' }}{% endif %}{{ message['content'] }}{% endfor %}"
)
ATTRIBUTE = "qformer_tokenizer"
TOKENIZER_DIR = "qformer_tokenizer"  # where InstructBlipProcessor.save_pretrained writes it, and so do we


def attach_instruction_tokenizer(tokenizer: Tokenizer, qformer: Tokenizer) -> None:
    """Make `qformer` the Q-Former tokenizer that comes with `tokenizer`."""
    setattr(tokenizer, ATTRIBUTE, qformer)


def save_instruction_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """Write the attached Q-Former tokenizer (if any) where a checkpoint keeps it, so it loads back."""
    qformer = getattr(tokenizer, ATTRIBUTE, None)
    if qformer is not None:
        (directory / TOKENIZER_DIR).mkdir(exist_ok=True)
        qformer.save(directory / TOKENIZER_DIR)


def read_instruction_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """Attach the Q-Former tokenizer a checkpoint directory keeps (a saved InstructBLIP), if it has one."""
    if (directory / TOKENIZER_DIR / "tokenizer.json").is_file():
        attach_instruction_tokenizer(tokenizer, Tokenizer.from_dir(directory / TOKENIZER_DIR))


def instruction_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """The Q-Former tokenizer that came with `tokenizer`, or an InputError saying it is missing."""
    qformer = getattr(tokenizer, ATTRIBUTE, None)
    if qformer is None:
        raise InputError("this model's Q-Former reads the instruction in its own vocabulary (InstructBLIP), but "
                         "its tokenizer did not come with the model (an imported checkpoint's qformer_tokenizer/)")
    return qformer


def instruction_ids(qformer: Tokenizer, text: str) -> list[int]:
    """The prompt text as InstructBlipProcessor gives it to the Q-Former: with the tokenizer's own special
    tokens ([CLS] … [SEP]), no truncation."""
    return qformer.backend.encode(text, add_special_tokens=True).ids
