"""Metrics, each written from its published definition and tested on hand-computed cases.

Per item, `METRICS[name](prediction, answers, choices)` gives a score in [0, 1]. Metrics that are
defined over a whole set (POPE's precision/recall, MME's acc+, corpus WER, circular multiple choice)
are computed by `summarize(metric, rows)` from the per-item prediction rows the runner writes.

- exact_match: EvalAI (VQA) answer normalisation on both sides, then equality with any answer.
- contains: the same normalisation, then any answer occurring as whole words inside the prediction
  (for chat models that answer "The capital of France is Paris." to "Paris"); lenient, so use it
  for open questions with one short answer, never for yes/no or numbers that could appear by chance.
- vqa: VQA soft accuracy: the mean over the leave-one-out subsets of the human answers of
  min(1, #matches / 3) (the official vqaEval.py); one answer falls back to exact_match.
- anls: ST-VQA / DocVQA average normalised Levenshtein similarity, threshold 0.5.
- relaxed: ChartQA relaxed accuracy: numbers within 5 % relative error, otherwise exact (case-free).
- f1: SQuAD token F1 (lower-cased, punctuation and articles removed).
- multiple_choice: the option letter extracted from the answer; MMBench circular evaluation counts a
  question only if every rotation of its options is answered correctly.
- pope: yes/no from the first sentence (POPE's rule); accuracy, precision, recall, F1, yes-ratio.
- mme: yes/no/other from MME's rule; per-category acc and acc+ (both questions of an image right),
  category score = acc + acc+, perception and cognition sums.
- wer / cer: word / character error rate, summed over the corpus (edits / reference length).
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

# --- EvalAI answer normalisation (VQA), from the official vqaEval.py ----------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# The official pattern, including its odd "(?!<=\d)" (a lookahead, not a lookbehind): kept as published.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
         "?", "!")


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """EvalAI's normalisation: punctuation, number words to digits, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def contains(prediction: str, answers: Sequence[str]) -> float:
    p = f" {normalize_answer(prediction)} "
    return float(any(a and f" {a} " in p for a in (normalize_answer(x) for x in answers)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy: average over each answer left out of min(1, matches among the rest / 3)."""
    p = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:  # leave-one-out of a single answer would always be 0
        return float(p == gts[0])
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == p)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# --- edit distances --------------------------------------------------------------------------------

def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Best over answers of 1 - NL, where NL = edit distance / longer length; 0 when NL >= threshold."""
    p = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        g = " ".join(answer.strip().lower().split())
        longest = max(len(g), len(p))
        nl = levenshtein(g, p) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA: a number within 5 % of the target (relative), otherwise a case-insensitive exact match."""
    prediction = prediction.strip().rstrip(".").strip()
    return float(any(_relaxed_one(a.strip(), prediction, tolerance) for a in answers))


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _relaxed_one(target: str, prediction: str, tolerance: float) -> bool:
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:  # as published: a target of 0 falls through to string equality
        return abs(p - t) / abs(t) <= tolerance
    return prediction.lower() == target.lower()


def _squad_normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD F1 over tokens, best over answers."""
    best = 0.0
    p = _squad_normalize(prediction).split()
    for answer in answers:
        g = _squad_normalize(answer).split()
        if not p or not g:
            best = max(best, float(p == g))
            continue
        same = sum((Counter(p) & Counter(g)).values())
        if same:
            precision, recall = same / len(p), same / len(g)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# --- multiple choice -------------------------------------------------------------------------------

def extract_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter a free-form answer picks, or None (then it counts as wrong).

    In order: the whole answer is a letter ("B", "(B)", "B."); it starts with a marked letter ("B. left",
    "(B) left", "B: left"); it says "answer is B" / "Answer: B" / "option B"; exactly one option's
    text occurs in it. "A small circle" is not read as option A: a letter must be marked.
    """
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices)]
    text = prediction.strip()
    bare = text.strip("()[]. :")
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    m = re.match(r"^\(?([A-Z])(?:[.):]|\)\s)", text)
    if m and m.group(1) in letters:
        return m.group(1)
    m = re.search(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*|:\s*)?\(?([A-Z])\b", text)
    if m and m.group(1) in letters:
        return m.group(1)
    low = f" {_squad_normalize(text)} "
    options = [f" {_squad_normalize(c)} " for c in choices]
    hits = [letters[i] for i, option in enumerate(options) if option.strip() and option in low]
    return hits[0] if len(hits) == 1 else None


def multiple_choice(prediction: str, answers: Sequence[str], choices: Sequence[str] | None) -> float:
    if not choices:
        return exact_match(prediction, answers)
    return float(extract_choice(prediction, choices) in answers)


# --- yes/no benchmarks -----------------------------------------------------------------------------

def pope_label(prediction: str) -> str:
    """POPE's rule: keep the first sentence; "no" if it has the word No, no or not; else "yes"."""
    text = prediction
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (yes = positive) and the share of yes answers, in %."""
    pred = [pope_label(p) == "yes" for p in predictions]
    gold = [str(label).strip().lower() == "yes" for label in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    n = max(len(pred), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100 * (tp + tn) / n, "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": 100 * sum(pred) / n}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_label(prediction: str) -> str:
    """MME's rule: "yes"/"no" exactly, else whichever of them occurs in the first four characters."""
    p = prediction.strip().lower()
    if p in ("yes", "no"):
        return p
    head = p[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """rows: {category, group (the image), prediction, answers}. Scores are in MME's units:
    acc and acc+ in %, category score = acc + acc+ (max 200), perception max 2000, cognition max 800."""
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_category[row.get("category") or "default"].append(row)
    categories = {}
    for category, items in sorted(by_category.items()):
        right = [mme_label(r["prediction"]) == r["answers"][0].strip().lower() for r in items]
        images: dict[str, list[bool]] = defaultdict(list)
        for r, ok in zip(items, right):
            images[str(r.get("group") or r["id"])].append(ok)
        acc = 100 * sum(right) / len(right)
        acc_plus = 100 * sum(all(v) for v in images.values()) / len(images)
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": len(items)}
    perception = sum(v["score"] for k, v in categories.items() if k in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in categories.items() if k in MME_COGNITION)
    return {"categories": categories, "perception": perception, "cognition": cognition,
            "total": perception + cognition}


# --- transcription ---------------------------------------------------------------------------------

def normalize_transcript(text: str) -> str:
    """Lower case, hyphens as spaces, punctuation (but apostrophes) removed, single spaces."""
    text = text.lower().replace("-", " ")
    text = "".join(ch for ch in text if ch == "'" or ch not in string.punctuation)
    return " ".join(text.split())


def word_errors(prediction: str, reference: str) -> tuple[int, int]:
    """(edits, reference words) after normalisation."""
    ref = normalize_transcript(reference).split()
    return levenshtein(ref, normalize_transcript(prediction).split()), len(ref)


def char_errors(prediction: str, reference: str) -> tuple[int, int]:
    ref = normalize_transcript(reference)
    return levenshtein(ref, normalize_transcript(prediction)), len(ref)


def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate: total edits / total reference words (can exceed 1)."""
    counts = [word_errors(p, r) for p, r in zip(predictions, references)]
    return sum(e for e, _ in counts) / max(sum(n for _, n in counts), 1)


def cer(predictions: Sequence[str], references: Sequence[str]) -> float:
    counts = [char_errors(p, r) for p, r in zip(predictions, references)]
    return sum(e for e, _ in counts) / max(sum(n for _, n in counts), 1)


def _item_error_score(errors: Callable[[str, str], tuple[int, int]]) -> Callable[..., float]:
    def score(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
        edits, length = errors(prediction, answers[0])
        return max(0.0, 1.0 - edits / max(length, 1))
    return score


# Per-item scores, all in [0, 1]: (prediction, answers, choices) -> score.
METRICS: dict[str, Callable[..., float]] = {
    "exact_match": lambda p, a, c=None: exact_match(p, a),
    "contains": lambda p, a, c=None: contains(p, a),
    "vqa": lambda p, a, c=None: vqa_accuracy(p, a),
    "anls": lambda p, a, c=None: anls(p, a),
    "relaxed": lambda p, a, c=None: relaxed_accuracy(p, a),
    "f1": lambda p, a, c=None: token_f1(p, a),
    "multiple_choice": multiple_choice,
    "pope": lambda p, a, c=None: float(pope_label(p) == a[0].strip().lower()),
    "mme": lambda p, a, c=None: float(mme_label(p) == a[0].strip().lower()),
    "wer": _item_error_score(word_errors),
    "cer": _item_error_score(char_errors),
}
LOWER_IS_BETTER = {"wer", "cer"}  # their headline is reported as 100 * max(0, 1 - error rate)


def summarize(metric: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Scores of one group of prediction rows (one task, one metric). `score` is always 0-100, higher
    is better; the metric's own numbers are added beside it."""
    n = len(rows)
    out: dict[str, Any] = {"metric": metric, "n": n}
    if n == 0:
        return {**out, "score": 0.0}
    if metric == "pope":
        out.update(pope_scores([r["prediction"] for r in rows], [r["answers"][0] for r in rows]))
        out["score"] = out["accuracy"]
        categories = sorted({r.get("category") for r in rows if r.get("category")})
        if len(categories) > 1:
            out["categories"] = {c: pope_scores([r["prediction"] for r in rows if r.get("category") == c],
                                                [r["answers"][0] for r in rows if r.get("category") == c])
                                 for c in categories}
    elif metric == "mme":
        out.update(mme_scores(rows))
        cats = out["categories"].values()
        out["score"] = sum(v["score"] for v in cats) / (2 * len(cats))
    elif metric in ("wer", "cer"):
        error_rate = wer if metric == "wer" else cer
        rate = error_rate([r["prediction"] for r in rows], [r["answers"][0] for r in rows])
        out[metric] = 100 * rate
        out["score"] = 100 * max(0.0, 1.0 - rate)
    elif metric == "multiple_choice" and any(r.get("circular_of") for r in rows):
        groups: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            groups[r.get("circular_of") or r["id"]].append(r["score"])
        out["score"] = 100 * sum(all(s == 1.0 for s in g) for g in groups.values()) / len(groups)
        out["n_questions"] = len(groups)
        firsts = [r["score"] for r in rows if str(r["id"]).endswith("@0") or not r.get("circular_of")]
        out["single_pass"] = 100 * sum(firsts) / max(len(firsts), 1)
    else:
        out["score"] = 100 * sum(r["score"] for r in rows) / n
    chance = chance_level(metric, rows)
    if chance is not None:
        out["chance"] = chance
    return out


def chance_level(metric: str, rows: Sequence[dict[str, Any]]) -> float | None:
    """Expected score (0-100) of guessing uniformly from each item's closed answer space (options or
    candidates; open items count 0). None when no item has a closed answer space."""
    if metric == "mme":
        return None
    spaces = [r.get("n_options") or (2 if metric == "pope" else 0) for r in rows]
    if not any(spaces):
        return None
    if metric == "multiple_choice" and any(r.get("circular_of") for r in rows):
        groups: dict[str, float] = {}
        for r, k in zip(rows, spaces):
            key = r.get("circular_of") or r["id"]
            groups[key] = groups.get(key, 1.0) * (1.0 / k)
        return 100 * sum(groups.values()) / len(groups)
    return 100 * sum(1.0 / k if k else 0.0 for k in spaces) / len(spaces)
