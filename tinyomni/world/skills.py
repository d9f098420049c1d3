"""The skills of the world: one function per capability, each turning a random stream into a Sample.

A skill is `fn(rng, split, difficulty) -> Sample`. `SKILLS` maps names to skills (a plain dict, in the
order the world-bench lists them). Every random choice comes from `rng`, so a sample is a pure
function of (seed, split, skill, index). The split decides which compositions may appear (see
splits.py): in test the object, word or voice a question is about is always a held-out one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

from tinyomni.world import speech as tts
from tinyomni.world.render import (
    COLORS,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    Obj,
    add_noise,
    background,
    draw_object,
    font,
    pick_font,
    place_objects,
    render_scene,
    text_size,
    ui_font,
)
from tinyomni.world.sample import Difficulty, Sample
from tinyomni.world.splits import any_words, pairs, target_pairs, voices, words

Skill = Callable[[random.Random, str, Difficulty], Sample]
Pair = tuple[str, str]  # (colour, shape)

ONE_WORD = "Answer with a single word."
NUMBER = "Answer with a number."
YES_NO = "Answer yes or no."


# --- helpers ---------------------------------------------------------------------------------------

def _size(rng: random.Random) -> str:
    return rng.choice(list(SIZES))


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("x") else shape + "s"


def _colors_for(split: str, shape: str) -> list[str]:
    return [c for c, s in pairs(split) if s == shape]


def _shapes_for(split: str, color: str) -> list[str]:
    return [s for c, s in pairs(split) if c == color]


def _n_objects(rng: random.Random, d: Difficulty, low: int = 1, high: int = 8) -> int:
    return rng.randint(max(low, d.min_objects), max(low, min(high, d.max_objects)))


def _describe(objects: list[Obj]) -> list[dict]:
    return [{"shape": o.shape, "color": o.color, "size": o.size, "x": o.x, "y": o.y} for o in objects]


def _scene(rng: random.Random, d: Difficulty, specs: list[tuple[str, str, str]],
           existing: list[Obj] | None = None) -> tuple[Image.Image, list[Obj]]:
    # Objects around fixed ones (`existing`) are distractors: dropped if the scene is too crowded.
    objects = place_objects(rng, specs, existing=existing, optional=existing is not None)
    return render_scene(objects, d.image_size, rng, d.noise), objects


def _distinct_pairs(rng: random.Random, split: str, n: int, exclude: set[Pair]) -> list[Pair]:
    pool = [p for p in pairs(split) if p not in exclude]
    return rng.sample(pool, n)


def _voice(rng: random.Random, split: str) -> dict:
    voice, variant = rng.choice(voices(split))
    return {"voice": voice, "variant": variant, "speed": rng.randint(130, 190), "pitch": rng.randint(35, 65)}


def _say(rng: random.Random, split: str, d: Difficulty, text: str) -> tuple:
    v = _voice(rng, split)
    samples = tts.speak(text, **v)
    samples = tts.add_noise(samples, rng.getrandbits(63), d.noise)
    return samples, {"transcript": text, **v}


# --- scenes of shapes ------------------------------------------------------------------------------

# Question wordings, shared by the skills and by the extra questions training asks about a scene.
COLOR_QUESTIONS = ("What color is the {s}?", "What is the color of the {s}?", "Which color does the {s} have?")
SHAPE_QUESTIONS = ("What shape is the {c} object?", "What is the shape of the {c} object?", "Which shape is {c}?")
EXISTS_QUESTIONS = ("Is there a {c} {s} in the image?", "Does the image contain a {c} {s}?")


@dataclass
class _SceneQA:
    """A question about one image, kept apart from its wording so spoken skills can reuse it."""

    image: Image.Image
    question: str  # the bare question, e.g. "What color is the star?"
    suffix: str  # the answer-format instruction
    answer: str
    candidates: list[str] | None
    meta: dict


def _color_qa(rng: random.Random, split: str, d: Difficulty) -> _SceneQA:
    n = _n_objects(rng, d, high=len(SHAPES))
    color, shape = rng.choice(target_pairs(split))
    others = rng.sample([s for s in SHAPES if s != shape], n - 1)  # unique shapes: "the star" is unambiguous
    specs = [(shape, color, _size(rng))]
    specs += [(s, rng.choice(_colors_for(split, s)), _size(rng)) for s in others]
    image, objects = _scene(rng, d, specs)
    q = rng.choice(COLOR_QUESTIONS)
    return _SceneQA(image, q.format(s=shape), ONE_WORD, color, list(COLORS),
                    {"objects": _describe(objects), "target": [color, shape]})


def _shape_qa(rng: random.Random, split: str, d: Difficulty) -> _SceneQA:
    n = _n_objects(rng, d, high=len(COLORS))
    color, shape = rng.choice(target_pairs(split))
    others = rng.sample([c for c in COLORS if c != color], n - 1)  # unique colours
    specs = [(shape, color, _size(rng))]
    specs += [(rng.choice(_shapes_for(split, c)), c, _size(rng)) for c in others]
    image, objects = _scene(rng, d, specs)
    q = rng.choice(SHAPE_QUESTIONS)
    return _SceneQA(image, q.format(c=color), ONE_WORD, shape, list(SHAPES),
                    {"objects": _describe(objects), "target": [color, shape]})


def _count_qa(rng: random.Random, split: str, d: Difficulty) -> _SceneQA:
    high = d.max_objects
    color, shape = rng.choice(target_pairs(split))
    # In test the question is always about a held-out pair, so it must be there at least once.
    kind = "pair" if split == "test" else rng.choice(["shape", "color", "pair"])
    k = rng.randint(1 if split == "test" else 0, high)
    rest = max(0, rng.randint(d.min_objects, d.max_objects) - k)
    if kind == "shape":
        q, match = f"How many {_plural(shape)} are there?", (lambda c, s: s == shape)
        specs = [(shape, rng.choice(_colors_for(split, shape)), _size(rng)) for _ in range(k)]
    elif kind == "color":
        q, match = f"How many {color} objects are there?", (lambda c, s: c == color)
        specs = [(rng.choice(_shapes_for(split, color)), color, _size(rng)) for _ in range(k)]
    else:
        q, match = f"How many {color} {_plural(shape)} are there?", (lambda c, s: (c, s) == (color, shape))
        specs = [(shape, color, _size(rng)) for _ in range(k)]
    others = [p for p in pairs(split) if not match(*p)]
    specs += [(s, c, _size(rng)) for c, s in (rng.choice(others) for _ in range(rest))]
    rng.shuffle(specs)
    image, objects = _scene(rng, d, specs)
    return _SceneQA(image, q, NUMBER, str(k), [str(i) for i in range(high + 1)],
                    {"objects": _describe(objects), "target": [color if kind != "shape" else None,
                                                               shape if kind != "color" else None]})


def color(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """The colour of the one object of a named shape. Knobs: image_size, min/max_objects, noise."""
    qa = _color_qa(rng, split, d)
    return Sample(f"{qa.question} {qa.suffix}", qa.answer, "exact_match", images=[qa.image],
                  candidates=qa.candidates, meta=qa.meta)


def shape(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """The shape of the one object of a named colour. Knobs: image_size, min/max_objects, noise."""
    qa = _shape_qa(rng, split, d)
    return Sample(f"{qa.question} {qa.suffix}", qa.answer, "exact_match", images=[qa.image],
                  candidates=qa.candidates, meta=qa.meta)


def count(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """How many objects of a shape, a colour, or both. Knobs: max_objects (also the largest count), noise."""
    qa = _count_qa(rng, split, d)
    return Sample(f"{qa.question} {qa.suffix}", qa.answer, "exact_match", images=[qa.image],
                  candidates=qa.candidates, meta=qa.meta)


RELATIONS = ("left", "right", "above", "below")


def relation(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """Where object A is relative to object B, as a lettered multiple choice. Knobs: objects, noise."""
    (ca, sa) = rng.choice(target_pairs(split))
    (cb, sb) = rng.choice([p for p in pairs(split) if p != (ca, sa)])
    where = rng.choice(RELATIONS)
    size_a, size_b = _size(rng), _size(rng)
    r = SIZES["large"] + 0.03
    # Far apart along one axis, close along the other, so the answer is unambiguous.
    near, far = rng.uniform(r, 1 - r), rng.uniform(r, 0.45 - r / 2)
    along_a, along_b = far, rng.uniform(far + 0.35, 1 - r)
    off_a = min(max(near + rng.uniform(-0.1, 0.1), r), 1 - r)
    if where in ("right", "below"):
        along_a, along_b = along_b, along_a
    along_a, along_b, off_a, near = (round(v, 4) for v in (along_a, along_b, off_a, near))
    if where in ("left", "right"):
        a, b = Obj(sa, ca, size_a, along_a, off_a), Obj(sb, cb, size_b, along_b, near)
    else:
        a, b = Obj(sa, ca, size_a, off_a, along_a), Obj(sb, cb, size_b, near, along_b)
    n_more = max(0, _n_objects(rng, d) - 2)
    more = [(s, c, "small") for c, s in _distinct_pairs(rng, split, n_more, {(ca, sa), (cb, sb)})]
    image, objects = _scene(rng, d, more, existing=[a, b])
    options = list(RELATIONS)
    rng.shuffle(options)
    letter = "ABCD"[options.index(where)]
    question = f"Where is the {ca} {sa} relative to the {cb} {sb}?"
    return Sample(question, letter, "multiple_choice", images=[image], choices=options,
                  meta={"objects": _describe(objects), "relation": [f"{ca} {sa}", where, f"{cb} {sb}"]})


def exists(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """POPE-style yes/no: is there a <colour> <shape>? Half no; negatives `random` or `adversarial`
    (the colour and the shape are both in the picture, but never together). Knobs: objects, noise."""
    category = rng.choice(["random", "adversarial"])
    label = rng.choice(["yes", "no"])
    query = rng.choice(target_pairs(split))
    n = _n_objects(rng, d, low=2)
    if label == "yes":
        chosen = [query] + _distinct_pairs(rng, split, n - 1, {query})
    elif category == "random":
        chosen = _distinct_pairs(rng, split, n, {query})
    else:
        c, s = query
        same_color = rng.choice([p for p in pairs(split) if p[0] == c and p[1] != s])
        same_shape = rng.choice([p for p in pairs(split) if p[1] == s and p[0] != c])
        rest = _distinct_pairs(rng, split, max(0, n - 2), {query, same_color, same_shape})
        chosen = [same_color, same_shape] + rest
    rng.shuffle(chosen)
    image, objects = _scene(rng, d, [(s, c, _size(rng)) for c, s in chosen])
    q = rng.choice(EXISTS_QUESTIONS)
    return Sample(f"{q.format(c=query[0], s=query[1])} {YES_NO}", label, "pope", images=[image],
                  candidates=["yes", "no"], category=category,
                  meta={"objects": _describe(objects), "target": list(query)})


def caption(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """A left-to-right list of every object with size, colour and shape. Scored by token F1."""
    n = _n_objects(rng, d)
    first = rng.choice(target_pairs(split))
    chosen = [first] + _distinct_pairs(rng, split, n - 1, {first})
    image, objects = _scene(rng, d, [(s, c, _size(rng)) for c, s in chosen])
    text = caption_text([(o.size, o.color, o.shape) for o in sorted(objects, key=lambda o: o.x)])
    q = rng.choice(["Describe the objects in the image from left to right.",
                    "List the objects in the image from left to right, with their size, color and shape."])
    return Sample(q, text, "f1", images=[image], meta={"objects": _describe(objects)})


def caption_text(objects: list[tuple[str, str, str]]) -> str:
    """The caption of (size, colour, shape) objects in left-to-right order: "A large red star and a
    small blue circle." (training builds near-miss captions with it too)."""
    names = [f"a {size} {color} {shape}" for size, color, shape in objects]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def scene_questions(objects: list[dict], rng: random.Random, split: str, k: int) -> list[tuple[str, str]]:
    """Up to `k` more (question, answer) pairs about a scene of shapes, worked out from its objects
    (the `meta["objects"]` of a world record), in the skills' own wording: the colour of a shape seen
    once, the shape of a colour seen once, counts (sometimes of what is absent: 0), and yes/no presence
    (half no, some of them adversarial). Training asks them as further turns about the same picture,
    so one image encoding teaches several answers. Absent pairs come from `split`, so no held-out
    colour-shape pair is ever named."""
    present = {(o["color"], o["shape"]) for o in objects}
    shapes = [o["shape"] for o in objects]
    colors = [o["color"] for o in objects]
    allowed = pairs(split)

    def unique_q(asked: str, answer: str, templates: tuple[str, ...], slot: str) -> tuple[str, str] | None:
        # "What color is the star?" only when there is one star (and "the red object" likewise).
        values = [o[asked] for o in objects]
        once = sorted(v for v in set(values) if values.count(v) == 1)
        if not once:
            return None
        v = rng.choice(once)
        return f"{rng.choice(templates).format(**{slot: v})} {ONE_WORD}", next(o[answer] for o in objects
                                                                             if o[asked] == v)

    def color_q() -> tuple[str, str] | None:
        return unique_q("shape", "color", COLOR_QUESTIONS, "s")

    def shape_q() -> tuple[str, str] | None:
        return unique_q("color", "shape", SHAPE_QUESTIONS, "c")

    def count_q() -> tuple[str, str]:
        c, s = rng.choice(sorted(present)) if rng.random() < 0.8 else rng.choice(allowed)
        kind = rng.choice(["shape", "color", "pair"])
        if kind == "shape":
            return f"How many {_plural(s)} are there? {NUMBER}", str(shapes.count(s))
        if kind == "color":
            return f"How many {c} objects are there? {NUMBER}", str(colors.count(c))
        return f"How many {c} {_plural(s)} are there? {NUMBER}", str(sum(p == (c, s) for p in zip(colors, shapes)))

    def exists_q() -> tuple[str, str] | None:
        if rng.random() < 0.5:
            c, s = rng.choice(sorted(present))
        else:  # adversarial when it can be: the colour and the shape are there, not together
            absent = [p for p in allowed if p not in present]
            tricky = [p for p in absent if p[0] in colors and p[1] in shapes]
            pool = tricky if tricky and rng.random() < 0.5 else absent
            if not pool:
                return None
            c, s = rng.choice(pool)
        return f"{rng.choice(EXISTS_QUESTIONS).format(c=c, s=s)} {YES_NO}", "yes" if (c, s) in present else "no"

    makers = [color_q, shape_q, count_q, count_q, exists_q]
    out: list[tuple[str, str]] = []
    for _ in range(4 * k):
        if len(out) == k or not objects:
            break
        qa = rng.choice(makers)()
        if qa is not None and all(qa[0] != q for q, _ in out):
            out.append(qa)
    return out


