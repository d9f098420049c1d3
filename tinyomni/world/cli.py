"""`tinyomni world ...`: generate data sets, preview samples, write the world-bench, list skills, and
make preference data from a model's mistakes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tinyomni.errors import InputError
from tinyomni.world.bench import BENCH_N, BENCH_NAME, write_bench
from tinyomni.world.generator import DifficultySpec, generate, make_sample, parse_sample_id, resolve_skills
from tinyomni.world.preview import write_preview
from tinyomni.world.sample import Difficulty
from tinyomni.world.skills import SKILLS
from tinyomni.world.splits import SPLITS
from tinyomni.world.writers import write_dataset


def register(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser("world", help="the synthetic multimodal world: generate, preview, bench")
    sub = world.add_subparsers(dest="world_command", required=True)

    gen = sub.add_parser("generate", help="write a data set (JSONL + media) of world samples")
    gen.add_argument("--out", "-o", required=True, help="output folder")
    _common(gen, n_default=100, n_help="samples per skill")
    gen.add_argument("--name", help="JSONL file name without .jsonl (default: the split)")
    gen.add_argument("--workers", type=int, default=1, help="parallel processes (output is identical)")
    _knobs(gen)
    gen.set_defaults(func=_generate)

    prev = sub.add_parser("preview", help="a contact sheet (PNG, or HTML with playable audio) of samples")
    prev.add_argument("--out", "-o", default="world_preview.png", help="a .png or .html path")
    _common(prev, n_default=1, n_help="samples per skill")
    prev.add_argument("--columns", type=int, default=4)
    prev.add_argument("--predictions", help="an eval's predictions.jsonl on world samples: show those samples "
                      "(the first --n per skill) with what the model said, green if right, red if wrong")
    _knobs(prev)
    prev.set_defaults(func=_preview)

    bench = sub.add_parser("bench",
                           help=f"write the standard suite ({BENCH_NAME}: the test split of every skill)")
    bench.add_argument("--out", "-o", default=BENCH_NAME, help="output folder")
    bench.add_argument("--n", type=int, default=BENCH_N, help=f"samples per skill (standard: {BENCH_N})")
    bench.add_argument("--workers", type=int, default=1)
    bench.set_defaults(func=_bench)

    prefs = sub.add_parser("preferences", help="preference data (JSONL) for a dpo stage from a model's own "
                           "mistakes: chosen = the exact answer, rejected = the model's wrong answer")
    prefs.add_argument("--model", "-m", required=True, help="a model for tinyomni.load (name or checkpoint dir)")
    prefs.add_argument("--out", "-o", required=True, help="the JSONL to write (media go beside it, under media/)")
    _common(prefs, n_default=50, n_help="questions per skill")
    prefs.add_argument("--batch-size", type=int, default=8)
    prefs.add_argument("--max-new-tokens", type=int, default=32)
    _knobs(prefs)
    prefs.set_defaults(func=_preferences)

    skills = sub.add_parser("skills", help="list the skills and what each asks")
    skills.set_defaults(func=_skills)


def _common(p: argparse.ArgumentParser, n_default: int, n_help: str) -> None:
    p.add_argument("--skills", default="all", help=f"comma-separated skills or 'all' ({', '.join(SKILLS)})")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--n", type=int, default=n_default, help=n_help)
    p.add_argument("--seed", type=int, default=0)


def _knobs(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("difficulty (all skills; see `tinyomni world skills` for which reads what)")
    for f in dataclasses.fields(Difficulty):
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"knob_{f.name}", type=type(f.default),
                           default=None, help=f"default {f.default}")
    group.add_argument("--difficulty", help='JSON file of per-skill knobs, e.g. {"*": {"noise": 0.2}, '
                                            '"ocr": {"text_length": 4}}')


def difficulty_from_args(args: argparse.Namespace) -> DifficultySpec:
    flags = {k[len("knob_"):]: v for k, v in vars(args).items() if k.startswith("knob_") and v is not None}
    base = Difficulty().with_overrides(flags)
    if not getattr(args, "difficulty", None):
        return base
    try:
        spec = json.loads(Path(args.difficulty).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read difficulty file {args.difficulty}: {e}") from None
    if not isinstance(spec, dict):
        raise InputError(f"{args.difficulty} must hold a JSON object of skill -> knobs")
    default = base.with_overrides(spec.get("*", {}))
    per_skill = {"*": default}
    for skill, knobs in spec.items():
        if skill != "*":
            resolve_skills([skill])
            per_skill[skill] = default.with_overrides(knobs)
    return per_skill


def _generate(args: argparse.Namespace) -> int:
    skills = resolve_skills(args.skills)
    start = time.perf_counter()
    path = write_dataset(args.out, skills=skills, n=args.n, split=args.split, seed=args.seed,
                         difficulty=difficulty_from_args(args), name=args.name, workers=args.workers,
                         progress=True)
    total = args.n * len(skills)
    seconds = time.perf_counter() - start
    Console().print(f"wrote {total} samples to {path} in {seconds:.1f} s ({total / seconds:.0f} samples/s)")
    return 0


def predicted_samples(path: str, n: int, skills: str | None = None) -> tuple[list, list[tuple[str, bool]]]:
    """The world samples an eval scored (made again from their ids, default difficulty) with
    (prediction, correct) for each: the first `n` of every skill in the file."""
    from tinyomni.world.writers import read_records

    wanted = None if skills in (None, "all") else set(resolve_skills(skills))
    samples, said, per_skill = [], [], {}
    for row in read_records(Path(path)):
        try:
            skill, index, split, seed = parse_sample_id(str(row.get("id")))
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
        if (wanted is not None and skill not in wanted) or per_skill.get(skill, 0) >= n:
            continue
        per_skill[skill] = per_skill.get(skill, 0) + 1
        samples.append(make_sample(skill, index, split, seed))
        said.append((str(row.get("prediction", "")), float(row.get("score", 0.0)) >= 0.5))
    return samples, said


def _preview(args: argparse.Namespace) -> int:
    if args.predictions:
        samples, said = predicted_samples(args.predictions, args.n, args.skills)
        path = write_preview(samples, args.out, columns=args.columns, predictions=said)
        Console().print(f"wrote {len(samples)} samples with their predictions to {path}")
        return 0
    samples = list(generate(args.skills, n=args.n, split=args.split, seed=args.seed,
                            difficulty=difficulty_from_args(args)))
    path = write_preview(samples, args.out, columns=args.columns)
    Console().print(f"wrote a preview of {len(samples)} samples to {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    path = write_bench(args.out, n=args.n, workers=args.workers, progress=True)
    Console().print(f"wrote {BENCH_NAME} ({args.n} per skill) to {path}\n"
                    f"run it: tinyomni eval run {path} --model <model>")
    return 0


def _preferences(args: argparse.Namespace) -> int:
    import tinyomni
    from tinyomni.world.preferences import make_preferences

    model = tinyomni.load(args.model)
    start = time.perf_counter()
    counts = make_preferences(model, args.out, skills=resolve_skills(args.skills), split=args.split, n=args.n,
                              seed=args.seed, difficulty=difficulty_from_args(args), batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, progress=True)
    table = Table(title=f"preference pairs from {args.model}'s wrong answers ({args.split} split)")
    for column in ("skill", "asked", "wrong (pairs)", "right", "no answer"):
        table.add_column(column)
    for skill, c in counts.items():
        table.add_row(skill, str(c["asked"]), str(c["wrong"]), str(c["right"]), str(c["empty"]))
    console = Console()
    console.print(table)
    pairs = sum(c["wrong"] for c in counts.values())
    console.print(f"wrote {pairs} pairs to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _skills(args: argparse.Namespace) -> int:
    table = Table(title="tinyomni world skills")
    table.add_column("skill")
    table.add_column("what it asks, scoring and knobs")
    for name, fn in SKILLS.items():
        table.add_row(name, " ".join((fn.__doc__ or "").split()))
    Console().print(table)
    return 0
