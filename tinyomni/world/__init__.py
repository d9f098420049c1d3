"""The synthetic multimodal world: seeded skills with exact answers, for training and evaluation.

    from tinyomni import world
    sample = world.make_sample("color", index=0, split="train", seed=0)   # a Sample (PIL images, ...)
    world.write_dataset("data/world", skills="all", n=1000, split="train")  # JSONL + media files
    for record in world.WorldStream(split="train"):                       # endless, for training
        msgs = world.messages(record)                                     # chat messages with answer
    world.write_preview(list(world.generate(n=1)), "preview.png")         # a contact sheet
    world.write_bench("world-bench")                                     # the standard test suite

See splits.py for how train, val and test are held apart, skills.py for what each skill asks.
"""

from tinyomni.errors import MissingDependencyError
from tinyomni.world.bench import BENCH_NAME, ensure_bench, write_bench
from tinyomni.world.generator import WorldStream, generate, make_sample, messages, resolve_skills, to_record
from tinyomni.world.preview import contact_sheet, write_preview
from tinyomni.world.sample import Difficulty, Sample
from tinyomni.world.skills import SKILLS, SPEECH_SKILLS
from tinyomni.world.splits import HELD_OUT_PAIRS, HELD_OUT_VOICES, HELD_OUT_WORDS, SPLITS
from tinyomni.world.writers import read_records, write_dataset, write_sample

__all__ = [
    "BENCH_NAME", "HELD_OUT_PAIRS", "HELD_OUT_VOICES", "HELD_OUT_WORDS", "SKILLS", "SPEECH_SKILLS", "SPLITS",
    "Difficulty", "MissingDependencyError", "Sample", "WorldStream", "contact_sheet", "ensure_bench",
    "generate", "make_sample", "messages", "read_records", "resolve_skills", "to_record", "write_bench",
    "write_dataset", "write_preview", "write_sample",
]