# --- rendered text ---------------------------------------------------------------------------------

def _phrase(rng: random.Random, split: str, n_words: int) -> str:
    held = rng.choice(words(split))
    rest = [rng.choice(any_words(split)) for _ in range(n_words - 1)]
    chosen = [held] + rest
    rng.shuffle(chosen)
    return " ".join(chosen)


def _ocr_text(rng: random.Random, split: str, d: Difficulty) -> tuple[str, str]:
    kind = rng.choice(["words", "words", "number", "code"])
    if kind == "words":
        text = _phrase(rng, split, rng.randint(1, d.text_length))
        style = rng.choice(["lower", "title", "upper"])
        text = {"lower": text, "title": text.title(), "upper": text.upper()}[style]
    elif kind == "number":
        text = str(rng.randint(10 ** (d.text_length), 10 ** (d.text_length + 2) - 1))
    else:
        letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(rng.randint(2, 3)))
        text = f"{letters}-{rng.randint(10 ** d.text_length, 10 ** (d.text_length + 1) - 1)}"
    return kind, text


def ocr(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """Read words, numbers or codes in varied fonts, sizes and rotations. Scored by ANLS.
    Knobs: image_size, text_length, rotation, noise."""
    kind, text = _ocr_text(rng, split, d)
    font_path = pick_font(rng)
    side = d.image_size
    angle = rng.uniform(-d.rotation, d.rotation)
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    size = int(side * rng.uniform(0.09, 0.18))
    while True:  # shrink until the rotated text fits with a margin
        f = font(font_path, size * SUPERSAMPLE)
        w, h = text_size(f, text)
        layer = Image.new("L", (w + 8 * SUPERSAMPLE, h + 8 * SUPERSAMPLE), 0)
        ImageDraw.Draw(layer).text((4 * SUPERSAMPLE - f.getbbox(text)[0],
                                    4 * SUPERSAMPLE - f.getbbox(text)[1]),
                                   text, fill=255, font=f)
        layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        room = side * SUPERSAMPLE * 0.92
        if layer.width <= room and layer.height <= room or size <= 8:
            break
        size -= 2
    big = side * SUPERSAMPLE
    image = background(rng, (big, big))
    x = rng.randint(0, max(0, big - layer.width))
    y = rng.randint(0, max(0, big - layer.height))
    image.paste(Image.new("RGB", layer.size, ink), (x, y), layer)
    image = add_noise(image.resize((side, side), Image.Resampling.LANCZOS), rng, d.noise)
    q = rng.choice(["What does the text in the image say?", "Read the text in the image.",
                    "What is written in the image?"])
    return Sample(q, text, "anls", images=[image],
                  meta={"text": text, "kind": kind, "font": font_path.name, "size": size,
                        "angle": round(angle, 2)})


# --- charts and documents --------------------------------------------------------------------------

CHART_TITLES = ("Sales by item", "Votes per option", "Visitors per day", "Scores", "Stock levels")


def chart(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """A bar chart with labelled bars and printed values; asks a value, the largest/smallest bar, or a
    difference. Scored by relaxed accuracy (5 %). Knobs: image_size, max_bars, noise."""
    n = rng.randint(3, d.max_bars)
    key = rng.choice(words(split))
    labels = [key] + rng.sample([w for w in any_words(split) if w != key and len(w) <= 7], n - 1)
    rng.shuffle(labels)
    values = rng.sample(range(5, 100), n)
    title = rng.choice(CHART_TITLES)
    image = _draw_chart(rng, d, title, labels, values)
    kind = rng.choice(["value", "value", "max", "min", "diff"])
    if kind == "value":
        q, a, cands = f"What is the value of {key}?", str(values[labels.index(key)]), None
    elif kind in ("max", "min"):
        pick = max if kind == "max" else min
        word = "highest" if kind == "max" else "lowest"
        q, a, cands = f"Which bar has the {word} value?", labels[values.index(pick(values))], list(labels)
    else:
        other = rng.choice([w for w in labels if w != key])
        q = f"What is the difference between the values of {key} and {other}?"
        a, cands = str(abs(values[labels.index(key)] - values[labels.index(other)])), None
    suffix = ONE_WORD if kind in ("max", "min") else NUMBER
    return Sample(f"{q} {suffix}", a, "relaxed", images=[image], candidates=cands,
                  meta={"title": title, "labels": labels, "values": values, "kind": kind})


def _draw_chart(rng: random.Random, d: Difficulty, title: str, labels: list[str],
                values: list[int]) -> Image.Image:
    s = SUPERSAMPLE
    side = d.image_size
    big = side * s
    image = background(rng, (big, big))
    draw = ImageDraw.Draw(image)
    title_font = ui_font(max(8, side // 16) * s, bold=True)
    label_font = ui_font(max(7, side // 22) * s)
    tw, _ = text_size(title_font, title)
    draw.text(((big - tw) / 2, big * 0.03), title, fill=(20, 20, 20), font=title_font)
    left, right, top, bottom = big * 0.06, big * 0.97, big * 0.2, big * 0.84
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(60, 60, 60), width=s)
    slot = (right - left) / len(labels)
    bar_color = rng.choice(list(COLORS.values())[:7])
    for i, (label, value) in enumerate(zip(labels, values)):
        x0, x1 = left + slot * (i + 0.18), left + slot * (i + 0.82)
        y0 = bottom - (bottom - top) * value / 100
        draw.rectangle([x0, y0, x1, bottom], fill=bar_color)
        vw, vh = text_size(label_font, str(value))
        draw.text(((x0 + x1) / 2 - vw / 2, y0 - vh - 3 * s), str(value), fill=(20, 20, 20), font=label_font)
        lw, _ = text_size(label_font, label)
        draw.text(((x0 + x1) / 2 - lw / 2, bottom + 3 * s), label, fill=(20, 20, 20), font=label_font)
    return add_noise(image.resize((side, side), Image.Resampling.LANCZOS), rng, d.noise)


FIRST_NAMES = ("Ada", "Ben", "Cara", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena",
               "Mia", "Noor", "Omar", "Pia", "Raj", "Sana", "Tom", "Uma", "Vik", "Wen", "Yara", "Zoe")
LAST_NAMES = ("Adams", "Berg", "Chen", "Diaz", "Evans", "Fox", "Garcia", "Hill", "Ito", "Jones", "Khan",
              "Lopez", "Moss", "Novak", "Ortiz", "Park", "Reed", "Silva", "Tan", "Vega", "Wong", "Young")
CITIES = ("Oslo", "Lima", "Cairo", "Perth", "Quito", "Riga", "Seoul", "Tunis", "Accra", "Bern", "Dakar",
          "Hanoi", "Kyiv", "Lyon", "Milan", "Nice", "Porto", "Turin", "Zagreb")


def document(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """A receipt (items, prices, total) or a form (name, date, id, city) with a field question.
    Scored by ANLS. Knobs: image_size, text_length (more receipt lines), noise."""
    if rng.random() < 0.5:
        return _receipt(rng, split, d)
    return _form(rng, split, d)


def _paper(rng: random.Random, d: Difficulty, lines: list[tuple[str, str]], heading: str) -> Image.Image:
    """Draw a heading and `label ... value` lines on a paper-coloured card."""
    s = SUPERSAMPLE
    side = d.image_size
    big = side * s
    image = background(rng, (big, big))
    draw = ImageDraw.Draw(image)
    paper = tuple(rng.randint(246, 255) for _ in range(3))
    margin = big * rng.uniform(0.04, 0.08)
    draw.rectangle([margin, margin, big - margin, big - margin], fill=paper, outline=(150, 150, 150), width=s)
    body = font(pick_font(rng, mono=True), max(8, int(side / (len(lines) + 4) * 0.62)) * s)
    head = ui_font(max(9, side // 14) * s, bold=True)
    hw, _ = text_size(head, heading)
    draw.text(((big - hw) / 2, margin * 1.6), heading, fill=(15, 15, 15), font=head)
    step = (big - margin * 2 - big * 0.2) / max(len(lines), 1)
    for i, (label, value) in enumerate(lines):
        y = margin + big * 0.18 + i * step
        if label == "---":
            rule = y + step / 3
            draw.line([(margin * 2, rule), (big - margin * 2, rule)], fill=(90, 90, 90), width=s)
            continue
        draw.text((margin * 2, y), label, fill=(15, 15, 15), font=body)
        vw, _ = text_size(body, value)
        draw.text((big - margin * 2 - vw, y), value, fill=(15, 15, 15), font=body)
    return add_noise(image.resize((side, side), Image.Resampling.LANCZOS), rng, d.noise)


def _receipt(rng: random.Random, split: str, d: Difficulty) -> Sample:
    n = rng.randint(2, min(7, 2 + d.text_length))
    key = rng.choice(words(split))
    items = [key] + rng.sample([w for w in any_words(split) if w != key and len(w) <= 7], n - 1)
    rng.shuffle(items)
    cents = [rng.randint(50, 2500) for _ in items]
    total = sum(cents)
    store = rng.choice(any_words(split)).title() + rng.choice([" Market", " Shop", " Store", " Deli"])
    lines = [(w.title(), f"{c / 100:.2f}") for w, c in zip(items, cents)]
    lines += [("---", ""), ("TOTAL", f"{total / 100:.2f}")]
    image = _paper(rng, d, lines, store)
    kind = rng.choice(["total", "price", "price", "store"])
    if kind == "total":
        q, a = "What is the total on the receipt?", f"{total / 100:.2f}"
    elif kind == "price":
        q, a = f"What is the price of {key.title()}?", f"{cents[items.index(key)] / 100:.2f}"
    else:
        q, a = "What is the name of the store?", store
    return Sample(q, a, "anls", images=[image],
                  meta={"kind": "receipt", "store": store, "items": items, "cents": cents, "asked": kind})


def _form(rng: random.Random, split: str, d: Difficulty) -> Sample:
    fields = {
        "Name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "Date": f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "ID": str(rng.randint(10 ** (2 + d.text_length), 10 ** (3 + d.text_length) - 1)),
        "City": rng.choice(CITIES),
        "Code": rng.choice(words(split)).upper(),
    }
    heading = rng.choice(["Application", "Member Form", "Registration"])
    image = _paper(rng, d, [(f"{k}:", v) for k, v in fields.items()], heading)
    asked = rng.choice(list(fields))
    q = {"Name": "What is the name on the form?", "Date": "What is the date on the form?",
         "ID": "What is the ID number on the form?", "City": "Which city is written on the form?",
         "Code": "What is the code on the form?"}[asked]
    return Sample(q, fields[asked], "anls", images=[image],
                  meta={"kind": "form", "fields": fields, "asked": asked})


# --- several images --------------------------------------------------------------------------------

def multi_count(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """Two or three images: which has the most objects of a kind. Knobs: image_size, max_objects, noise."""
    k = rng.choice([2, 3])
    color, shape = rng.choice(target_pairs(split))
    counts = rng.sample(range(0, max(d.max_objects, k) + 1), k)  # distinct, so the answer is unique
    images, metas = [], []
    for c in counts:
        rest = max(0, rng.randint(d.min_objects, d.max_objects) - c)
        others = [p for p in pairs(split) if p != (color, shape)]
        specs = [(shape, color, _size(rng)) for _ in range(c)] + \
                [(s, cc, _size(rng)) for cc, s in (rng.choice(others) for _ in range(rest))]
        rng.shuffle(specs)
        image, objects = _scene(rng, d, specs)
        images.append(image)
        metas.append(_describe(objects))
    names = " or ".join(f"image {i + 1}" for i in range(k)) if k == 2 else "image 1, 2 or 3"
    q = f"Which image has the most {color} {_plural(shape)}: {names}? Answer with the image number."
    return Sample(q, str(counts.index(max(counts)) + 1), "exact_match", images=images,
                  candidates=[str(i + 1) for i in range(k)], meta={"images": metas, "counts": counts,
                                                                    "target": [color, shape]})


def multi_same(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """Two images: do they hold the same objects (positions may differ)? Negatives change one object's
    colour or shape. Knobs: image_size, objects, noise."""
    n = _n_objects(rng, d)
    first = rng.choice(target_pairs(split))
    chosen = [first] + _distinct_pairs(rng, split, n - 1, {first})
    sizes = [_size(rng) for _ in chosen]
    same = rng.random() < 0.5
    second = list(chosen)
    if not same:
        i = rng.randrange(n)
        c, s = chosen[i]
        options = [p for p in pairs(split) if p not in chosen and (p[0] == c or p[1] == s)]
        second[i] = rng.choice(options)
    image1, objs1 = _scene(rng, d, [(s, c, z) for (c, s), z in zip(chosen, sizes)])
    image2, objs2 = _scene(rng, d, [(s, c, z) for (c, s), z in zip(second, sizes)])
    q = rng.choice(["Do the two images contain the same objects, ignoring where they are?",
                    "Are the same shapes with the same colors in both images?"])
    return Sample(f"{q} {YES_NO}", "yes" if same else "no", "exact_match", images=[image1, image2],
                  candidates=["yes", "no"], meta={"images": [_describe(objs1), _describe(objs2)]})


# --- video -----------------------------------------------------------------------------------------

def _frames(rng: random.Random, d: Difficulty, per_frame: list[list[Obj]]) -> list[Image.Image]:
    """Render frames sharing one background tint (a clip is one scene), each with its own noise."""
    side = d.frame_size * SUPERSAMPLE
    base = background(rng, (side, side))
    frames = []
    for objects in per_frame:
        frame = base.copy()
        draw = ImageDraw.Draw(frame)
        for o in objects:
            draw_object(draw, o, side)
        frame = frame.resize((d.frame_size, d.frame_size), Image.Resampling.LANCZOS)
        frames.append(add_noise(frame, rng, d.noise))
    return frames


DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def video_direction(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """A clip where one object moves left, right, up or down among still ones.
    Knobs: frames, frame_size, objects, noise."""
    color, shape = rng.choice(target_pairs(split))
    where = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[where]
    size = rng.choice(["medium", "large"])
    r = SIZES[size] + 0.02
    travel = rng.uniform(0.4, 1 - 2 * r - 0.05)
    start = rng.uniform(r, 1 - r - travel)  # along the motion axis, before flipping for left/up
    across = rng.uniform(r, 1 - r)
    path = []
    for t in range(d.frames):
        along = start + travel * t / (d.frames - 1)
        if dx + dy < 0:
            along = 1 - along
        x, y = (along, across) if dx else (across, along)
        path.append(Obj(shape, color, size, round(x, 4), round(y, 4)))
    # Still distractors away from the whole path.
    n_more = max(0, _n_objects(rng, d) - 1)
    more_specs = [(s, c, "small") for c, s in _distinct_pairs(rng, split, n_more, {(color, shape)})]
    still = place_objects(rng, more_specs, existing=path, optional=True)[len(path):]
    frames = _frames(rng, d, [[p, *still] for p in path])
    q = f"In which direction does the {color} {shape} move? Answer left, right, up or down."
    return Sample(q, where, "exact_match", video=frames, candidates=list(DIRECTIONS),
                  meta={"target": [color, shape], "direction": where, "still": _describe(still)})


def video_order(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """Objects appear one after another and stay; which of two appeared first.
    Knobs: frames, frame_size, noise."""
    first = rng.choice(target_pairs(split))
    n = rng.randint(2, 3)
    chosen = [first] + _distinct_pairs(rng, split, n - 1, {first})
    rng.shuffle(chosen)
    objects = place_objects(rng, [(s, c, rng.choice(["medium", "large"])) for c, s in chosen])
    appear = sorted(rng.sample(range(0, d.frames - 1), n))  # distinct frames; order = list order
    frames = _frames(rng, d, [[o for o, t in zip(objects, appear) if t <= f] for f in range(d.frames)])
    a = objects[chosen.index(first)]
    b = rng.choice([o for o in objects if o is not a])
    pair = [a, b] if rng.random() < 0.5 else [b, a]
    earlier = min(pair, key=lambda o: appear[objects.index(o)])
    q = f"Which appears first in the video, the {pair[0].name} or the {pair[1].name}?"
    return Sample(q, earlier.name, "exact_match", answers=[f"the {earlier.name}"], video=frames,
                  candidates=[pair[0].name, pair[1].name],
                  meta={"objects": _describe(objects), "appear_frame": appear})


def video_count(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """An object flashes in some frames; in how many does it appear. Knobs: frames, frame_size, noise."""
    color, shape = rng.choice(target_pairs(split))
    k = rng.randint(1, d.frames - 1)
    shown = set(rng.sample(range(d.frames), k))
    others = [p for p in pairs(split) if p != (color, shape)]
    per_frame = []
    for f in range(d.frames):
        specs = [(shape, color, _size(rng))] if f in shown else []
        if rng.random() < 0.6:  # a distractor flashes too, so "something is there" is not the answer
            c, s = rng.choice(others)
            specs.append((s, c, _size(rng)))
        per_frame.append(place_objects(rng, specs))
    frames = _frames(rng, d, per_frame)
    q = f"In how many frames of the video does a {color} {shape} appear? {NUMBER}"
    return Sample(q, str(k), "exact_match", video=frames, candidates=[str(i) for i in range(d.frames + 1)],
                  meta={"target": [color, shape], "frames_with_target": sorted(shown)})


# --- speech ----------------------------------------------------------------------------------------

def speech_transcribe(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """Spoken words or a number to write down. Scored by WER. Knobs: text_length, noise (hiss)."""
    if rng.random() < 0.7:
        text = _phrase(rng, split, rng.randint(1, d.text_length + 1))
        spoken = answer = text
    else:
        n = rng.randint(10 ** (d.text_length - 1), 10 ** (d.text_length + 1) - 1)
        spoken, answer = number_words(n), str(n)
    samples, meta = _say(rng, split, d, spoken)
    q = rng.choice(["Transcribe the audio.", "What is said in the audio?", "Write down what you hear."])
    return Sample(q, answer, "wer", audio=samples, meta=meta)


def speech_vqa(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """A question about the image, asked aloud (colour, shape or count). Knobs: those of the scene, noise."""
    make = rng.choice([_color_qa, _shape_qa, _count_qa])
    qa = make(rng, split, d)
    samples, meta = _say(rng, split, d, qa.question)
    return Sample(f"Answer the question in the audio about the image. {qa.suffix}", qa.answer, "exact_match",
                  images=[qa.image], audio=samples, candidates=qa.candidates, meta={**qa.meta, **meta})


def speech_math(rng: random.Random, split: str, d: Difficulty) -> Sample:
    """A spoken sum, difference or product of small numbers to compute. Knobs: noise."""
    op = rng.choice(["plus", "minus", "times"])
    if op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        result = a * b
    else:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        if op == "minus" and b > a:
            a, b = b, a
        result = a + b if op == "plus" else a - b
    spoken = f"What is {number_words(a)} {op} {number_words(b)}?"
    samples, meta = _say(rng, split, d, spoken)
    return Sample(f"Answer the spoken question. {NUMBER}", str(result), "exact_match", audio=samples,
                  meta=meta)


number_words = tts.number_words

SKILLS: dict[str, Skill] = {
    "color": color,
    "shape": shape,
    "count": count,
    "relation": relation,
    "exists": exists,
    "caption": caption,
    "ocr": ocr,
    "chart": chart,
    "document": document,
    "multi_count": multi_count,
    "multi_same": multi_same,
    "video_direction": video_direction,
    "video_order": video_order,
    "video_count": video_count,
    "speech_transcribe": speech_transcribe,
    "speech_vqa": speech_vqa,
    "speech_math": speech_math,
}
SPEECH_SKILLS = frozenset({"speech_transcribe", "speech_vqa", "speech_math"})
